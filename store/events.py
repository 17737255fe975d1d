"""The append-only event log of a session, and the read model it keeps up to date.

Every change of a session's state is written as one event; ``record`` appends it with the
session's next sequence number and applies it to the ``sessions``/``tasks``/``steps``/
``sandboxes`` rows in the same transaction, so the log and the rows never disagree.

An event's type is one of ``EventType``: the values are stored in every database and in the
workflows' recorded histories, so a value never changes once written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import BaseModel, Field
from sqlalchemy import update
from sqlmodel import Session, col, select

from store import notify, webhooks
from store.models import (
    CheckpointRow,
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

log = logging.getLogger("berth.events")

FINAL_STATUSES = (SessionStatus.ended, SessionStatus.failed)

# The step row keeps the newest output for quick display; the log keeps it as events up to
# a cap per step, past which lines are counted and only the tail is kept.
OUTPUT_TAIL_CHARS = 64 * 1024
OUTPUT_CAP_CHARS = 1024 * 1024


class EventType(StrEnum):
    """Every kind of event a session's log holds. A member's name is its value with an
    underscore for the dot (the dashboard draws each by the macro of that name)."""

    session_status = "session.status"
    sandbox_ready = "sandbox.ready"
    sandbox_destroyed = "sandbox.destroyed"
    # Left for the host's reconciliation: destroying it failed.
    sandbox_orphaned = "sandbox.orphaned"
    sandbox_died = "sandbox.died"
    sandbox_hibernated = "sandbox.hibernated"
    sandbox_hibernation_failed = "sandbox.hibernation_failed"
    sandbox_woken = "sandbox.woken"
    sandbox_preserved = "sandbox.preserved"
    sandbox_preserve_failed = "sandbox.preserve_failed"
    sandbox_restored = "sandbox.restored"
    # A kept disk removed by its host past the age limit (BERTH_KEPT_MAX_AGE_DAYS).
    sandbox_kept_expired = "sandbox.kept_expired"
    task_queued = "task.queued"
    task_status = "task.status"
    task_plan = "task.plan"
    task_modified = "task.modified"
    task_verified = "task.verified"
    step_started = "step.started"
    step_output = "step.output"
    step_finished = "step.finished"
    # Checkpoints, rollback and forks (a checkpoint's row is projected from its events).
    checkpoint_created = "checkpoint.created"
    checkpoint_deleted = "checkpoint.deleted"
    session_rolled_back = "session.rolled_back"
    session_forked_from = "session.forked_from"
    # Fleet (issue 18): the host a session was placed on and why; its host lost, its
    # machine's files with it (unless preserved), and the session going on elsewhere.
    session_placed = "session.placed"
    host_lost = "host.lost"


class NewEvent(BaseModel):
    """An event to append. ``key`` is set by writers that may retry (Temporal activities),
    so a retry appends nothing twice."""

    type: EventType
    data: dict[str, Any] = Field(default_factory=dict)
    key: str | None = None


class OutputLine(NamedTuple):
    seq: int  # the guest's per-command sequence number
    stream: str
    text: str


def record(
    db: Session, session_id: str, type: EventType, data: dict[str, Any], key: str | None = None
) -> Event | None:
    """Append one event and project it. Returns None when ``key`` was recorded before."""
    appended = append(db, session_id, [NewEvent(type=type, data=data, key=key)])
    return appended[0] if appended else None


def append(db: Session, session_id: str, drafts: Sequence[NewEvent]) -> list[Event]:
    """Append events in one transaction, skipping those whose key was recorded before."""
    keys = [d.key for d in drafts if d.key is not None]
    seen = (
        set(
            db.exec(
                select(Event.key).where(Event.session_id == session_id, col(Event.key).in_(keys))
            )
        )
        if keys
        else set()
    )
    fresh = [d for d in drafts if d.key is None or d.key not in seen]
    if not fresh:
        return []
    first = _take_seqs(db, session_id, len(fresh))
    appended = [_add(db, session_id, first + n, d) for n, d in enumerate(fresh)]
    webhooks.enqueue(db, session_id, appended)  # in the same transaction: the outbox
    notify.commit(db, session_id)
    for event in appended:
        db.refresh(event)
    return appended


def append_output(
    db: Session, session_id: str, task_id: str, index: int, lines: Sequence[OutputLine]
) -> int:
    """Store a step's output lines once each, in guest order, up to the per-step cap.

    Lines at or below the step's stored sequence number were stored by an earlier attempt
    and are skipped. Returns the step's stored sequence number afterwards.
    """
    # Locked (on PostgreSQL), so two attempts writing at once cannot both take a line.
    step = _find_step(db, task_id, index, for_update=True)
    fresh = [line for line in lines if line.seq > step.output_seq]
    if not fresh:
        return step.output_seq
    room = max(0, OUTPUT_CAP_CHARS - step.output_chars)
    runs: list[list[str]] = []  # [stream, text]: one event per run of one stream
    for line in fresh:
        kept = line.text[:room]
        room -= len(kept)
        step.output_chars += len(kept)
        step.dropped_chars += len(line.text) - len(kept)
        if kept and runs and runs[-1][0] == line.stream:
            runs[-1][1] += kept
        elif kept:
            runs.append([line.stream, kept])
    step.output_seq = fresh[-1].seq
    step.output = (step.output + "".join(line.text for line in fresh))[-OUTPUT_TAIL_CHARS:]
    db.add(step)
    base = {"task_id": task_id, "index": index}
    drafts = [
        NewEvent(type=EventType.step_output, data={**base, "stream": stream, "text": text})
        for stream, text in runs
    ]
    if drafts:
        first = _take_seqs(db, session_id, len(drafts))
        for n, draft in enumerate(drafts):
            _add(db, session_id, first + n, draft)
    notify.commit(db, session_id)
    return step.output_seq


def finish_step(db: Session, session_id: str, data: dict[str, Any], key: str) -> None:
    """Record ``step.finished`` once; if output was dropped, first a note saying how much,
    with the tail of what was dropped."""
    step = _find_step(db, data["task_id"], data["index"])
    drafts: list[NewEvent] = []
    if step.dropped_chars:
        tail = step.output[-min(step.dropped_chars, OUTPUT_TAIL_CHARS) :]
        note = (
            f"\n[{step.dropped_chars} characters of output past the first {step.output_chars}"
            f" were not kept; the last {len(tail)} follow]\n"
        )
        base = {"task_id": step.task_id, "index": step.index}
        drafts = [
            NewEvent(
                type=EventType.step_output, data={**base, "stream": stream, "text": text}, key=part
            )
            for stream, text, part in (
                ("note", note, f"{key}/note"),
                ("stdout", tail, f"{key}/tail"),
            )
        ]
    append(db, session_id, [*drafts, NewEvent(type=EventType.step_finished, data=data, key=key)])


def stored_output_seq(db: Session, task_id: str, index: int) -> int:
    return _find_step(db, task_id, index).output_seq


def _take_seqs(db: Session, session_id: str, count: int) -> int:
    """Reserve ``count`` sequence numbers; returns the first. The UPDATE takes the session
    row's write lock, so concurrent writers queue here and numbers stay gapless."""
    last = db.execute(
        update(SessionRow)
        .where(col(SessionRow.id) == session_id)
        .values(last_seq=col(SessionRow.last_seq) + count, updated_at=utcnow())
        .returning(col(SessionRow.last_seq))
    ).scalar_one_or_none()
    if last is None:
        raise LookupError(f"no session {session_id}")
    return int(last) - count + 1


