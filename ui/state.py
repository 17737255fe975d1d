"""What a dashboard page shows, read from the database in one snapshot.

A page is drawn from the projections (sessions, tasks, steps, artifacts) and the tail of the
event log, all as of one event number, ``seq``; its live stream then starts after ``seq``,
so a reload shows no gap and no duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from config.settings import Settings
from store.db import snapshot
from store.events import EventType
from store.models import ArtifactRow, Event, LLMCall, SandboxRow, SessionRow, StepRow, TaskRow
from workflows.client import workflow_id

# Terminal events (commands, output, exits) drawn on a page load: its scrollback.
TERMINAL_EVENTS = 400
TERMINAL_TYPES = (EventType.step_started, EventType.step_output, EventType.step_finished)
TIMELINE_EVENTS = 100
SCREENSHOTS = 24


@dataclass
class SpendSummary:
    calls: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class TaskView:
    task: TaskRow
    steps: list[StepRow]


@dataclass
class SessionView:
    session: SessionRow
    seq: int
    tasks: list[TaskView]
    terminal: list[Event]
    timeline: list[Event]
    screenshots: list[ArtifactRow]
    sandbox: SandboxRow | None
    usage: SpendSummary = field(default_factory=SpendSummary)
    # A fork's history inherited from its parent, up to the checkpoint (read-only).
    inherited: list[Event] = field(default_factory=list)
    # Sessions forked from this one's checkpoints.
    forks: list[SessionRow] = field(default_factory=list)


def usage_by_session(db: Session, session_ids: list[str]) -> dict[str, SpendSummary]:
    """Model calls, tokens and cost of each session."""
    if not session_ids:
        return {}
    tokens = col(LLMCall.prompt_tokens) + col(LLMCall.completion_tokens)
    query = (
        select(LLMCall.session_id, func.count(), func.sum(tokens), func.sum(col(LLMCall.cost_usd)))
        .where(col(LLMCall.session_id).in_(session_ids))
        .group_by(col(LLMCall.session_id))
    )
    return {
        sid: SpendSummary(calls, int(spent or 0), float(cost or 0.0))
        for sid, calls, spent, cost in db.exec(query)
        if sid is not None
    }


def task_counts(db: Session, session_ids: list[str]) -> dict[str, int]:
    if not session_ids:
        return {}
    query = (
        select(TaskRow.session_id, func.count())
        .where(col(TaskRow.session_id).in_(session_ids))
        .group_by(col(TaskRow.session_id))
    )
    return {sid: count for sid, count in db.exec(query)}


def _events(
    db: Session, session_id: str, seq: int, limit: int, only: Sequence[str] = (), but: str = ""
) -> list[Event]:
    """The session's newest ``limit`` events up to ``seq``, oldest first: those of types
    ``only`` if given, and not of type ``but``."""
    query = select(Event).where(Event.session_id == session_id, col(Event.seq) <= seq)
    if only:
        query = query.where(col(Event.type).in_(only))
    if but:
        query = query.where(Event.type != but)
    newest = db.exec(query.order_by(col(Event.seq).desc()).limit(limit))
    return list(reversed(list(newest)))


def session_view(engine: Engine, session_id: str) -> SessionView | None:
    with snapshot(engine) as db:
        row = db.get(SessionRow, session_id)
        if row is None:
            return None
        tasks = list(
            db.exec(
                select(TaskRow)
                .where(TaskRow.session_id == session_id)
                .order_by(col(TaskRow.created_at).desc(), col(TaskRow.id).desc())
            )
        )
        steps: dict[str, list[StepRow]] = {t.id: [] for t in tasks}
        if tasks:
            query = (
                select(StepRow)
                .where(col(StepRow.task_id).in_(list(steps)))
                .order_by(col(StepRow.index))
            )
            for step in db.exec(query):
                steps[step.task_id].append(step)
        shots = db.exec(
            select(ArtifactRow)
            .where(ArtifactRow.session_id == session_id)
            .order_by(col(ArtifactRow.created_at).desc(), col(ArtifactRow.id).desc())
            .limit(SCREENSHOTS)
        )
        return SessionView(
            session=row,
            seq=row.last_seq,
            tasks=[TaskView(t, steps[t.id]) for t in tasks],
            terminal=_events(db, session_id, row.last_seq, TERMINAL_EVENTS, only=TERMINAL_TYPES),
            timeline=_events(
                db, session_id, row.last_seq, TIMELINE_EVENTS, but=EventType.step_output
            ),
            screenshots=list(shots),
            sandbox=current_sandbox(db, session_id),
            usage=usage_by_session(db, [session_id]).get(session_id, SpendSummary()),
            inherited=inherited(db, row),
            forks=list(db.exec(select(SessionRow).where(SessionRow.parent_id == session_id))),
        )


def inherited(db: Session, row: SessionRow) -> list[Event]:
    """A fork's parent's timeline up to the checkpoint it was forked from."""
    if row.parent_id is None:
        return []
    # Its first event (session.forked_from) names the parent's event the checkpoint was.
    first = db.exec(select(Event).where(Event.session_id == row.id, Event.seq == 1)).first()
    seq = first.data.get("seq", 0) if first else 0
    return _events(db, row.parent_id, seq, TIMELINE_EVENTS, but=EventType.step_output)


@dataclass
class MachineView:
    """What the machine panel shows, which it redraws every few seconds: no more is read."""

    session: SessionRow
    sandbox: SandboxRow | None
    usage: SpendSummary


def machine_view(engine: Engine, session_id: str) -> MachineView | None:
    with Session(engine) as db:
        row = db.get(SessionRow, session_id)
        if row is None:
            return None
        usage = usage_by_session(db, [session_id]).get(session_id, SpendSummary())
        return MachineView(row, current_sandbox(db, session_id), usage)


def current_sandbox(db: Session, session_id: str) -> SandboxRow | None:
    """The session's newest machine."""
    query = (
        select(SandboxRow)
        .where(SandboxRow.session_id == session_id)
        .order_by(col(SandboxRow.created_at).desc())
    )
    return db.exec(query).first()


def workflow_url(settings: Settings, session_id: str) -> str:
    """A session's workflow in the Temporal Web UI."""
    namespace = quote(settings.temporal_namespace, safe="")
    return f"{settings.temporal_ui_base}/namespaces/{namespace}/workflows/" + quote(
        workflow_id(session_id), safe=""
    )


def duration(seconds: float | None, units: int = 2) -> str:
    """Seconds as a person says them, in at most ``units`` units: 600 is "10 min", 90000
    "1 d 1 h"."""
    if seconds is None:
        return "never"
    left, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size} {unit}")
            left %= size
    return " ".join(parts[:units]) or "0 s"


def age(moment: datetime, now: datetime) -> str:
    """'5 s', '3 min', '2 h', '4 d': how long ago, shortly."""
    # SQLite gives back naive datetimes; they are UTC like every time the store writes.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return duration(max(0.0, (now - moment).total_seconds()), units=1)
