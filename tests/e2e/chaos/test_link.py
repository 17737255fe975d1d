"""The link between a session's guest and the host's gateway cut for 20 s in the middle of
a step, on a system that tolerates a silent guest longer than that (BERTH_GUEST_SILENCE_S
40 s; with the default 7 s the machine is taken for dead: test_guest.py). The guest's link
breaks and is dialled again once the packets flow, the step re-attaches, and every line of
its output arrives once."""

from __future__ import annotations

import time

import pytest

from store.events import EventType
from tests.e2e.chaos.harness import (
    check_once,
    counting,
    link_cut,
    numbered,
    report,
    start_task,
    wait_output,
)
from tests.e2e.test_spine import User
from tests.support.local import free_port

GATEWAY_PORT = free_port()
CUT_S = 20.0
SYSTEM_ENV = {"BERTH_GATEWAY_PORT": str(GATEWAY_PORT), "BERTH_GUEST_SILENCE_S": "40"}


@pytest.mark.timeout(240)
def test_a_step_completes_after_its_guests_link_was_cut_for_20_s(user: User) -> None:
    sid, tid, stream, handle = start_task(user, f"$ {counting(80, 0.5)}")
    wait_output(user, stream, tid, "line 5\n", 90)
    with link_cut(handle, GATEWAY_PORT) as guest:
        cut_at = stream.output(tid, 0).count("\n")
        report(f"cut the link of guest {guest} to gateway port {GATEWAY_PORT} at line {cut_at}")
        time.sleep(CUT_S)
        during = stream.output(tid, 0).count("\n") - cut_at
    restored = time.monotonic()
    report(f"restored it after {CUT_S:.0f} s; lines that arrived meanwhile: {during}")
    wait_output(user, stream, tid, f"line {cut_at + during + 1}\n", 60)
    report(f"output flowed again {time.monotonic() - restored:.1f} s after the link returned")
    task = user.wait_task(sid, tid, 120)
    assert task["status"] == "succeeded", (task, user.spine.tail())
    check_once(stream, tid, numbered(80))
    machines = [e for e in stream.events if e["type"] == EventType.sandbox_ready]
    assert len(machines) == 1, "the session got another machine"
