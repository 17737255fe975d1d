"""The local fleet, as ``python -m berth run --hosts 2 --api-replicas 2`` starts it on
PostgreSQL, Docker sandboxes: both hosts register, sessions made through nginx work, and an
event stream outlives the API replica it was on (killed with SIGKILL): its client reconnects
through nginx with Last-Event-ID and gets every event once, in order. Where sessions are
placed across the hosts is tests/e2e' placement tests' concern, not this file's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from berth.balancer import REPLICA_HEADER
from tests.support.local import LocalSystem, python_script
from tests.support.postgres import drop_database, fresh_database

LINES = 150
# Prints 1..LINES, one every 40 ms: the stream is mid-output when its replica is killed.
COUNT = "$ " + python_script(
    "count.py",
    "import time",
    f"for i in range(1, {LINES + 1}):",
    "    print(i, flush=True)",
    "    time.sleep(0.04)",
)

Event = dict[str, Any]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    url = fresh_database()
    if url is None:
        pytest.skip("no PostgreSQL")
    yield url
    drop_database(url)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, database: str) -> Iterator[LocalSystem]:
    data = tmp_path_factory.mktemp("fleet") / "data"
    env = {"BERTH_DATABASE_URL": database}
    system = LocalSystem.start(data, "fleet", env, timeout_s=420, hosts=2, api_replicas=2)
    try:
        yield system
    finally:
        code = system.stop()
    assert code == 0, system.log()[-3000:]
    shutil.rmtree(data, ignore_errors=True)


def user(system: LocalSystem, email: str) -> dict[str, str]:
    credentials = {"email": email, "password": "a long password"}
    assert httpx.post(f"{system.base}/api/auth/signup", json=credentials).status_code == 201
    token = httpx.post(f"{system.base}/api/auth/token", json=credentials).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def admin(system: LocalSystem, database: str) -> dict[str, str]:
    env = {**os.environ, "BERTH_DATA_DIR": str(system.data), "BERTH_DATABASE_URL": database}
    subprocess.run(
        [sys.executable, "-m", "berth", "create-admin", "admin@example.com"],
        input="an admin's password\n", text=True, check=True, env=env,
    )  # fmt: skip
    credentials = {"email": "admin@example.com", "password": "an admin's password"}
    token = httpx.post(f"{system.base}/api/auth/token", json=credentials).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def status(kind: str, value: str) -> Callable[[Event], bool]:
    return lambda e: e["type"] == kind and e["data"].get("status") == value


READY = status("session.status", "ready")
DONE = status("task.status", "succeeded")


def read_stream(
    lines: Iterator[str] | httpx.Response, events: list[Event], until: Callable[[Event], bool]
) -> bool:
    """Append the stream's events to ``events`` until one that ``until`` accepts (True), or
    until the stream breaks (False). ``lines``: a response, or its lines being read."""
    fields: dict[str, str] = {}
    if isinstance(lines, httpx.Response):
        lines = lines.iter_lines()
    try:
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            if "data" in fields:
                events.append(json.loads(fields["data"]))
                if until(events[-1]):
                    return True
            fields = {}
    except httpx.HTTPError:
        pass
    return False


def test_both_hosts_register(fleet: LocalSystem, database: str) -> None:
    listed = httpx.get(f"{fleet.base}/api/admin/hosts", headers=admin(fleet, database))
    assert listed.status_code == 200, listed.text
    hosts = {h["id"]: h for h in listed.json()}
    first = next(h for h in hosts if not h.endswith("-2"))
    assert f"{first}-2" in hosts, hosts
    for host in (first, f"{first}-2"):
        assert hosts[host]["state"] == "active"
        assert hosts[host]["task_queue"] == f"berth-host-{host}"


def test_sessions_through_nginx_work_on_either_replica(fleet: LocalSystem) -> None:
    headers = user(fleet, "ann@example.com")
    with httpx.Client(base_url=fleet.base, headers=headers, timeout=30) as http:
        replicas = {http.get("/api/sessions").headers[REPLICA_HEADER] for _ in range(6)}
        assert replicas == {"api-1", "api-2"}  # round robin over both
        sid = http.post("/api/sessions", json={}).json()["id"]
        task = http.post(f"/api/sessions/{sid}/tasks", json={"prompt": "$ echo fleet-says-hi"})
        assert task.status_code == 202, task.text
        events: list[Event] = []
        with http.stream("GET", f"/api/sessions/{sid}/events", timeout=120) as response:
            assert read_stream(response, events, DONE), events[-5:]
        output = "".join(e["data"].get("text", "") for e in events if e["type"] == "step.output")
        assert "fleet-says-hi" in output
        assert http.delete(f"/api/sessions/{sid}").status_code == 202


def test_a_stream_outlives_its_replica(fleet: LocalSystem) -> None:
    headers = user(fleet, "bo@example.com")
    with httpx.Client(base_url=fleet.base, headers=headers, timeout=30) as http:
        sid = http.post("/api/sessions", json={}).json()["id"]
        url = f"/api/sessions/{sid}/events"
        events: list[Event] = []
        with http.stream("GET", url, timeout=120) as response:
            assert read_stream(response, events, READY), events[-5:]
        task = http.post(f"/api/sessions/{sid}/tasks", json={"prompt": COUNT})
        assert task.status_code == 202, task.text

        killed = None
        with http.stream(
            "GET", url, headers={"Last-Event-ID": str(events[-1]["seq"])}, timeout=120
        ) as response:
            replica = response.headers[REPLICA_HEADER]
            lines = response.iter_lines()
            # Output flows through this replica: now it dies.
            assert read_stream(lines, events, lambda e: e["type"] == "step.output")
            pid = int((fleet.data / "run" / f"{replica}.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed = replica
            assert not read_stream(lines, events, DONE)  # it broke
        assert killed is not None

        # Reconnect through nginx, where it left off, until the task is done.
        for _ in range(5):
            last = str(events[-1]["seq"])
            with http.stream("GET", url, headers={"Last-Event-ID": last}, timeout=120) as again:
                assert again.status_code == 200
                if read_stream(again, events, DONE):
                    break
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, seqs[-1] + 1)), "a gap or a duplicate"
        output = "".join(e["data"].get("text", "") for e in events if e["type"] == "step.output")
        assert output.split() == [str(i) for i in range(1, LINES + 1)]
        assert http.delete(f"/api/sessions/{sid}").status_code == 202
