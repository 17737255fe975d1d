"""Watching this host's machines while their guests are in touch: a machine that dies
(killed, crashed, powered off behind Berth's back) is reported within seconds, its commands
failed at once; one suspended (paused by an operator, or the host) keeps its commands
waiting until it runs again; the running machines' CPU and memory use is sampled now and
then.

One listing of the host's machines per pass (one ``docker ps``, one libvirt domain list),
and only while some guest has said hello to this worker, so an idle host costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from sandboxes.models import Machine, Usage
from sandboxes.provider import SandboxProvider

log = logging.getLogger("berth.monitor")

# Machine states (Docker's, libvirt's) from which no guest comes back by itself.
DEAD_STATES = frozenset({"exited", "dead", "shut off", "crashed"})
# States of a suspended machine (Docker's, libvirt's), which comes back when resumed.
PAUSED_STATES = frozenset({"paused", "suspended", "hibernated"})
POLL_S = 2.0
USAGE_EVERY_S = 5.0

Died = Callable[[Machine, str], Awaitable[None]]
Sampled = Callable[[dict[str, Usage]], Awaitable[None]]


async def check(provider: SandboxProvider, on_death: Died, reported: set[str]) -> list[Machine]:
    """One pass: report machines newly dead; returns the machines whose guests are known."""
    known = provider.gateway.known()
    if not known:
        return []
    machines = [m for m in await provider.machines() if m.sandbox_id in known]
    for machine in machines:
        provider.gateway.set_paused(machine.sandbox_id, machine.state in PAUSED_STATES)
        if machine.state in DEAD_STATES and machine.sandbox_id not in reported:
            reported.add(machine.sandbox_id)
            reason = f"its machine is {machine.state} (it was not ended by Berth)"
            log.warning("sandbox %s of session %s died: %s", machine.sandbox_id,
                        machine.session_id, reason)  # fmt: skip
            provider.gateway.fail(machine.sandbox_id, reason)
            await on_death(machine, reason)
    return machines


async def watch(
    provider: SandboxProvider,
    on_death: Died,
    on_usage: Sampled,
    stop: asyncio.Event,
    poll_s: float = POLL_S,
    usage_every_s: float = USAGE_EVERY_S,
) -> None:
    """Check every ``poll_s`` and sample use every ``usage_every_s`` until ``stop``."""
    reported: set[str] = set()
    sampled_at = 0.0
    while not stop.is_set():
        try:
            machines = await check(provider, on_death, reported)
            if machines and time.monotonic() - sampled_at >= usage_every_s:
                sampled_at = time.monotonic()
                usage = await provider.usage(machines)
                if usage:
                    await on_usage(usage)
        except Exception:
            log.exception("watching the sandboxes failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_s)
