"""The container deployment: `make image` builds Berth's images from the sandboxes' root
filesystem, docker-compose.yml brings PostgreSQL, Temporal, the worker and the API up from
them on this host, and a `$` task runs through it in a Docker sandbox. Slow the first time
(the image build, ~5 min); later runs reuse Docker's cache."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from store.events import EventType
from tests.e2e.test_system import read_events, token_for, wait_status
from tests.support.local import quiet_port

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

ROOT = Path(__file__).parents[2]


def compose(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def stack() -> Iterator[str]:
    # The image target with the virtualenv running this test (it is installed: make need
    # not check it again).
    venv = Path(sys.prefix)
    built = subprocess.run(
        ["make", "-C", str(ROOT), "image", f"PY={sys.executable}", f"VENV={venv}",
         "-o", f"{venv}/.installed"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    api_port = quiet_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"berthtest{api_port}",
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "BERTH_USER_TOKEN_SECRET": secrets.token_urlsafe(48),
        "BERTH_GUEST_TOKEN_SECRET": secrets.token_urlsafe(48),
        "BERTH_PAYLOAD_SECRET": secrets.token_urlsafe(48),
        "BERTH_API_PORT": str(api_port),
        "BERTH_POSTGRES_PORT": str(quiet_port()),
        "BERTH_TEMPORAL_PORT": str(quiet_port()),
        "BERTH_TEMPORAL_UI_PORT": str(quiet_port()),
        "BERTH_GATEWAY_PORT": str(quiet_port()),
        "BERTH_HOST_ID": f"compose{api_port}",
    }
    up = compose(env, "up", "-d")
    try:
        assert up.returncode == 0, up.stderr
        base = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            worker = compose(env, "logs", "worker").stdout
            try:
                healthy = httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and "worker up" in worker:
                break
            time.sleep(1)
        else:
            raise AssertionError(
                f"the stack did not come up:\n{compose(env, 'logs').stdout[-4000:]}"
            )
        yield base
    finally:
        down = compose(env, "down", "--volumes", "--timeout", "30")
        assert down.returncode == 0, down.stderr


def test_the_compose_stack_runs_a_task(stack: str) -> None:
    base = stack
    headers = token_for(base, "compose@example.com")
    created = httpx.post(f"{base}/api/sessions", json={}, headers=headers)
    assert created.status_code == 201
    sid = created.json()["id"]
    wait_status(base, headers, sid, "ready")
    task = httpx.post(
        f"{base}/api/sessions/{sid}/tasks",
        json={"prompt": "$ echo hello from compose"},
        headers=headers,
    )
    assert task.status_code == 202
    events = read_events(base, headers, sid, (EventType.task_status, "succeeded"))
    output = "".join(e["data"]["text"] for e in events if e["type"] == EventType.step_output)
    assert output == "hello from compose\n"
    assert httpx.delete(f"{base}/api/sessions/{sid}", headers=headers).status_code == 202
    wait_status(base, headers, sid, "ended")
