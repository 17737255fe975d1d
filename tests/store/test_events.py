"""The event log and its projection, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect
from sqlmodel import Session, SQLModel, col, select

from api.events import JSON_MESSAGES, follow
from store import events
from store.events import EventType, OutputLine
from store.models import SessionRow, StepRow, TaskRow, TaskStatus, User
from store.notify import Hub
from workflows.keys import EventKeys


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


def test_the_migrations_make_the_schema_the_models_say(engine: Engine) -> None:
    """Tables, columns and indexes of store/models.py all have their migration (several
    branches add migrations side by side: one missed is found here, not in production).
    SQLite stores every integer alike, so types are compared on PostgreSQL only."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": not sqlite})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_sequence_numbers_are_per_session_and_gapless_under_concurrency(engine: Engine) -> None:
    first, second = new_session(engine), new_session(engine)

    def append(i: int) -> None:
        with Session(engine) as db:
            events.record(db, first if i % 2 else second, EventType.task_modified, {"i": i})

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
        assert events.record(db, sid, EventType.task_modified, {}, key="run/1") is not None
        assert events.record(db, sid, EventType.task_modified, {}, key="run/1") is None
        assert events.record(db, sid, EventType.task_modified, {}, key="run/2") is not None
        assert [e.seq for e in events.read_after(db, sid, 0)] == [1, 2]


def test_a_retried_workflow_task_records_the_events_its_lost_attempt_did_not(
    engine: Engine,
) -> None:
    """A workflow task's progress is written before the task is done. Its attempt lost (a
    worker under load), the retry may say other events first (an update, a timer in another
    order): they must be written, not taken for the lost attempt's, and the lost attempt's
    own events said again are skipped. Keyed by count, the retry's task.queued was skipped,
    and its task's every later event failed for good: no task ... in session ..."""
    sid = new_session(engine)
    lost, retry = EventKeys("run"), EventKeys("run")

    def draft(keys: EventKeys, type: EventType, **data: str) -> events.NewEvent:
        return events.NewEvent(type=type, data=data, key=keys.key(type, data))

    with Session(engine) as db:
        events.append(db, sid, [draft(lost, EventType.session_status, status="waking")])
        events.append(db, sid, [draft(lost, EventType.task_queued, task_id="t1", prompt="a")])
    with Session(engine) as db:
        queued = draft(retry, EventType.task_queued, task_id="t2", prompt="b")
        assert len(events.append(db, sid, [queued])) == 1
        # The lost attempt's uuid given to another submission: the same id, another prompt.
        again = draft(retry, EventType.task_queued, task_id="t1", prompt="c")
        assert len(events.append(db, sid, [again])) == 1
        planning = draft(retry, EventType.task_status, task_id="t2", status="planning")
        waking = draft(retry, EventType.session_status, status="waking")
        # The lost attempt's status said again is skipped; the task's status is projected.
        assert [e.type for e in events.append(db, sid, [waking, planning])] == ["task.status"]
        tasks = {t.id: (t.prompt, t.status) for t in db.exec(select(TaskRow))}
        assert tasks == {"t1": ("c", TaskStatus.queued), "t2": ("b", TaskStatus.planning)}