def _add(db: Session, session_id: str, seq: int, draft: NewEvent) -> Event:
    event = Event(session_id=session_id, seq=seq, type=draft.type, data=draft.data, key=draft.key)
    db.add(event)
    projector = _PROJECTIONS.get(draft.type)
    if projector is not None:
        projector(db, event)
        db.flush()  # the next event's projection may read what this one wrote
    return event


def read_after(db: Session, session_id: str, after: int, limit: int = 500) -> list[Event]:
    rows = db.exec(
        select(Event)
        .where(Event.session_id == session_id, Event.seq > after)
        .order_by(col(Event.seq))
        .limit(limit)
    )
    return list(rows)


def is_final(event: Event) -> bool:
    """Whether nothing can follow this event in its session's log."""
    return event.type == EventType.session_status and event.data.get("status") in FINAL_STATUSES


def _session(db: Session, event: Event) -> SessionRow:
    row = db.get(SessionRow, event.session_id)
    assert row is not None  # record() bumped its counter a moment ago
    return row


def _task(db: Session, event: Event) -> TaskRow:
    task_id = event.data["task_id"]
    row = db.get(TaskRow, task_id)
    if row is None:
        # Its task.queued was skipped as another's (a run keyed by count: see
        # workflows/keys.py): refused, the batch would fail at every retry and the session
        # never go on. Its row is made now, its prompt unknown.
        log.warning("task %s of session %s was never queued in the log", task_id, event.session_id)
        row = TaskRow(id=task_id, session_id=event.session_id, prompt="")
        db.add(row)
        db.flush()
    if row.session_id != event.session_id:
        raise LookupError(f"no task {task_id} in session {event.session_id}")
    return row


def _find_step(db: Session, task_id: str, index: int, for_update: bool = False) -> StepRow:
    query = select(StepRow).where(StepRow.task_id == task_id, StepRow.index == index)
    row = db.exec(query.with_for_update() if for_update else query).first()
    if row is None:
        raise LookupError(f"no step {index} of task {task_id}")
    return row


def _step(db: Session, event: Event) -> StepRow:
    return _find_step(db, event.data["task_id"], event.data["index"])


