"""Chaos inside and around a session's machine (a Docker container), with the default
settings: a step that fills the guest's disk or exhausts its memory, and the link between
the guest and the host's gateway cut for 20 s mid-step, longer than BERTH_GUEST_SILENCE_S
(7 s): the host takes the machine for dead, fails the step with that reason, and the session
runs its next task on a new machine. (test_link.py: the same cut with a silence tolerance
longer than the cut, which the step survives.)"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from store.events import EventType
from tests.e2e.chaos.harness import counting, link_cut, pid_of, report, wait_output
from tests.e2e.test_spine import User, is_event
from tests.support.local import free_port, python_script

GATEWAY_PORT = free_port()
CUT_S = 20.0
SYSTEM_ENV = {"BERTH_GATEWAY_PORT": str(GATEWAY_PORT)}


def machines(user: User, sid: str) -> list[str]:
    """The handles of the session's machines so far, oldest first."""
    stream = user.stream(sid)
    stream.wait_for("a sandbox", is_event(EventType.sandbox_ready), 90)
    time.sleep(0.5)  # the rest of the log
    return [str(e["data"]["handle"]) for e in stream.events if e["type"] == EventType.sandbox_ready]


def run(user: User, sid: str, prompt: str) -> dict[str, Any]:
    return user.wait_task(sid, user.queue(sid, prompt), 120)


@pytest.mark.timeout(240)
def test_a_full_disk_and_exhausted_memory_fail_their_step_clearly(user: User) -> None:
    sid = user.new_session()
    before = machines(user, sid)
    worker = pid_of(user.spine, "worker")

    full = run(user, sid, "$ head -c 700M /dev/zero > big")  # the workspace holds 512 MiB
    step = full["steps"][0]
    report(f"filled the workspace: task {full['status']}, exit {step['exit_code']}, "
           f"output {step['output'][-100:]!r}")  # fmt: skip
    assert full["status"] == "failed" and step["status"] == "failed", full
    assert "No space left on device" in step["output"], step
    after = run(user, sid, "$ rm big\n$ echo room again > small\n$ cat small")
    assert after["status"] == "succeeded", after
    assert after["steps"][2]["output"] == "room again\n"

    eat = python_script(
        "eat.py", "chunks = []", "while True:", "    chunks.append(bytearray(b'x' * 2**26))"
    )
    oom = run(user, sid, f"$ {eat}")
    step = oom["steps"][0]
    report(f"exhausted the memory: task {oom['status']}, exit {step['exit_code']}, "
           f"error {step['error']!r}")  # fmt: skip
    assert oom["status"] == "failed" and step["status"] == "failed", oom
    assert "out-of-memory" in (step["error"] or ""), step

    again = run(user, sid, "$ echo still here")
    assert again["status"] == "succeeded" and again["steps"][0]["output"] == "still here\n"
    assert user.session(sid)["status"] == "ready"
    assert machines(user, sid) == before, "the session got another machine"
    assert pid_of(user.spine, "worker") == worker, "the worker died"
    assert httpx.get(f"{user.base}/healthz", timeout=5).status_code == 200
    report("the same session and machine ran the next task; the worker and API kept running")


@pytest.mark.timeout(240)
def test_a_link_cut_longer_than_the_silence_bound_replaces_the_machine(user: User) -> None:
    sid = user.new_session()
    [first] = machines(user, sid)
    stream = user.stream(sid)
    tid = user.queue(sid, f"$ {counting(80, 0.5)}")
    wait_output(user, stream, tid, "line 5\n", 90)
    with link_cut(first, GATEWAY_PORT) as guest:
        report(f"cut the link of guest {guest} to gateway port {GATEWAY_PORT} for {CUT_S:.0f} s")
        time.sleep(CUT_S)
    task = user.wait_task(sid, tid, 120)
    error = task["steps"][0]["error"] or ""
    report(f"the step {task['steps'][0]['status']}: {error!r}")
    assert task["status"] == "failed", task
    assert "answered nothing" in error, error
    again = run(user, sid, "$ echo on a new machine")
    assert again["status"] == "succeeded", again
    assert again["steps"][0]["output"] == "on a new machine\n"
    handles = machines(user, sid)
    assert len(handles) == 2 and handles[0] == first, handles
    report(f"the next task ran on a new machine ({handles[1][:12]})")
