"""Session rows that agree with their workflows: a row whose workflow is over is closed.

A session's row is ended by its workflow's last event. A workflow that never writes it
(terminated by an operator, timed out, failed, or lost with a dev server's unsaved writes)
would leave its row live for good, counting against its user's live sessions while the
host's reconciliation destroys its machine. The sweeper, run by every worker, describes the
workflows of live rows a batch at a time and closes those whose workflow is closed or gone,
through the event log (a ``session.status`` event with the reason), so the dashboard and the
event stream say so too. The API's DELETE closes a row the same way when it finds the
workflow gone.

Every live row is swept, not only this host's: a row does not say which host holds it, and
the rows that most need closing are those of a host that is gone. Two workers closing one row
record one event (the event's key), and describing a workflow is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from store import events
from store.models import SessionRow, SessionStatus, utcnow
from workflows.client import workflow_id

log = logging.getLogger("berth.sweeper")

# How a closed workflow leaves its session: a run that completed (or was cancelled, as
# DELETE does) ended it; any other close is a failure, said in the row's error.
CLOSED: dict[WorkflowExecutionStatus, tuple[SessionStatus, str | None]] = {
    WorkflowExecutionStatus.COMPLETED: (SessionStatus.ended, None),
    WorkflowExecutionStatus.CANCELED: (SessionStatus.ended, None),
    WorkflowExecutionStatus.FAILED: (SessionStatus.failed, "its workflow failed"),
    WorkflowExecutionStatus.TERMINATED: (SessionStatus.failed, "its workflow was terminated"),
    WorkflowExecutionStatus.TIMED_OUT: (SessionStatus.failed, "its workflow timed out"),
}
GONE = (SessionStatus.failed, "its workflow is gone from the orchestrator (not found)")
DESCRIBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Outcome:
    """How a session's workflow left it: the row's final status and why."""

    status: SessionStatus
    reason: str | None


async def outcome(client: Client, session_id: str) -> Outcome | None:
    """The outcome of the session's workflow (its newest run), or None while it runs.
    Errors other than not-found (Temporal unreachable) propagate: nothing is known."""
    handle = client.get_workflow_handle(workflow_id(session_id))
    try:
        described = await handle.describe(rpc_timeout=timedelta(seconds=DESCRIBE_TIMEOUT_S))
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return Outcome(*GONE)
        raise
    closed = CLOSED.get(described.status) if described.status is not None else None
    # Running, or continued as new (the newest run is described, so only for an instant).
    return Outcome(*closed) if closed is not None else None


def close_row(db: Session, session_id: str, closed: Outcome) -> bool:
    """Record the final status of a live row; False if it was final already (or another
    sweeper closed it at the same moment)."""
    row = db.get(SessionRow, session_id)
    if row is None or row.status in events.FINAL_STATUSES:
        return False
    data = {"status": closed.status.value, "error": closed.reason}
    try:
        # The key names the row's state as seen: a second closer of that state adds nothing.
        recorded = events.record(
            db,
            session_id,
            events.EventType.session_status,
            {k: v for k, v in data.items() if v is not None},
            key=f"closed/{row.last_seq}",
        )
    except IntegrityError:
        db.rollback()
        return False
    if recorded is not None:
        log.info("session %s closed as %s: %s", session_id, closed.status, closed.reason)
    return recorded is not None


@dataclass
class SweepReport:
    checked: int = 0
    closed: list[str] = field(default_factory=list)
    # Rows whose workflow could not be described (Temporal unreachable): left for a later pass.
    unknown: list[str] = field(default_factory=list)


class Sweeper:
    """Sweeps the live rows ``batch`` at a time in id order, going round: each pass takes
    the rows after the last one it checked, so every live row is reached however many there
    are. Rows touched within ``grace_s`` are left: a new session's row is written just
    before its workflow starts."""

    def __init__(self, client: Client, engine: Engine, batch: int, grace_s: float) -> None:
        self.client = client
        self.engine = engine
        self.batch = batch
        self.grace_s = grace_s
        self.after = ""

    def _live(self) -> list[str]:
        quiet_since = utcnow() - timedelta(seconds=self.grace_s)
        with Session(self.engine) as db:
            ids = list(
                db.exec(
                    select(SessionRow.id)
                    .where(
                        col(SessionRow.ended_at).is_(None),
                        col(SessionRow.id) > self.after,
                        col(SessionRow.updated_at) <= quiet_since,
                    )
                    .order_by(col(SessionRow.id))
                    .limit(self.batch)
                )
            )
        # A short batch is the end of the round: the next pass starts from the beginning.
        self.after = ids[-1] if len(ids) == self.batch else ""
        return ids

    def _close(self, session_id: str, closed: Outcome) -> bool:
        with Session(self.engine) as db:
            return close_row(db, session_id, closed)

    async def _check(self, session_id: str) -> Outcome | BaseException | None:
        try:
            return await outcome(self.client, session_id)
        except Exception as exc:
            return exc

    async def sweep(self) -> SweepReport:
        """One pass over at most ``batch`` live rows."""
        ids = await asyncio.to_thread(self._live)
        answers = await asyncio.gather(*(self._check(sid) for sid in ids))
        report = SweepReport(checked=len(ids))
        for session_id, answer in zip(ids, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("could not describe session %s's workflow: %r", session_id, answer)
                report.unknown.append(session_id)
            elif answer is not None and await asyncio.to_thread(self._close, session_id, answer):
                report.closed.append(session_id)
        return report

    async def forever(self, every_s: float, stop: asyncio.Event) -> None:
        """Sweep now and then every ``every_s`` until ``stop`` is set; a failed pass (the
        database down) is logged and the next one tries again."""
        while not stop.is_set():
            try:
                report = await self.sweep()
                if report.closed or report.unknown:
                    log.info(
                        "swept %d live sessions: %d closed, %d not described",
                        report.checked, len(report.closed), len(report.unknown),
                    )  # fmt: skip
            except Exception:
                log.exception("sweeping session rows failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