def _session_status(db: Session, event: Event) -> None:
    row = _session(db, event)
    row.status = SessionStatus(event.data["status"])
    row.error = event.data.get("error")
    # A resumed session lives again.
    row.ended_at = event.created_at if row.status in FINAL_STATUSES else None
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


def _host_lost(db: Session, event: Event) -> None:
    """The sandbox's host was lost with its machine: not the host's to watch any more (nor
    a session to tell of it again); the host removes the machine if it comes back."""
    row = db.get(SandboxRow, event.data["sandbox_id"])
    if row is not None:
        row.status = "lost"
        row.destroyed_at = event.created_at
        db.add(row)


def _sandbox_preserved(db: Session, event: Event) -> None:
    """The session ended keeping its sandbox's disk: it may be resumed."""
    row = db.get(SandboxRow, event.data["sandbox_id"])
    if row is not None:
        row.status = "preserved"
        row.destroyed_at = event.created_at
        db.add(row)
    session = _session(db, event)
    session.preserved = True
    db.add(session)


def _sandbox_restored(db: Session, event: Event) -> None:
    """A resumed session's new sandbox has the preserved disk, which is no longer kept."""
    _no_longer_kept(db, event, event.data["preserved_id"], "restored")


def _sandbox_kept_expired(db: Session, event: Event) -> None:
    """The kept disk is gone: the session can no longer be resumed."""
    _no_longer_kept(db, event, event.data["sandbox_id"], "expired")


def _no_longer_kept(db: Session, event: Event, sandbox_id: str, status: str) -> None:
    row = db.get(SandboxRow, sandbox_id)
    if row is not None:
        row.status = status
        db.add(row)
    session = _session(db, event)
    session.preserved = False
    db.add(session)


def _task_queued(db: Session, event: Event) -> None:
    row = db.get(TaskRow, event.data["task_id"])
    if row is not None and row.session_id == event.session_id:
        # Queued by a workflow task whose attempt was lost (see workflows/keys.py): its
        # retry gave the id to this task, which is the one the session runs.
        row.prompt, row.status = event.data["prompt"], TaskStatus.queued
        row.result = row.error = None
        db.add(row)
        return
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
    revised = event.data.get("revised")
    for offset, step in enumerate(event.data["steps"]):
        db.add(
            StepRow(
                task_id=task.id,
                index=first + offset,
                kind=step["kind"],
                spec=step,
                revised=revised if offset == 0 else None,
            )
        )


def _step_started(db: Session, event: Event) -> None:
    row = _step(db, event)
    row.status = StepStatus.running
    row.started_at = event.created_at
    row.output = ""
    db.add(row)


def _step_finished(db: Session, event: Event) -> None:
    row = _step(db, event)
    row.status = StepStatus(event.data["status"])
    row.exit_code = event.data.get("exit_code")
    row.error = event.data.get("error")
    row.check_result = event.data.get("check")
    row.result = event.data.get("result")
    row.artifacts = event.data.get("artifacts")
    row.finished_at = event.created_at
    db.add(row)


def _checkpoint_created(db: Session, event: Event) -> None:
    data = event.data
    session = _session(db, event)
    db.add(
        CheckpointRow(
            id=data["checkpoint_id"], session_id=event.session_id, user_id=session.user_id,
            label=data.get("label"), memory=data.get("memory", False),
            task_queue=data["sandbox"]["task_queue"], sandbox=data["sandbox"],
            size_bytes=data.get("size_bytes", 0), seq=event.seq, state=data.get("state", {}),
            created_at=event.created_at,
        )
    )  # fmt: skip


def _checkpoint_deleted(db: Session, event: Event) -> None:
    row = db.get(CheckpointRow, event.data["checkpoint_id"])
    if row is not None:
        db.delete(row)


def _session_rolled_back(db: Session, event: Event) -> None:
    """The tasks run after the checkpoint: their effects on the machine were undone."""
    ids = event.data.get("tasks", [])
    if ids:
        db.execute(update(TaskRow).where(col(TaskRow.id).in_(ids)).values(rolled_back=True))


_PROJECTIONS: dict[EventType, Callable[[Session, Event], None]] = {
    EventType.session_status: _session_status,
    EventType.sandbox_ready: _sandbox_ready,
    EventType.sandbox_destroyed: _sandbox_destroyed,
    EventType.sandbox_preserved: _sandbox_preserved,
    EventType.sandbox_restored: _sandbox_restored,
    EventType.sandbox_kept_expired: _sandbox_kept_expired,
    EventType.task_queued: _task_queued,
    EventType.task_status: _task_status,
    EventType.task_plan: _task_plan,
    EventType.step_started: _step_started,
    EventType.step_finished: _step_finished,
    EventType.checkpoint_created: _checkpoint_created,
    EventType.checkpoint_deleted: _checkpoint_deleted,
    EventType.session_rolled_back: _session_rolled_back,
    EventType.host_lost: _host_lost,
}


def as_json(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "type": event.type,
        "data": event.data,
        "at": event.created_at.isoformat(),
    }