def test_projection_follows_a_task_through_its_life(engine: Engine) -> None:
    sid = new_session(engine)
    step = {"kind": "terminal", "command": "echo hi"}
    with Session(engine) as db:
        events.record(db, sid, EventType.session_status, {"status": "busy"})
        events.record(db, sid, EventType.task_queued, {"task_id": "t1", "prompt": "$ echo hi"})
        events.record(
            db, sid, EventType.task_plan, {"task_id": "t1", "first": 0, "steps": [step, step]}
        )
        events.record(db, sid, EventType.step_started, {"task_id": "t1", "index": 0, "step": step})
        events.append_output(db, sid, "t1", 0, [OutputLine(1, "stdout", "hi\n")])
        events.record(
            db,
            sid,
            EventType.step_finished,
            {"task_id": "t1", "index": 0, "status": "failed", "exit_code": 3},
        )
        events.record(
            db, sid, EventType.task_status, {"task_id": "t1", "status": "failed", "error": "boom"}
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
        events.record(db, sid, EventType.task_queued, {"task_id": "t2", "prompt": "p"})
        plan = [{"kind": "terminal", "command": c} for c in ("a", "b", "c")]
        events.record(db, sid, EventType.task_plan, {"task_id": "t2", "steps": plan})
        events.record(
            db,
            sid,
            EventType.task_plan,
            {"task_id": "t2", "first": 1, "steps": [{"kind": "terminal", "command": "z"}]},
        )
        steps = db.exec(
            select(StepRow).where(StepRow.task_id == "t2").order_by(col(StepRow.index))
        ).all()
        assert [s.spec["command"] for s in steps] == ["a", "z"]


def test_a_task_the_log_never_queued_gets_its_row(engine: Engine) -> None:
    """A run begun before events were keyed by content may have had its task.queued skipped
    (see the test above): the task's later events make its row, not fail for good."""
    sid = new_session(engine)
    with Session(engine) as db:
        events.record(db, sid, EventType.task_status, {"task_id": "t", "status": "planning"})
        plan = {"task_id": "t", "steps": [{"kind": "terminal", "command": "x"}]}
        events.record(db, sid, EventType.task_plan, plan)
        row = db.get(TaskRow, "t")
        assert row is not None and row.status == TaskStatus.planning
        assert [s.index for s in db.exec(select(StepRow).where(StepRow.task_id == "t"))] == [0]
    other = new_session(engine)
    with Session(engine) as db, pytest.raises(LookupError):  # another session's task
        events.record(db, other, EventType.task_status, {"task_id": "t", "status": "failed"})


def test_events_of_an_unknown_session_are_refused(engine: Engine) -> None:
    with Session(engine) as db, pytest.raises(LookupError):
        events.record(db, "nope", EventType.task_modified, {})


def planned_step(engine: Engine, sid: str, task_id: str = "t") -> None:
    step = {"kind": "terminal", "command": "x"}
    with Session(engine) as db:
        events.record(db, sid, EventType.task_queued, {"task_id": task_id, "prompt": "$ x"})
        events.record(db, sid, EventType.task_plan, {"task_id": task_id, "steps": [step]})


def output_events(engine: Engine, sid: str) -> list[tuple[str, str]]:
    with Session(engine) as db:
        return [
            (e.data["stream"], e.data["text"])
            for e in events.read_after(db, sid, 0)
            if e.type == EventType.step_output
        ]


def test_output_is_stored_once_across_overlapping_attempts(engine: Engine) -> None:
    sid = new_session(engine)
    planned_step(engine, sid)
    lines = [OutputLine(n, "stderr" if n == 3 else "stdout", f"{n}\n") for n in range(1, 7)]
    with Session(engine) as db:
        assert events.append_output(db, sid, "t", 0, lines[:4]) == 4
        # A retried attempt whose guest replays from an older point: only 5 and 6 are new.
        assert events.append_output(db, sid, "t", 0, lines[1:]) == 6
        assert events.append_output(db, sid, "t", 0, lines[2:5]) == 6
        assert events.stored_output_seq(db, "t", 0) == 6
    # One event per run of a stream, per batch.
    assert output_events(engine, sid) == [
        ("stdout", "1\n2\n"), ("stderr", "3\n"), ("stdout", "4\n"), ("stdout", "5\n6\n"),
    ]  # fmt: skip


def test_output_past_the_cap_is_counted_and_its_tail_kept(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "OUTPUT_CAP_CHARS", 10)
    monkeypatch.setattr(events, "OUTPUT_TAIL_CHARS", 8)
    sid = new_session(engine)
    planned_step(engine, sid)
    data = {"task_id": "t", "index": 0, "status": "succeeded", "exit_code": 0}
    with Session(engine) as db:
        events.append_output(db, sid, "t", 0, [OutputLine(1, "stdout", "abcdefgh\n")])
        events.append_output(db, sid, "t", 0, [OutputLine(2, "stdout", "ijklmnop\n")])
        events.append_output(db, sid, "t", 0, [OutputLine(3, "stdout", "qrstuvwx\n")])
        events.finish_step(db, sid, data, key="step/t/0/finished")
        events.finish_step(db, sid, data, key="step/t/0/finished")  # a retry: no-op
        step = db.exec(select(StepRow).where(StepRow.task_id == "t")).one()
        assert (step.output_chars, step.dropped_chars) == (10, 17)
        assert [e.type for e in events.read_after(db, sid, 0)][-4:] == [
            *[EventType.step_output] * 3,
            EventType.step_finished,
        ]
    stored = output_events(engine, sid)
    assert stored[:2] == [("stdout", "abcdefgh\n"), ("stdout", "i")]  # the first ten
    assert stored[2][0] == "note" and "17 characters of output past the first 10" in stored[2][1]
    assert stored[3] == ("stdout", "rstuvwx\n")  # the last eight


async def test_a_commit_wakes_the_sessions_followers_at_once(engine: Engine) -> None:
    sid, other = new_session(engine), new_session(engine)
    hub = Hub(engine)
    await hub.start()
    try:
        with hub.watch(sid) as bell, hub.watch(other) as other_bell:
            await asyncio.sleep(0.2)  # PostgreSQL: the LISTEN is in place
            bell.clear()
            other_bell.clear()
            started = time.monotonic()
            with Session(engine) as db:
                events.record(db, sid, EventType.task_modified, {})
            await asyncio.wait_for(bell.wait(), 5)
            assert time.monotonic() - started < 1.0
            assert not other_bell.is_set()
    finally:
        await hub.stop()


async def test_a_resumed_sessions_stream_goes_past_its_earlier_end(engine: Engine) -> None:
    sid = new_session(engine)
    with Session(engine) as db:
        for status in ("ready", "ended", "provisioning", "ready", "ended"):  # ended, resumed
            events.record(db, sid, EventType.session_status, {"status": status})
    hub = Hub(engine)
    await hub.start()
    try:
        messages = [
            chunk async for chunk in follow(engine, hub, sid, 0, JSON_MESSAGES, lifetime_s=30)
        ]
    finally:
        await hub.stop()
    # Every event, up to the log's own end, where the stream ends by itself.
    ids = [line for chunk in messages for line in chunk.splitlines() if line.startswith("id:")]
    assert ids == [f"id: {seq}" for seq in range(1, 6)]
