"""The event log and its projection, on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, inspect
from sqlmodel import Session, col, select

from store import events
from store.models import SessionRow, StepRow, TaskRow, User


def new_session(engine: Engine) -> str:
    with Session(engine) as db:
        user = User(email=f"{uuid.uuid4().hex}@example.com", password_hash="x")
        db.add(user)
        db.flush()
        row = SessionRow(user_id=user.id)
        db.add(row)
        db.commit()
        return row.id


def test_migrations_create_every_table(engine: Engine) -> None:
    tables = set(inspect(engine).get_table_names())
    assert {"users", "sessions", "tasks", "steps", "sandboxes", "events"} <= tables


def test_sequence_numbers_are_per_session_and_gapless_under_concurrency(engine: Engine) -> None:
    first, second = new_session(engine), new_session(engine)

    def append(i: int) -> None:
        with Session(engine) as db:
            events.record(db, first if i % 2 else second, "note", {"i": i})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(append, range(60)))
    with Session(engine) as db:
        for sid in (first, second):
            seqs = [e.seq for e in events.read_after(db, sid, 0)]
            assert seqs == list(range(1, 31))
        assert [e.seq for e in events.read_after(db, first, 25)] == [26, 27, 28, 29, 30]


def test_a_key_makes_a_retried_append_a_no_op(engine: Engine) -> None:
    sid = new_session(engine)
    with Session(engine) as db:
        assert events.record(db, sid, "note", {}, key="run/1") is not None
        assert events.record(db, sid, "note", {}, key="run/1") is None
        assert events.record(db, sid, "note", {}, key="run/2") is not None
        assert [e.seq for e in events.read_after(db, sid, 0)] == [1, 2]


def test_projection_follows_a_task_through_its_life(engine: Engine) -> None:
    sid = new_session(engine)
    step = {"kind": "terminal", "command": "echo hi"}
    with Session(engine) as db:
        events.record(db, sid, "session.status", {"status": "busy"})
        events.record(db, sid, "task.queued", {"task_id": "t1", "prompt": "$ echo hi"})
        events.record(db, sid, "task.plan", {"task_id": "t1", "first": 0, "steps": [step, step]})
        events.record(db, sid, "step.started", {"task_id": "t1", "index": 0, "step": step})
        events.record(
            db,
            sid,
            "step.output",
            {"task_id": "t1", "index": 0, "stream": "stdout", "text": "hi\n"},
        )
        events.record(
            db,
            sid,
            "step.finished",
            {"task_id": "t1", "index": 0, "status": "failed", "exit_code": 3},
        )
        events.record(
            db, sid, "task.status", {"task_id": "t1", "status": "failed", "error": "boom"}
        )
        db.expire_all()
        assert db.get(SessionRow, sid).status == "busy"  # type: ignore[union-attr]
        task = db.get(TaskRow, "t1")
        assert task is not None and task.status == "failed" and task.error == "boom"
        steps = db.exec(
            select(StepRow).where(StepRow.task_id == "t1").order_by(col(StepRow.index))
        ).all()
        assert [(s.status, s.exit_code, s.output) for s in steps] == [
            ("failed", 3, "hi\n"),
            ("skipped", None, ""),
        ]


def test_a_revised_plan_replaces_only_the_tail(engine: Engine) -> None:
    sid = new_session(engine)
    with Session(engine) as db:
        events.record(db, sid, "task.queued", {"task_id": "t2", "prompt": "p"})
        plan = [{"kind": "terminal", "command": c} for c in ("a", "b", "c")]
        events.record(db, sid, "task.plan", {"task_id": "t2", "steps": plan})
        events.record(
            db,
            sid,
            "task.plan",
            {"task_id": "t2", "first": 1, "steps": [{"kind": "terminal", "command": "z"}]},
        )
        steps = db.exec(
            select(StepRow).where(StepRow.task_id == "t2").order_by(col(StepRow.index))
        ).all()
        assert [s.spec["command"] for s in steps] == ["a", "z"]


def test_events_of_an_unknown_session_are_refused(engine: Engine) -> None:
    with Session(engine) as db, pytest.raises(LookupError):
        events.record(db, "nope", "note", {})
