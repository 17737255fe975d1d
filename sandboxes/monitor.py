"""Watching this host's machines while their guests are in touch: a machine that dies
(killed, crashed, powered off behind Berth's back), or runs while its guest answers nothing
(hung, cut off), is reported within seconds, its commands failed at once; one suspended
(paused by an operator, or the host) keeps its commands waiting until it runs again; the
running machines' CPU and memory use is sampled now and then.

One listing of the host's machines per pass (one ``docker ps``, one libvirt domain list)
and one WebSocket ping per connected guest (its heartbeat), only while some guest has said
hello to this worker, so an idle host costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from sandboxes.models import Machine, MachineUsage
from sandboxes.provider import SandboxProvider

log = logging.getLogger("berth.monitor")

# Machine states (Docker's, libvirt's) from which no guest comes back by itself.
DEAD_STATES = frozenset({"exited", "dead", "shut off", "crashed"})
# States of a suspended machine (Docker's, libvirt's), which comes back when resumed.
PAUSED_STATES = frozenset({"paused", "suspended", "hibernated"})
POLL_S = 2.0
USAGE_EVERY_S = 5.0
# How long a running machine's guest may answer nothing (no message, no pong to the ping
# each pass sends) before it counts as dead: BERTH_GUEST_SILENCE_S, 7 s by default, so with
# POLL_S it is reported at most 9 s after its last answer.
SILENCE_S = 7.0

Died = Callable[[Machine, str], Awaitable[None]]
# Use by sandbox id, and the machines sampled (which name their sessions).
Sampled = Callable[[dict[str, MachineUsage], list[Machine]], Awaitable[None]]


def _death(machine: Machine, silence: float, silence_s: float) -> str | None:
    """Why the machine counts as dead, or None."""
    if machine.state in DEAD_STATES:
        return f"its machine is {machine.state} (it was not ended by Berth)"
    if machine.state not in PAUSED_STATES and silence >= silence_s:
        return f"its guest agent answered nothing for {silence:.0f} s while its machine ran"
    return None


async def check(
    provider: SandboxProvider, on_death: Died, reported: set[str], silence_s: float = SILENCE_S
) -> list[Machine]:
    """One pass: report machines newly dead or silent, then send the next heartbeat;
    returns the machines whose guests are known."""
    gateway = provider.gateway
    known = gateway.known()
    if not known:
        return []
    machines = [m for m in await provider.machines() if m.sandbox_id in known]
    for machine in machines:
        gateway.set_paused(machine.sandbox_id, machine.state in PAUSED_STATES)
        reason = _death(machine, gateway.silence(machine.sandbox_id), silence_s)
        if reason is not None and machine.sandbox_id not in reported:
            reported.add(machine.sandbox_id)
            log.warning("sandbox %s of session %s died: %s", machine.sandbox_id,
                        machine.session_id, reason)  # fmt: skip
            gateway.fail(machine.sandbox_id, reason)
            try:
                await on_death(machine, reason)
            except Exception:
                reported.discard(machine.sandbox_id)  # told again on the next pass
                raise
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
) -> None:
    """Check every ``poll_s`` and sample use every ``usage_every_s`` until ``stop``."""
    reported: set[str] = set()
    sampled_at = 0.0
    while not stop.is_set():
        try:
            machines = await check(provider, on_death, reported, silence_s)
            if machines and time.monotonic() - sampled_at >= usage_every_s:
                sampled_at = time.monotonic()
                usage = await provider.usage(machines)
                if usage:
                    await on_usage(usage, machines)
        except Exception:
            log.exception("watching the sandboxes failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_s)
