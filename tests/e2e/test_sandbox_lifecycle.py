"""A sandbox's life beyond one run, on the whole system with Docker sandboxes (fast): a
session ended with its disk preserved is resumed with its files; a sandbox killed behind
Berth's back, or whose guest hangs, is detected, its running step fails with a clear error,
and the session gets a new machine for its next task; a command waits for a suspended
machine; the host samples its sandboxes' CPU and memory; the worker registers its host and
heartbeats its machines, and a drain turns new sessions away."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlmodel import Session, create_engine, select

from config.settings import Settings
from store import hosts
from store.events import EventType
from store.models import HostRow, HostState, SandboxRow, utcnow
from tests.e2e.test_system import DONE, read_events, token_for, wait_status
from tests.support.local import LocalSystem, python_script


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    # A command fails once its guest has been gone 5 s (not 30): see the suspended machine.
    running = LocalSystem.start(
        tmp_path_factory.mktemp("berth"), "life", {"BERTH_GUEST_RECONNECT_GRACE_S": "5"}
    )
    yield running
    assert running.stop() == 0


def run_task(base: str, headers: dict[str, str], sid: str, prompt: str, after: int) -> str:
    """Queue a task and wait for its end; its output."""
    answer = httpx.post(
        f"{base}/api/sessions/{sid}/tasks", json={"prompt": prompt}, headers=headers
    )
    assert answer.status_code == 202, answer.text
    task_id = answer.json()["id"]
    events = read_events(
        base, headers, sid,
        lambda e: e["type"] == EventType.task_status and e["data"]["task_id"] == task_id
        and e["data"]["status"] in ("succeeded", "failed"),
        after=after,
    )  # fmt: skip
    assert events[-1]["data"]["status"] == "succeeded", events[-1]
    return "".join(e["data"]["text"] for e in events if e["type"] == EventType.step_output)


def test_a_preserved_session_resumes_with_its_files(system: LocalSystem) -> None:
    base = system.base
    headers = token_for(base, "keeper@example.com")
    sid = httpx.post(f"{base}/api/sessions", json={}, headers=headers).json()["id"]
    wait_status(base, headers, sid, "ready")
    run_task(base, headers, sid, "$ echo kept across runs > notes.txt", after=0)
    # Not ended yet: nothing to resume.
    assert httpx.post(f"{base}/api/sessions/{sid}/resume", headers=headers).status_code == 409

    ended = httpx.delete(f"{base}/api/sessions/{sid}", params={"preserve": True}, headers=headers)
    assert ended.status_code == 202
    session = wait_status(base, headers, sid, "ended")
    deadline = time.monotonic() + 30
    while not session["preserved"] and time.monotonic() < deadline:
        session = httpx.get(f"{base}/api/sessions/{sid}", headers=headers).json()
    assert session["preserved"] is True
    first_run = read_events(base, headers, sid, (EventType.session_status, "ended"))
    kinds = [e["type"] for e in first_run]
    assert EventType.sandbox_preserved in kinds and EventType.sandbox_destroyed not in kinds
    old = next(e["data"] for e in first_run if e["type"] == EventType.sandbox_ready)
    gone = subprocess.run(["docker", "inspect", old["handle"]], capture_output=True)
    assert gone.returncode != 0  # the container itself is gone; its workspace is kept
    other = token_for(base, "stranger@example.com")
    assert httpx.post(f"{base}/api/sessions/{sid}/resume", headers=other).status_code == 404

    resumed = httpx.post(f"{base}/api/sessions/{sid}/resume", headers=headers)
    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["status"] == "provisioning" and resumed.json()["ended_at"] is None
    again = httpx.post(f"{base}/api/sessions/{sid}/resume", headers=headers)
    assert again.status_code == 409  # running already
    wait_status(base, headers, sid, "ready")
    after = first_run[-1]["seq"]
    output = run_task(base, headers, sid, "$ cat notes.txt", after=after)
    assert output == "kept across runs\n"
    second_run = read_events(base, headers, sid, DONE, after=after)
    assert second_run[0]["seq"] == after + 1  # the same log, carrying on
    restored = next(e["data"] for e in second_run if e["type"] == EventType.sandbox_restored)
    # Followed from its start, the log goes on past the earlier run's end.
    whole = read_events(base, headers, sid, lambda e: e["type"] == EventType.sandbox_restored)
    assert whole[-1]["seq"] > after
    assert restored["preserved_id"] == old["sandbox_id"] != restored["sandbox_id"]
    tasks = httpx.get(f"{base}/api/sessions/{sid}/tasks", headers=headers).json()
    assert [t["status"] for t in tasks] == ["succeeded", "succeeded"]  # its history kept
    assert not httpx.get(f"{base}/api/sessions/{sid}", headers=headers).json()["preserved"]
    # Ended without preserve, nothing is kept and it cannot be resumed.
    assert httpx.delete(f"{base}/api/sessions/{sid}", headers=headers).status_code == 202
    wait_status(base, headers, sid, "ended")
    assert httpx.post(f"{base}/api/sessions/{sid}/resume", headers=headers).status_code == 409
    assert not (system.data / "preserved" / old["sandbox_id"]).exists()


def sandbox_row(system: LocalSystem, sandbox_id: str) -> SandboxRow:
    engine = create_engine(Settings(data_dir=system.data).db_url)
    with Session(engine) as db:
        row = db.exec(select(SandboxRow).where(SandboxRow.id == sandbox_id)).one()
    engine.dispose()
    return row


def kill(handle: str) -> None:
    subprocess.run(["docker", "kill", handle], check=True, capture_output=True)


# Stops (SIGSTOP) the guest agent: the container runs on, its guest answers nothing.
FREEZE_AGENT = (
    "import os\n"
    "for p in filter(str.isdigit, os.listdir('/proc')):\n"
    "    if int(p) != os.getpid() and b'guest_agent' in open(f'/proc/{p}/cmdline', 'rb').read():\n"
    "        os.kill(int(p), 19)\n"
)


def freeze(handle: str) -> None:
    freezing = ["docker", "exec", "--user", "0", handle, "python3", "-c", FREEZE_AGENT]
    subprocess.run(freezing, check=True, capture_output=True)


@pytest.mark.parametrize(
    ("break_it", "why"),
    [
        (kill, "its machine is exited"),
        (freeze, "its guest agent answered nothing for"),
    ],
    ids=["killed", "hung"],
)
def test_a_broken_sandbox_fails_its_step_and_the_session_gets_a_new_one(
    system: LocalSystem, break_it: Callable[[str], None], why: str
) -> None:
    """Killed behind Berth's back, or its guest hung (heartbeats unanswered while the
    machine runs): either is seen within seconds."""
    base = system.base
    headers = token_for(base, f"unlucky-{why[:12].replace(' ', '-')}@example.com")
    sid = httpx.post(f"{base}/api/sessions", json={}, headers=headers).json()["id"]
    wait_status(base, headers, sid, "ready")
    first = read_events(base, headers, sid, lambda e: e["type"] == EventType.sandbox_ready)[-1][
        "data"
    ]
    # Its use is sampled while it lives.
    deadline = time.monotonic() + 30
    while (row := sandbox_row(system, first["sandbox_id"])).stats_at is None:
        assert time.monotonic() < deadline, "no CPU and memory sample"
        time.sleep(0.5)
    assert row.memory_mb is not None and row.memory_mb > 0 and row.cpu_percent is not None

    answer = httpx.post(
        f"{base}/api/sessions/{sid}/tasks", json={"prompt": "$ sleep 300"}, headers=headers
    )
    task_id = answer.json()["id"]
    read_events(base, headers, sid, lambda e: e["type"] == EventType.step_started)
    break_it(first["handle"])
    events = read_events(
        base, headers, sid,
        lambda e: e["type"] == EventType.sandbox_ready
        and e["data"]["sandbox_id"] != first["sandbox_id"],
    )  # fmt: skip
    failed: dict[str, Any] = next(
        e["data"] for e in events
        if e["type"] == EventType.task_status and e["data"]["task_id"] == task_id
        and e["data"]["status"] == "failed"
    )  # fmt: skip
    assert f"the sandbox's machine died: {why}" in failed["error"]
    died = next(e["data"] for e in events if e["type"] == EventType.sandbox_died)
    assert died["sandbox_id"] == first["sandbox_id"] and why in died["error"]
    kinds = [e["type"] for e in events]
    assert kinds.index(EventType.sandbox_died) < kinds.index(EventType.sandbox_destroyed)
    # The next task runs on the new machine.
    wait_status(base, headers, sid, "ready")
    assert run_task(base, headers, sid, "$ echo on a new machine", events[-1]["seq"]) == (
        "on a new machine\n"
    )
    assert httpx.delete(f"{base}/api/sessions/{sid}", headers=headers).status_code == 202
    wait_status(base, headers, sid, "ended")


def test_a_command_waits_for_a_suspended_machine_past_the_reconnect_grace(
    system: LocalSystem,
) -> None:
    """Paused behind Berth's back (an operator, the host) while a command runs: the guest's
    link drops (pings time out), but the host sees the machine paused and the command waits
    for it, past BERTH_GUEST_RECONNECT_GRACE_S, and finishes once it runs again."""
    base = system.base
    headers = token_for(base, "paused@example.com")
    sid = httpx.post(f"{base}/api/sessions", json={}, headers=headers).json()["id"]
    wait_status(base, headers, sid, "ready")
    ready = read_events(base, headers, sid, lambda e: e["type"] == EventType.sandbox_ready)[-1][
        "data"
    ]
    script = python_script("tick.py", "import time", "time.sleep(2)", "print('after the pause')")
    answer = httpx.post(
        f"{base}/api/sessions/{sid}/tasks", json={"prompt": f"$ {script}"}, headers=headers
    )
    task_id = answer.json()["id"]
    read_events(base, headers, sid, lambda e: e["type"] == EventType.step_started)
    subprocess.run(["docker", "pause", ready["handle"]], check=True, capture_output=True)
    # Past the ping timeout (10 s) and the grace (5 s here): the link is gone by now.
    time.sleep(18)
    subprocess.run(["docker", "unpause", ready["handle"]], check=True, capture_output=True)
    events = read_events(
        base, headers, sid,
        lambda e: e["type"] == EventType.task_status and e["data"]["task_id"] == task_id
        and e["data"]["status"] in ("succeeded", "failed"),
    )  # fmt: skip
    assert events[-1]["data"]["status"] == "succeeded", events[-1]
    output = "".join(e["data"]["text"] for e in events if e["type"] == EventType.step_output)
    assert "after the pause" in output


def host_row(system: LocalSystem) -> HostRow | None:
    engine = create_engine(Settings(data_dir=system.data).db_url)
    with Session(engine) as db:
        rows = hosts.listing(db)
    engine.dispose()
    return rows[0] if rows else None


def test_the_worker_registers_its_host_and_a_drain_turns_sessions_away(
    system: LocalSystem,
) -> None:
    base = system.base
    headers = token_for(base, "registry@example.com")
    host = host_row(system)
    assert host is not None, "the worker registers as it starts"
    assert host.task_queue == f"berth-host-{host.id}" and host.state == HostState.active
    assert (host.provider, host.accel) == ("docker", "none") and host.vcpus >= 1
    sid = httpx.post(f"{base}/api/sessions", json={}, headers=headers).json()["id"]
    wait_status(base, headers, sid, "ready")
    ready_at = utcnow()
    deadline = time.monotonic() + 30  # the heartbeat comes every 5 s
    while (beat := host_row(system)) is None or beat.last_seen <= ready_at:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.5)
    assert beat.machines >= 1  # this session's, at least

    engine = create_engine(Settings(data_dir=system.data).db_url)
    with Session(engine) as db:
        assert hosts.set_state(db, host.id, HostState.draining)
    refused = httpx.post(f"{base}/api/sessions", json={}, headers=headers)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "30", refused.text
    with Session(engine) as db:
        assert hosts.set_state(db, host.id, HostState.active)
    engine.dispose()
    assert httpx.delete(f"{base}/api/sessions/{sid}", headers=headers).status_code == 202
