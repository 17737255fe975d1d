"""A fleet of two sandbox hosts (two workers, each its own host id and gateway port, on one
Temporal and one database; Docker sandboxes): new sessions are placed on both, a drained
host takes none, ``drain --move`` moves a session off with its files, and a host whose
worker is killed with SIGKILL loses no session: each of its sessions is told within 30 s
and runs its next task on a new machine on the other host."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlmodel import Session, create_engine

from config.settings import Settings
from sandboxes.docker import HOST_LABEL
from store import hosts
from store.events import EventType
from tests.e2e.test_sandbox_lifecycle import run_task
from tests.e2e.test_system import read_events, token_for, wait_status
from tests.support.local import LocalSystem

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

LOST_AFTER_S = 6


class Fleet:
    def __init__(self, system: LocalSystem, second: subprocess.Popen[bytes], other: str) -> None:
        self.system, self.second, self.other = system, second, other
        self.headers = token_for(system.base, "fleet@example.com")
        # Each session made so far, and the host it was placed on.
        self.placed: dict[str, str] = {}

    def host_ids(self) -> set[str]:
        engine = create_engine(Settings(data_dir=self.system.data).db_url)
        with Session(engine) as db:
            found = {row.id for row in hosts.listing(db)}
        engine.dispose()
        return found

    def new_session(self) -> tuple[str, dict[str, Any]]:
        """A new session, ready; and its session.placed event's data."""
        base = self.system.base
        made = httpx.post(f"{base}/api/sessions", json={}, headers=self.headers)
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        wait_status(base, self.headers, sid, "ready")
        events = read_events(
            base, self.headers, sid, lambda e: e["type"] == EventType.session_placed
        )
        placed = events[-1]["data"]
        self.placed[sid] = placed["host_id"]
        return sid, placed


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    settings = {
        "BERTH_HOST_HEARTBEAT_S": "1",
        "BERTH_HOST_LOST_AFTER_S": str(LOST_AFTER_S),
        "BERTH_MAX_LIVE_SESSIONS": "20",
    }
    system = LocalSystem.start(tmp_path_factory.mktemp("berth"), "fleet", settings)
    second = system.add_host("b")
    other = f"b{system.host_id}"
    running = Fleet(system, second, other)
    try:
        deadline = time.monotonic() + 120
        while running.host_ids() != {system.host_id, other}:
            assert second.poll() is None, (system.data / "b.log").read_text()
            assert time.monotonic() < deadline, "the second host never registered"
            time.sleep(0.5)
        yield running
    finally:
        if second.poll() is None:
            second.kill()
        second.wait()
        stopped = system.stop()
        # Both hosts' containers (live sessions' machines outlive their worker on purpose;
        # the killed host's are nobody's now).
        for host in (system.host_id, other):
            left = subprocess.run(
                ["docker", "ps", "-aq", "--filter", f"label={HOST_LABEL}={host}"],
                capture_output=True, text=True, check=False,
            ).stdout.split()  # fmt: skip
            if left:
                subprocess.run(["docker", "rm", "-f", *left], capture_output=True, check=False)
        assert stopped == 0


def test_new_sessions_are_placed_on_both_hosts(fleet: Fleet) -> None:
    whys = []
    for _ in range(4):
        _, placed = fleet.new_session()
        whys.append(placed["why"])
        if set(fleet.placed.values()) == {fleet.system.host_id, fleet.other}:
            break
        time.sleep(2)  # a heartbeat says the machine the last one made
    assert set(fleet.placed.values()) == {fleet.system.host_id, fleet.other}, whys
    assert all("least loaded" in why for why in whys), whys


def host_command(fleet: Fleet, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "berth", "host", *args],
        env=fleet.system.environment, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_drained_host_takes_no_new_session(fleet: Fleet) -> None:
    host_command(fleet, "drain", fleet.other)
    try:
        hosts_of_new = {fleet.new_session()[1]["host_id"] for _ in range(2)}
    finally:
        host_command(fleet, "undrain", fleet.other)
    assert hosts_of_new == {fleet.system.host_id}


def test_a_drain_with_move_moves_each_session_with_its_files(fleet: Fleet) -> None:
    base, headers = fleet.system.base, fleet.headers
    sid = next(sid for sid, host in fleet.placed.items() if host == fleet.other)
    run_task(base, headers, sid, "$ echo kept on the way > moved.txt", after=0)
    before = read_events(base, headers, sid, lambda e: e["type"] == EventType.task_status)
    host_command(fleet, "drain", "--move", fleet.other)
    try:
        moved = read_events(
            base, headers, sid, lambda e: e["type"] == EventType.sandbox_restored,
            after=before[-1]["seq"],
        )  # fmt: skip
    finally:
        host_command(fleet, "undrain", fleet.other)
    kinds = [e["type"] for e in moved]
    assert EventType.sandbox_preserved in kinds and EventType.sandbox_destroyed not in kinds
    placed = [e["data"] for e in moved if e["type"] == EventType.session_placed]
    assert placed[-1]["host_id"] == fleet.system.host_id
    assert placed[-1]["why"].startswith(f"moved off draining host {fleet.other}")
    fleet.placed[sid] = fleet.system.host_id
    assert "kept on the way" in run_task(
        base, headers, sid, "$ cat moved.txt", after=moved[-1]["seq"]
    )
    # The kill below needs a session on the other host again: undrained, it takes them.
    for _ in range(3):
        if fleet.new_session()[1]["host_id"] == fleet.other:
            break
        time.sleep(2)


def test_a_killed_hosts_sessions_run_their_next_task_on_the_other_host(fleet: Fleet) -> None:
    base, headers = fleet.system.base, fleet.headers
    on_other = [sid for sid, host in fleet.placed.items() if host == fleet.other]
    assert on_other, fleet.placed
    sid = on_other[0]
    seen = read_events(base, headers, sid, lambda e: e["type"] == EventType.sandbox_ready)
    after = seen[-1]["seq"]

    fleet.second.kill()  # SIGKILL: no clean stop, no last word
    killed_at = time.monotonic()
    told = read_events(base, headers, sid, lambda e: e["type"] == EventType.host_lost, after=after)
    assert time.monotonic() - killed_at <= LOST_AFTER_S + 30
    lost = told[-1]["data"]
    assert lost["host_id"] == fleet.other and "files" in lost["detail"]

    moved = read_events(
        base, headers, sid, lambda e: e["type"] == EventType.sandbox_ready, after=told[-1]["seq"]
    )
    placed = [e["data"] for e in moved if e["type"] == EventType.session_placed]
    assert placed and placed[-1]["host_id"] == fleet.system.host_id
    assert moved[-1]["data"]["host_id"] == fleet.system.host_id
    output = run_task(base, headers, sid, "$ echo still here", after=moved[-1]["seq"])
    assert "still here" in output
