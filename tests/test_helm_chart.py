"""The Helm chart (deploy/helm/berth), rendered by Helm's own template engine (its Go SDK,
through helm-python-sdk: no helm binary, no cluster) and every object checked against the
API schemas of a pinned Kubernetes version (kubernetes-validate, strict: an unknown field
fails too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).parents[1] / "deploy" / "helm" / "berth"
# The oldest Kubernetes the chart claims (Chart.yaml's kubeVersion) and the newest the schemas
# know; the other tests check against the oldest.
KUBERNETES = ("1.27.0", "1.37.0")

# What an operator must give (the chart makes no secret up and assumes no Temporal or DB).
REQUIRED: dict[str, Any] = {
    "secrets": {
        "userTokenSecret": "u" * 40,
        "guestTokenSecret": "g" * 40,
        "payloadSecret": "p" * 40,
        "metricsToken": "m" * 40,
    },
    "temporal": {"address": "temporal-frontend.temporal:7233"},
    "database": {"existingSecret": "berth-db"},
}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name="demo", namespace="berth")
    return [
        doc
        for text in manifests.values()
        for doc in yaml.safe_load_all(text)
        if doc  # a template whose condition is off renders nothing
    ]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def validate(objects: list[dict[str, Any]], kubernetes: str = KUBERNETES[0]) -> None:
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD's kind: no schema of Kubernetes' own (checked below instead)
        kubernetes_validate.validate(obj, kubernetes, strict=True)


@pytest.mark.parametrize("kubernetes", KUBERNETES)
def test_the_chart_renders_objects_valid_for_kubernetes(kubernetes: str) -> None:
    objects = render(REQUIRED)
    kinds = by_kind(objects)
    assert sorted(kinds) == [
        "DaemonSet",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Ingress",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceMonitor",
    ]
    validate(objects, kubernetes)


def test_a_wrong_field_fails_validation() -> None:
    """The check above can fail: a misspelt field of a Deployment does."""
    deployment = by_kind(render(REQUIRED))["Deployment"][0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate([deployment])


def test_the_api_is_ready_on_healthz_and_kept_available() -> None:
    kinds = by_kind(render(REQUIRED))
    (api,) = kinds["Deployment"]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    selector = api["spec"]["selector"]["matchLabels"]
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]
    assert "replicas" not in api["spec"]  # the autoscaler owns the count
    (pdb,) = kinds["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    (ingress,) = kinds["Ingress"]
    assert ingress["spec"]["tls"] == [{"hosts": ["berth.example.com"], "secretName": "berth-tls"}]
    env = {e["name"]: e for e in container["env"]}
    for name, key in [
        ("BERTH_USER_TOKEN_SECRET", "user-token-secret"),
        ("BERTH_GUEST_TOKEN_SECRET", "guest-token-secret"),
        ("BERTH_PAYLOAD_SECRET", "payload-secret"),
    ]:
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == key
    (secret,) = kinds["Secret"]
    assert secret["stringData"]["payload-secret"] == "p" * 40
    assert env["BERTH_TEMPORAL_ADDRESS"]["value"] == "temporal-frontend.temporal:7233"


def test_workers_run_on_sandbox_nodes_with_docker_or_kvm() -> None:
    docker = by_kind(render(REQUIRED))["DaemonSet"][0]["spec"]["template"]["spec"]
    assert docker["nodeSelector"] == {"berth.dev/sandboxes": "true"}
    assert docker["hostNetwork"] is True
    (container,) = docker["containers"]
    assert "privileged" not in container["securityContext"]
    assert {"name": "docker", "mountPath": "/var/run/docker.sock"} in container["volumeMounts"]
    # The API starts sessions on the task queue of the host the worker serves.
    api = by_kind(render(REQUIRED))["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    hosts = [
        next(e["value"] for e in c["env"] if e["name"] == "BERTH_HOST_ID") for c in (api, container)
    ]
    assert hosts == ["k8s", "k8s"]

    objects = render(merged(REQUIRED, {"worker": {"provider": "libvirt"}}))
    validate(objects)
    libvirt = by_kind(objects)["DaemonSet"][0]["spec"]["template"]["spec"]
    (container,) = libvirt["containers"]
    assert container["securityContext"]["privileged"] is True
    assert {"name": "kvm", "mountPath": "/dev/kvm"} in container["volumeMounts"]
    assert {"name": "kvm", "hostPath": {"path": "/dev/kvm", "type": "CharDevice"}} in libvirt[
        "volumes"
    ]


def test_an_existing_secret_and_temporal_tls() -> None:
    values = merged(
        REQUIRED,
        {
            "secrets": {"existingSecret": "ours"},
            "temporal": {"tls": {"enabled": True, "existingSecret": "temporal-mtls"}},
            "api": {"autoscaling": {"enabled": False}, "replicas": 3},
        },
    )
    objects = render(values)
    validate(objects)
    kinds = by_kind(objects)
    assert "Secret" not in kinds and "HorizontalPodAutoscaler" not in kinds
    (api,) = kinds["Deployment"]
    assert api["spec"]["replicas"] == 3
    spec = api["spec"]["template"]["spec"]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["BERTH_PAYLOAD_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "ours"
    assert env["BERTH_TEMPORAL_TLS"]["value"] == "true"
    assert {"name": "temporal-tls", "secret": {"secretName": "temporal-mtls"}} in spec["volumes"]


@pytest.mark.parametrize("missing", ["secrets", "temporal", "database"])
def test_what_the_operator_must_give_is_required(missing: str) -> None:
    values = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(helm_python.HelmError):
        render(values)


def test_the_service_monitor_scrapes_ports_its_services_have() -> None:
    kinds = by_kind(render(REQUIRED))
    (monitor,) = kinds["ServiceMonitor"]
    wanted = monitor["spec"]["selector"]["matchLabels"]
    ports = {
        port["name"]
        for service in kinds["Service"]
        if wanted.items() <= service["metadata"]["labels"].items()
        for port in service["spec"]["ports"]
    }
    endpoints = monitor["spec"]["endpoints"]
    assert {e["port"] for e in endpoints} == ports == {"http", "metrics", "sdk-metrics"}
    (api_endpoint,) = [e for e in endpoints if e["port"] == "http"]
    assert api_endpoint["authorization"]["credentials"]["key"] == "metrics-token"
