"""What ``python -m berth run --hosts N --api-replicas N`` gives each process: every host its
own id, gateway port, bridges and subnet; nginx a configuration it accepts (``nginx -t``)
that streams events unbuffered and passes WebSocket upgrades on."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from berth.balancer import Balancer
from berth.run import fleet_host
from config.settings import Settings


def test_each_host_of_a_fleet_has_its_own_id_ports_bridges_and_subnet(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, host_id="h", gateway_port=9000, worker_metrics_port=9100)
    assert fleet_host(settings, 1) == {}  # the first is the settings' own, as `make run`'s
    hosts = [fleet_host(settings, k) for k in range(2, 5)]
    assert [h["BERTH_HOST_ID"] for h in hosts] == ["h-2", "h-3", "h-4"]
    assert [h["BERTH_GATEWAY_PORT"] for h in hosts] == ["9001", "9002", "9003"]
    assert [h["BERTH_WORKER_METRICS_PORT"] for h in hosts] == ["9101", "9102", "9103"]
    for name in ("BERTH_VM_BRIDGE", "BERTH_DOCKER_BRIDGE", "BERTH_DOCKER_NETWORK"):
        values = [settings.vm_bridge if name == "BERTH_VM_BRIDGE" else ""] + [
            h[name] for h in hosts
        ]
        assert len(set(values)) == 4, name
    assert all(len(h[b]) <= 15 for h in hosts for b in ("BERTH_VM_BRIDGE", "BERTH_DOCKER_BRIDGE"))
    subnets = [ipaddress.IPv4Network(settings.vm_subnet)]
    subnets += [ipaddress.IPv4Network(h["BERTH_VM_SUBNET"]) for h in hosts]
    assert not any(a.overlaps(b) for i, a in enumerate(subnets) for b in subnets[i + 1 :])
    # Another install's fleet on the same Docker engine gets other networks.
    other = fleet_host(settings.model_copy(update={"data_dir": tmp_path / "other"}), 2)
    assert other["BERTH_DOCKER_NETWORK"] != hosts[0]["BERTH_DOCKER_NETWORK"]


def balancer(tmp_path: Path) -> Balancer:
    return Balancer(
        listen_host="127.0.0.1",
        listen_port=18000,
        replicas={"api-1": 18001, "api-2": 18002},
        config_file=tmp_path / "conf" / "nginx.conf",
        folder=tmp_path / "state",
        max_body_bytes=2**20,
    )


def test_nginx_streams_events_unbuffered_to_every_replica(tmp_path: Path) -> None:
    config = balancer(tmp_path).config()
    for directive in (
        "server 127.0.0.1:18001",
        "server 127.0.0.1:18002",
        "127.0.0.1:18002 api-2;",
        "listen 127.0.0.1:18000;",
        "proxy_buffering off;",
        "proxy_read_timeout 1h;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
    ):
        assert directive in config, directive


@pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="no nginx",
)
def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    made = balancer(tmp_path)
    made.folder.mkdir()
    made.write()
    checked = subprocess.run([*made.command()[:-2], "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert oct(made.config_file.stat().st_mode & 0o777) == "0o644"
