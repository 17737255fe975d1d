"""The append-only event log of a session, and the read model it keeps up to date.

Every change of a session's state is written as one event; ``record`` appends it with the
session's next sequence number and applies it to the ``sessions``/``tasks``/``steps``/
``sandboxes`` rows in the same transaction, so the log and the rows never disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from store.models import (
    Event,
    SandboxRow,
    SessionRow,
    SessionStatus,
    StepRow,
    StepStatus,
    TaskRow,
    TaskStatus,
    utcnow,
)

OUTPUT_TAIL_CHARS = 64 * 1024


def record(
    db: Session, session_id: str, type: str, data: dict[str, Any], key: str | None = None
) -> Event | None:
    """Append an event and project it. Returns None when ``key`` was recorded before."""
    if key is not None:
        seen = db.exec(
            select(Event.id).where(Event.session_id == session_id, Event.key == key)
        ).first()
        if seen is not None:
            return None
    # The UPDATE takes the session row's write lock, so concurrent writers queue here
    # and each gets the next number.
    seq = db.execute(
        update(SessionRow)
        .where(col(SessionRow.id) == session_id)
        .values(last_seq=col(SessionRow.last_seq) + 1, updated_at=utcnow())
        .returning(col(SessionRow.last_seq))
    ).scalar_one_or_none()
    if seq is None:
        raise LookupError(f"no session {session_id}")
    event = Event(session_id=session_id, seq=seq, type=type, data=data, key=key)
    db.add(event)
    projector = _PROJECTIONS.get(type)
    if projector is not None:
        projector(db, event)
    db.commit()
    db.refresh(event)
    return event


def read_after(db: Session, session_id: str, after: int, limit: int = 500) -> list[Event]:
    rows = db.exec(
        select(Event)
        .where(Event.session_id == session_id, Event.seq > after)
        .order_by(col(Event.seq))
        .limit(limit)
    )
    return list(rows)


def _session(db: Session, event: Event) -> SessionRow:
    row = db.get(SessionRow, event.session_id)
    assert row is not None  # record() bumped its counter a moment ago
    return row


def _task(db: Session, event: Event) -> TaskRow:
    row = db.get(TaskRow, event.data["task_id"])
    if row is None or row.session_id != event.session_id:
        raise LookupError(f"no task {event.data['task_id']} in session {event.session_id}")
    return row


def _step(db: Session, event: Event) -> StepRow:
    row = db.exec(
        select(StepRow).where(
            StepRow.task_id == event.data["task_id"], StepRow.index == event.data["index"]
        )
    ).first()
    if row is None:
        raise LookupError(f"no step {event.data['index']} of task {event.data['task_id']}")
    return row


def _session_status(db: Session, event: Event) -> None:
    row = _session(db, event)
    row.status = SessionStatus(event.data["status"])
    row.error = event.data.get("error")
    if row.status in (SessionStatus.ended, SessionStatus.failed):
        row.ended_at = event.created_at
    db.add(row)


def _sandbox_ready(db: Session, event: Event) -> None:
    d = event.data
    db.add(
        SandboxRow(
            id=d["sandbox_id"],
            session_id=event.session_id,
            provider=d["provider"],
            host_id=d["host_id"],
            template=d["template"],
            handle=d["handle"],
        )
    )


def _sandbox_destroyed(db: Session, event: Event) -> None:
    row = db.get(SandboxRow, event.data["sandbox_id"])
    if row is not None:
        row.status = "destroyed"
        row.destroyed_at = event.created_at
        db.add(row)


def _task_queued(db: Session, event: Event) -> None:
    db.add(
        TaskRow(id=event.data["task_id"], session_id=event.session_id, prompt=event.data["prompt"])
    )


def _task_status(db: Session, event: Event) -> None:
    row = _task(db, event)
    row.status = TaskStatus(event.data["status"])
    row.error = event.data.get("error", row.error)
    row.result = event.data.get("result", row.result)
    row.updated_at = event.created_at
    db.add(row)
    if row.status in (TaskStatus.failed, TaskStatus.cancelled):
        # Whatever had not run by the end never will.
        for step in db.exec(
            select(StepRow).where(
                StepRow.task_id == row.id, col(StepRow.status) == StepStatus.pending
            )
        ):
            step.status = StepStatus.skipped
            db.add(step)


def _task_plan(db: Session, event: Event) -> None:
    """A plan, or a revised tail of one: steps from ``first`` on are replaced."""
    task = _task(db, event)
    first = event.data.get("first", 0)
    for old in db.exec(
        select(StepRow).where(StepRow.task_id == task.id, col(StepRow.index) >= first)
    ):
        db.delete(old)
    db.flush()
    for offset, step in enumerate(event.data["steps"]):
        db.add(
            StepRow(
                task_id=task.id,
                index=first + offset,
                kind=step["kind"],
                spec=step,
            )
        )


def _step_started(db: Session, event: Event) -> None:
    row = _step(db, event)
    row.status = StepStatus.running
    row.started_at = event.created_at
    row.output = ""
    db.add(row)


def _step_output(db: Session, event: Event) -> None:
    row = _step(db, event)
    row.output = (row.output + event.data["text"])[-OUTPUT_TAIL_CHARS:]
    db.add(row)


def _step_finished(db: Session, event: Event) -> None:
    row = _step(db, event)
    row.status = StepStatus(event.data["status"])
    row.exit_code = event.data.get("exit_code")
    row.error = event.data.get("error")
    row.finished_at = event.created_at
    db.add(row)


_PROJECTIONS: dict[str, Callable[[Session, Event], None]] = {
    "session.status": _session_status,
    "sandbox.ready": _sandbox_ready,
    "sandbox.destroyed": _sandbox_destroyed,
    "task.queued": _task_queued,
    "task.status": _task_status,
    "task.plan": _task_plan,
    "step.started": _step_started,
    "step.output": _step_output,
    "step.finished": _step_finished,
}


def as_json(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "type": event.type,
        "data": event.data,
        "at": event.created_at.isoformat(),
    }
