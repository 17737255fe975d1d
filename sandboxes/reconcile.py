"""Finding this host's machines again after a restart, and ending those nobody owns.

A machine is kept when the live session of its ``berth.session`` label owns its sandbox id:
its guest dials back into the gateway on its own. Any other machine is an orphan (its
session ended while the worker was down, or an earlier sandbox of a live session) and is
destroyed, unless it is younger than a grace period: it may be being provisioned right now,
before its session records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sandboxes.provider import SandboxProvider

log = logging.getLogger("berth.reconcile")

# The sandbox id that a session owns, or None when the session is not live.
Owner = Callable[[str], Awaitable[str | None]]

GRACE_S = 60.0


@dataclass
class ReconcileReport:
    adopted: list[str] = field(default_factory=list)
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
    provider: SandboxProvider, owner: Owner, grace_s: float = GRACE_S
) -> ReconcileReport:
    """Adopt the machines of live sessions, destroy the orphans older than ``grace_s``.

    A session whose owner cannot be told (Temporal unreachable, a query timing out) keeps
    its machines until a later pass; the other sessions' machines are judged regardless.
    """
    machines = await provider.machines()
    sessions = sorted({machine.session_id for machine in machines})
    answers = await asyncio.gather(*(_ask(owner, s) for s in sessions))
    owned = dict(zip(sessions, answers, strict=True))
    report = ReconcileReport()
    now = datetime.now(UTC)
    for machine in machines:
        sandbox_id = machine.sandbox_id
        if owned[machine.session_id] is UNKNOWN:
            report.unknown.append(sandbox_id)
        elif owned[machine.session_id] == sandbox_id:
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
        "reconciled %d machines: %d adopted, %d destroyed, %d failed, %d too young to judge, "
        "%d of sessions that did not answer",
        len(machines), len(report.adopted), len(report.destroyed), len(report.failed),
        len(report.young), len(report.unknown),
    )  # fmt: skip
    return report


async def reconcile_forever(
    provider: SandboxProvider,
    owner: Owner,
    every_s: float,
    stop: asyncio.Event,
    grace_s: float = GRACE_S,
) -> None:
    """Reconcile now and then every ``every_s`` until ``stop`` is set; a failed pass is
    logged and the next one tries again."""
    while not stop.is_set():
        try:
            await reconcile(provider, owner, grace_s)
        except Exception:
            log.exception("reconciling sandboxes failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
