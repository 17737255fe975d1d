"""Watching this host's machines: a machine that dies (killed, crashed, powered off or
removed behind Berth's back), or runs while its guest answers nothing (hung, cut off), is
reported within seconds, its commands failed at once; one suspended (paused by an operator,
or the host; hibernated) keeps its commands waiting until it runs again; the running
machines' CPU and memory use is sampled now and then.

Watched are the machines whose guests said hello to this worker and the machines the
database places on this host (every live session's sandbox here), whether or not their
guests ever talked to this process: after a worker restart, a host reboot or a
``docker rm -f``, a machine that is stopped or gone is what it is, a dead one. A placed
machine the host does not list is taken for gone only when two passes in a row miss it:
one its session is destroying right now is gone a moment before its row says so.

One listing of the host's machines per pass (one ``docker ps``, one libvirt domain list),
one read of the placed sandboxes, and one WebSocket ping per connected guest (its
heartbeat); a host with no session and no guest lists nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sandboxes.models import SUSPENDED_STATES, Machine, MachineUsage
from sandboxes.provider import SandboxProvider

log = logging.getLogger("berth.monitor")

# Machine states (Docker's, libvirt's) from which no guest comes back by itself.
DEAD_STATES = frozenset({"exited", "dead", "shut off", "crashed"})
# The state of a placed machine that the host does not list (any more).
GONE = "gone"
POLL_S = 2.0
USAGE_EVERY_S = 5.0
# How long a running machine's guest may answer nothing (no message, no pong to the ping
# each pass sends) before it counts as dead: BERTH_GUEST_SILENCE_S, 7 s by default, so with
# POLL_S it is reported at most 9 s after its last answer.
SILENCE_S = 7.0

Died = Callable[[Machine, str], Awaitable[None]]
# Use by sandbox id, and the machines sampled (which name their sessions).
Sampled = Callable[[dict[str, MachineUsage], list[Machine]], Awaitable[None]]


@dataclass(frozen=True)
class Placed:
    """A machine the database places on this host: the sandbox of a live session."""

    sandbox_id: str
    session_id: str
    handle: str


# The machines the database places on this host now.
Placement = Callable[[], Awaitable[list[Placed]]]


def _death(machine: Machine, silence: float, silence_s: float) -> str | None:
    """Why the machine counts as dead, or None."""
    if machine.state == GONE:
        return "its machine is gone (removed, not by Berth)"
    if machine.state in DEAD_STATES:
        return f"its machine is {machine.state} (it was not ended by Berth)"
    if machine.state not in SUSPENDED_STATES and silence >= silence_s:
        return f"its guest agent answered nothing for {silence:.0f} s while its machine ran"
    return None


def _gone(placed: Sequence[Placed], listed: set[str], unseen: set[str] | None) -> list[Machine]:
    """The placed machines the listing misses, as machines in the GONE state: those missed
    by the pass before too (``unseen``, updated), or all of them without ``unseen``."""
    missing = [p for p in placed if p.sandbox_id not in listed]
    confirmed = missing if unseen is None else [p for p in missing if p.sandbox_id in unseen]
    if unseen is not None:
        unseen.clear()
        unseen.update(p.sandbox_id for p in missing)
    now = datetime.now(UTC)
    return [
        Machine(sandbox_id=p.sandbox_id, session_id=p.session_id, handle=p.handle,
                state=GONE, created_at=now)
        for p in confirmed
    ]  # fmt: skip


async def check(
    provider: SandboxProvider,
    on_death: Died,
    reported: set[str],
    silence_s: float = SILENCE_S,
    placed: Sequence[Placed] = (),
    unseen: set[str] | None = None,
) -> list[Machine]:
    """One pass: report machines newly dead, gone or silent, then send the next heartbeat;
    returns the listed machines watched (whose guests are known, or placed here).
    ``placed`` is read before the listing: a machine made since is not expected yet."""
    gateway = provider.gateway
    known = gateway.known()
    if not known and not placed:
        reported.clear()
        return []
    wanted = known | {p.sandbox_id for p in placed}
    listing = await provider.machines()
    listed = {m.sandbox_id for m in listing}
    machines = [m for m in listing if m.sandbox_id in wanted]
    # Told once: forgotten when neither listed nor placed, so the set stays bounded.
    reported.intersection_update(listed | wanted)
    for machine in machines + _gone(placed, listed, unseen):
        gateway.set_paused(machine.sandbox_id, machine.state in SUSPENDED_STATES)
        reason = _death(machine, gateway.silence(machine.sandbox_id), silence_s)
        if reason is not None and machine.sandbox_id not in reported:
            reported.add(machine.sandbox_id)
            log.warning("sandbox %s of session %s died: %s", machine.sandbox_id,
                        machine.session_id, reason)  # fmt: skip
            gateway.fail(machine.sandbox_id, reason)
            try:
                await on_death(machine, reason)
            except Exception:
                # Told again on the next pass; the other machines are told now.
                reported.discard(machine.sandbox_id)
                log.warning("could not tell session %s of its sandbox's death",
                            machine.session_id, exc_info=True)  # fmt: skip
    # After the listing: a pass that could not list asks nothing, so counts no silence.
    gateway.probe()
    return machines


async def watch(
    provider: SandboxProvider,
    on_death: Died,
    on_usage: Sampled,
    stop: asyncio.Event,
    poll_s: float = POLL_S,
    usage_every_s: float = USAGE_EVERY_S,
    silence_s: float = SILENCE_S,
    placement: Placement | None = None,
) -> None:
    """Check every ``poll_s`` (the machines ``placement`` says this host holds too) and
    sample use every ``usage_every_s`` until ``stop``."""
    reported: set[str] = set()
    unseen: set[str] = set()
    sampled_at = 0.0
    while not stop.is_set():
        try:
            placed = await placement() if placement is not None else []
            machines = await check(provider, on_death, reported, silence_s, placed, unseen)
            if machines and time.monotonic() - sampled_at >= usage_every_s:
                sampled_at = time.monotonic()
                usage = await provider.usage(machines)
                if usage:
                    await on_usage(usage, machines)
        except Exception:
            log.exception("watching the sandboxes failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_s)
