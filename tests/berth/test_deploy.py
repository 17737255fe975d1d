"""docker-compose.yml: valid for Compose (Debian's docker-compose v1 validates it), secrets
only from the environment, nothing published beyond loopback, no privileged container."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).parents[2] / "docker-compose.yml"
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret-value",
    "BERTH_USER_TOKEN_SECRET": "user-secret-value",
    "BERTH_GUEST_TOKEN_SECRET": "guest-secret-value",
    "BERTH_PAYLOAD_SECRET": "payload-secret-value",
}


def compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is missing: `make setup` installs it"
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and "BERTH_" not in k}
    return subprocess.run(
        [tool, "-f", str(COMPOSE), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=COMPOSE.parent,
    )


def test_the_compose_file_is_valid() -> None:
    checked = compose("config", "-q", env=SECRETS)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_every_secret_must_come_from_the_environment(missing: str) -> None:
    refused = compose("config", "-q", env={k: v for k, v in SECRETS.items() if k != missing})
    assert refused.returncode != 0 and f"set {missing}" in refused.stderr


def test_no_secret_is_written_in_the_file() -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        # Each secret is only ever the environment's, required: ${NAME:?...}.
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        uses = [line for line in lines if name in line]
        assert uses and all(f"${{{name}:?" in line for line in uses), uses


def resolved() -> dict[str, Any]:
    config = compose("config", env=SECRETS)
    assert config.returncode == 0, config.stderr
    services: dict[str, Any] = yaml.safe_load(config.stdout)["services"]
    return services


def test_nothing_is_published_beyond_loopback_and_nothing_is_privileged() -> None:
    services = resolved()
    for name, service in services.items():
        assert not service.get("privileged"), name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        assert "ALL" in service.get("cap_drop", []), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
    worker = services["worker"]
    assert set(worker["cap_add"]) == {"NET_ADMIN", "NET_RAW"}  # iptables on the sandbox bridge
    # Unset, it is the image's own user (uid 10001, deploy/image/Dockerfile), never root.
    assert services["api"]["read_only"] and services["api"].get("user") not in ("0", "root")
    temporal = " ".join(services["temporal"]["command"])
    assert "--ui-codec-endpoint http://127.0.0.1:8000/codec" in temporal
