"""The host firewall: rules that cannot be made stop the worker; a worker's rules go with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from berth.host import make_gateway, make_provider
from config.settings import Settings
from sandboxes import firewall
from sandboxes.docker import FIREWALL_CHAIN, DockerProvider
from tests.support.local import free_port

ROOT = Path(__file__).resolve().parents[2]


def docker_provider(**settings: object) -> DockerProvider:
    chosen = Settings(
        guest_token_secret="firewall-test",
        sandbox_provider="docker",
        **settings,  # type: ignore[arg-type]
    )
    provider = make_provider(chosen, make_gateway(chosen))
    assert isinstance(provider, DockerProvider)
    return provider


def tagged_ports(tag: str) -> list[str]:
    rules = firewall.run("-S", FIREWALL_CHAIN).splitlines()
    return [rule.split("--dport ")[1].split()[0] for rule in rules if f"--comment {tag} " in rule]


async def test_a_workers_rules_are_made_once_and_removed_when_it_stops() -> None:
    gateway_port, page_port = free_port(), free_port()
    provider = docker_provider(gateway_port=gateway_port, sandbox_host_ports=[page_port])
    tag = firewall.owner_tag(gateway_port)
    try:
        provider._ensure_firewall()
        provider._ensure_firewall()  # as after a crash: what was left is replaced, not doubled
        assert sorted(tagged_ports(tag)) == sorted([str(gateway_port), str(page_port)])
        assert firewall.has_rule(FIREWALL_CHAIN, "-j", "DROP")
        assert firewall.has_rule("INPUT", "-i", "berth0", "-j", FIREWALL_CHAIN)
    finally:
        await provider.close()
    assert tagged_ports(tag) == []
    # Sandboxes that outlive the worker stay shut in.
    assert firewall.has_rule(FIREWALL_CHAIN, "-j", "DROP")


def test_without_root_the_worker_does_not_start_open() -> None:
    # The provider's firewall set-up, as user nobody: iptables refuses, and that is an error.
    script = (
        "from tests.sandboxes.test_firewall import docker_provider\n"
        "docker_provider(gateway_port=1)._ensure_firewall()\n"
    )
    done = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
         sys.executable, "-c", script],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "FirewallError: iptables" in done.stderr, done.stderr
