"""deploy/: the Prometheus alert rules and the Grafana dashboard are well formed and ask only
for metrics Berth defines (a renamed metric would silence an alert without a word)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from telemetry import metrics
from workflows import search

DEPLOY = Path(__file__).parents[2] / "deploy"
NAME = re.compile(r"\bberth_[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def defined() -> set[str]:
    return {
        family.name
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.describe()
    }


def asked(expressions: list[str]) -> set[str]:
    names = {name for expr in expressions for name in NAME.findall(expr)}
    for suffix in SUFFIXES:
        names = {n.removesuffix(suffix) for n in names}
    return names


def test_every_alert_is_complete_and_asks_for_defined_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {
        "BerthSessionStuck",
        "BerthWarmPoolEmpty",
        "BerthWorkerHostLost",
        "BerthModelErrors",
    } <= {rule["alert"] for rule in rules}
    for rule in rules:
        assert rule["expr"] and rule["labels"]["severity"] and rule["annotations"]["summary"]
    used = asked([rule["expr"] for rule in rules])
    assert used and used <= defined(), used - defined()


def test_every_dashboard_panel_asks_for_defined_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "berth.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = asked(expressions)
    assert used <= defined(), used - defined()
    # Everything defined is on the dashboard.
    assert defined() <= used, defined() - used


def test_the_compose_files_temporal_registers_the_search_attributes() -> None:
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    command = compose["services"]["temporal"]["command"]
    pairs = {command[i + 1] for i, arg in enumerate(command) if arg == "--search-attribute"}
    assert pairs == {flag for flag in search.dev_server_flags() if flag != "--search-attribute"}
