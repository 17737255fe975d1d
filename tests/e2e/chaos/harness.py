"""What the chaos tests share: a system of their own (tests/support/local.py: its own
Temporal dev server, ports and data dir, on loopback), the faults they cause to its
processes, and the checks that nothing was lost or repeated. Each test says what it did and
what it found in ``chaos:`` lines (shown with ``pytest -s``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from sandboxes import firewall
from store.events import EventType
from tests.e2e.test_spine import FINAL_TASK, Spine, Stream, User, is_event
from tests.support.local import python_script


def report(what: str) -> None:
    print(f"chaos: {what}", flush=True)


def system(data: Path, name: str, env: dict[str, str] | None = None) -> Iterator[Spine]:
    """The whole system for one test module, stopped cleanly at its end."""
    started = time.monotonic()
    running = Spine.start(data, name, env)
    report(f"system {name} up in {time.monotonic() - started:.1f} s ({running.base})")
    try:
        yield running
    finally:
        assert running.stop() == 0, running.tail()


def start_task(user: User, prompt: str) -> tuple[str, str, Stream, str]:
    """A new session of ``user`` running ``prompt``: (session id, task id, the session's
    stream, its machine's handle)."""
    sid = user.new_session()
    stream = user.stream(sid)
    tid = user.queue(sid, prompt)
    ready = stream.wait_for("the sandbox", is_event(EventType.sandbox_ready), 90)
    return sid, tid, stream, str(ready["data"]["handle"])


def counting(lines: int, every_s: float, until: str | None = None) -> str:
    """A step that prints ``line 1`` to ``line N``, one each ``every_s``; with ``until``, it
    stops early (after a line) once a file of that name is in its workspace."""
    loop = [f"for i in range(1, {lines + 1}):", '    print("line", i, flush=True)']
    if until is not None:
        loop += [f"    if os.path.exists({until!r}):", "        break"]
    return python_script("count.py", "import os, time", *loop, f"    time.sleep({every_s})")


def numbered(last: int) -> str:
    """What ``counting`` prints up to ``last``."""
    return "".join(f"line {i}\n" for i in range(1, last + 1))


def pid_of(spine: Spine, child: str) -> int:
    """The pid of the supervisor's child (worker, api, temporal), from its pid file."""
    return int((spine.data / "run" / f"{child}.pid").read_text())


def kill(spine: Spine, child: str) -> int:
    """SIGKILL the child; its pid."""
    pid = pid_of(spine, child)
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_restarted(spine: Spine, child: str, killed: int, timeout_s: float) -> float:
    """Seconds until the supervisor has started the child again (a new pid)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if pid_of(spine, child) != killed:
                return time.monotonic() - started
        except (FileNotFoundError, ValueError):
            pass  # between the rename and the write: read again
        time.sleep(0.1)
    raise spine.fail(f"{child} was not restarted within {timeout_s:.0f} s")


def wait_healthy(spine: Spine, timeout_s: float) -> float:
    """Seconds until the API answers again."""
    started = time.monotonic()
    while not spine.healthy():
        if time.monotonic() - started > timeout_s:
            raise spine.fail(f"the API did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - started


def wait_output(user: User, stream: Stream, tid: str, text: str, timeout_s: float) -> None:
    """Wait until the first step's output on the stream contains ``text``."""
    deadline = time.monotonic() + timeout_s
    while text not in stream.output(tid, 0):
        ended = [e for e in stream.events if is_event(EventType.task_status, task_id=tid)(e)]
        if ended and ended[-1]["data"]["status"] in FINAL_TASK:
            raise user.spine.fail(f"the task ended before {text!r}: {ended[-1]['data']}")
        if time.monotonic() > deadline or stream.done:
            raise user.spine.fail(
                f"no {text!r} on the stream within {timeout_s:.0f} s "
                f"(stream done={stream.done}, error={stream.error}); "
                f"saw {stream.output(tid, 0)[-200:]!r}"
            )
        time.sleep(0.05)


def check_once(stream: Stream, tid: str, expected: str) -> None:
    """The task's first step printed ``expected``, and the stream carried each of its lines
    exactly once, in an event log without gaps or repeats, and the step started once."""
    stream.wait_for(
        "the task's end", is_event(EventType.task_status, task_id=tid, status="succeeded"), 60
    )
    seqs = [e["seq"] for e in stream.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the event log has gaps or repeats"
    got = stream.output(tid, 0)
    assert got == expected, f"step output differs: {got[-300:]!r}"
    starts = [e for e in stream.events if is_event(EventType.step_started, task_id=tid, index=0)(e)]
    assert len(starts) == 1, f"the step started {len(starts)} times"
    report(f"{expected.count(chr(10))} lines, each once; events {seqs[0]}..{seqs[-1]} contiguous")


def address(handle: str) -> str:
    """The container's address on the sandboxes' bridge."""
    found = subprocess.run(
        ["docker", "inspect", "--format",
         "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", handle],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return found.stdout.strip()


@contextlib.contextmanager
def link_cut(handle: str, gateway_port: int) -> Iterator[str]:
    """The link between the container's guest and the gateway cut both ways (its packets
    dropped, so neither end sees a close) while the block runs: two iptables rules for that
    address and port only, tagged with the gateway's port and removed whatever happens.
    Yields the guest's address."""
    guest = address(handle)
    tag = f"berth-chaos-{gateway_port}"
    drop = ("-m", "comment", "--comment", tag, "-j", "DROP")
    rules = [
        ("INPUT", "-s", guest, "-p", "tcp", "--dport", str(gateway_port), *drop),
        ("OUTPUT", "-d", guest, "-p", "tcp", "--sport", str(gateway_port), *drop),
    ]
    try:
        for chain, *rule in rules:
            firewall.run("-I", chain, "1", *rule)
        yield guest
    finally:
        for chain in ("INPUT", "OUTPUT"):
            firewall.remove_tagged(chain, tag)
