"""Finding this host's machines again after a restart, and ending those nobody owns.

A machine is kept when the live session of its ``berth.session`` label owns its sandbox id:
its guest dials back into the gateway on its own, if the machine runs. One that is stopped
(exited, shut off: a host reboot, a Docker restart) or gone (removed behind Berth's back,
while the database still places it here) is told to its session as dead, which replaces
it. Any other machine is an orphan (its session ended while the worker was down, or an
earlier sandbox of a live session) and is destroyed, unless it is younger than a grace
period: it may be being provisioned right now, before its session records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sandboxes.models import Machine
from sandboxes.monitor import DEAD_STATES, GONE, Died, Placed, Placement
from sandboxes.provider import SandboxProvider

log = logging.getLogger("berth.reconcile")

# The sandbox id that a session owns, or None when the session is not live.
Owner = Callable[[str], Awaitable[str | None]]

GRACE_S = 60.0


@dataclass
class ReconcileReport:
    adopted: list[str] = field(default_factory=list)
    # Machines of live sessions that are stopped or gone: told to their sessions.
    dead: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    # Orphans within the grace period, left for a later pass.
    young: list[str] = field(default_factory=list)
    # Machines whose session's owner could not be asked, left for a later pass.
    unknown: list[str] = field(default_factory=list)


UNKNOWN = object()
OWNER_TIMEOUT_S = 10.0


async def _ask(owner: Owner, session_id: str) -> str | object | None:
    try:
        return await asyncio.wait_for(owner(session_id), OWNER_TIMEOUT_S)
    except Exception:
        log.warning("could not tell who owns session %s's machines", session_id, exc_info=True)
        return UNKNOWN


async def reconcile(
    provider: SandboxProvider,
    owner: Owner,
    grace_s: float = GRACE_S,
    on_death: Died | None = None,
    placed: Sequence[Placed] = (),
) -> ReconcileReport:
    """Adopt the running machines of live sessions, tell ``on_death`` of their stopped or
    gone ones (``placed``: what the database places on this host, read before the
    listing), destroy the orphans older than ``grace_s``.

    A session whose owner cannot be told (Temporal unreachable, a query timing out) keeps
    its machines until a later pass; the other sessions' machines are judged regardless.
    """
    machines = await provider.machines()
    listed = {machine.sandbox_id for machine in machines}
    now = datetime.now(UTC)
    gone = [
        Machine(sandbox_id=p.sandbox_id, session_id=p.session_id, handle=p.handle,
                state=GONE, created_at=now)
        for p in placed if p.sandbox_id not in listed
    ]  # fmt: skip
    sessions = sorted({machine.session_id for machine in machines + gone})
    answers = await asyncio.gather(*(_ask(owner, s) for s in sessions))
    owned = dict(zip(sessions, answers, strict=True))
    report = ReconcileReport()
    for machine in gone:
        if owned[machine.session_id] == machine.sandbox_id:
            await _tell(machine, on_death, report)
    for machine in machines:
        sandbox_id = machine.sandbox_id
        if owned[machine.session_id] is UNKNOWN:
            report.unknown.append(sandbox_id)
        elif owned[machine.session_id] == sandbox_id:
            if machine.state in DEAD_STATES:
                await _tell(machine, on_death, report)
                continue
            report.adopted.append(sandbox_id)
            log.debug("sandbox %s of session %s adopted", sandbox_id, machine.session_id)
        elif (now - machine.created_at).total_seconds() < grace_s:
            report.young.append(sandbox_id)
        else:
            # Forgotten first: its guest going quiet while it shuts down is no death.
            provider.gateway.forget(sandbox_id)
            try:
                await provider.remove(machine.handle)
            except Exception:
                log.exception("could not destroy orphaned sandbox %s", sandbox_id)
                report.failed.append(sandbox_id)
                continue
            report.destroyed.append(sandbox_id)
            log.info("orphaned sandbox %s of session %s destroyed", sandbox_id, machine.session_id)
    log.info(
        "reconciled %d machines: %d adopted, %d dead (told), %d destroyed, %d failed, "
        "%d too young to judge, %d of sessions that did not answer",
        len(machines), len(report.adopted), len(report.dead), len(report.destroyed),
        len(report.failed), len(report.young), len(report.unknown),
    )  # fmt: skip
    return report


async def _tell(machine: Machine, on_death: Died | None, report: ReconcileReport) -> None:
    """Tell a live session that its machine is stopped or gone; its session replaces it
    (and removes what is left). A session not told now is told by a later pass."""
    state = "gone" if machine.state == GONE else machine.state
    reason = f"its machine is {state}, found so when its host's worker reconciled"
    log.warning("sandbox %s of session %s: %s", machine.sandbox_id, machine.session_id, reason)
    if on_death is None:
        return
    try:
        await on_death(machine, reason)
    except Exception:
        log.warning("could not tell session %s of its sandbox's death", machine.session_id,
                    exc_info=True)  # fmt: skip
        return
    report.dead.append(machine.sandbox_id)


async def reconcile_forever(
    provider: SandboxProvider,
    owner: Owner,
    every_s: float,
    stop: asyncio.Event,
    grace_s: float = GRACE_S,
    on_death: Died | None = None,
    placement: Placement | None = None,
) -> None:
    """Reconcile now and then every ``every_s`` until ``stop`` is set; a failed pass is
    logged and the next one tries again."""
    while not stop.is_set():
        try:
            placed = await placement() if placement is not None else []
            await reconcile(provider, owner, grace_s, on_death, placed)
        except Exception:
            log.exception("reconciling sandboxes failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
