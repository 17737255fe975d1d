"""RunStep, the activity, against a real guest agent over a real WebSocket and a real event
log: a step's command is killed only when the workflow asks, a retried attempt re-attaches
to it, and its output is stored once."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select
from temporalio.activity import ActivityCancellationDetails
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import sandbox as sandbox_activities
from activities.models import StepRequest
from activities.sandbox import GUEST_UNAVAILABLE_ATTEMPTS, SandboxActivities, StepRecorder
from guest_agent.chromium import chromium_path
from sandboxes.gateway import GuestGateway
from sandboxes.models import (
    BrowserStep,
    Check,
    Machine,
    SandboxInfo,
    Step,
    StepOutcome,
    TerminalStep,
)
from sandboxes.provider import SandboxHost, SandboxProvider
from store import events
from store.artifacts import ArtifactStore
from store.db import get_engine, migrate
from store.events import EventType, OutputLine
from store.models import ArtifactRow, StepRow
from tests.guest_agent.test_agent import KEY, guest_link
from tests.guest_agent.test_browser import serve_pages
from tests.store.test_events import new_session
from tests.support.local import python_script
from workflows.options import STEP_ATTEMPTS

COUNT = python_script(
    "count.py",
    "import time",
    "for i in range(1, 16):",
    '    print("line", i, flush=True)',
    "    time.sleep(0.1)",
)
EXPECTED = "".join(f"line {i}\n" for i in range(1, 16))


class LinkOnly(SandboxProvider):
    """A provider whose machine is the test's guest agent: only the gateway is used."""

    name = "test"

    async def prepare(self) -> None: ...
    async def close(self) -> None: ...
    async def create(
        self, sandbox_id: str, session_id: str, template: str, env: dict[str, str]
    ) -> str:
        raise NotImplementedError

    async def remove(self, handle: str) -> None: ...
    async def suspend(self, handle: str) -> None: ...
    async def resume(self, handle: str) -> None: ...
    async def is_running(self, handle: str) -> tuple[bool, str]:
        return True, "running"

    async def machines(self) -> list[Machine]:
        return []

    def guest_url(self) -> str:
        raise NotImplementedError


def step_request(
    engine: Engine, sandbox_id: str, step: Step | str, task_id: str = "t"
) -> StepRequest:
    sid = new_session(engine)
    step = TerminalStep(command=step) if isinstance(step, str) else step
    with Session(engine) as db:
        events.record(
            db, sid, EventType.task_queued, {"task_id": task_id, "prompt": step.describe()}
        )
        events.record(
            db, sid, EventType.task_plan, {"task_id": task_id, "steps": [step.model_dump()]}
        )
    sandbox = SandboxInfo(
        id=sandbox_id, session_id=sid, provider="test", host_id="h", task_queue="q",
        template="default", handle="h",
    )  # fmt: skip
    return StepRequest(sandbox=sandbox, task_id=task_id, index=0, step=step, timeout_s=30)


def link_activities(gateway: GuestGateway, engine: Engine, tmp_path: Path) -> SandboxActivities:
    store = ArtifactStore(tmp_path / "artifacts", 1 << 20)
    return SandboxActivities(
        LinkOnly(gateway, SandboxHost(KEY, "h", "q", tmp_path / "preserved")), engine, 5, store
    )


def stored(engine: Engine, request: StepRequest) -> tuple[StepRow, list[str]]:
    with Session(engine) as db:
        row = db.exec(select(StepRow).where(StepRow.task_id == request.task_id)).one()
        kinds = [e.type for e in events.read_after(db, request.sandbox.session_id, 0)]
        return row, kinds


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Engine:
    # SQLite only: the event log's own tests cover PostgreSQL.
    url = f"sqlite:///{tmp_path / 'berth.db'}"
    migrate(url)
    return get_engine(url)


async def attempt(
    activities: SandboxActivities, request: StepRequest, number: int
) -> tuple[ActivityEnvironment, asyncio.Task[StepOutcome]]:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=number)
    return env, asyncio.create_task(env.run(activities.run_step, request))


async def test_a_timed_out_attempt_leaves_the_command_for_its_retry(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    engine = sqlite_engine
    async with guest_link(tmp_path) as link:
        activities = link_activities(link.gateway, engine, tmp_path)
        request = step_request(engine, link.sandbox_id, COUNT)
        env, first = await attempt(activities, request, 1)
        await asyncio.sleep(0.6)  # a few lines in
        # The server gave up on this attempt (heartbeat timeout): not the workflow's wish.
        env.cancel(ActivityCancellationDetails(timed_out=True))
        with pytest.raises(asyncio.CancelledError):
            await first
        _, second = await attempt(activities, request, 2)
        outcome = await asyncio.wait_for(second, 10)
        assert outcome.ok
        row, kinds = stored(engine, request)
        # Ran once (one execution in the guest), and every line stored once, in order.
        assert len(link.agent.executions) == 1
        assert row.output == EXPECTED and row.status == "succeeded"
        assert (
            kinds.count(EventType.step_started) == 1 and kinds.count(EventType.step_finished) == 1
        )


async def test_a_cancel_the_workflow_asked_for_kills_the_command_and_waits(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    engine = sqlite_engine
    async with guest_link(tmp_path) as link:
        activities = link_activities(link.gateway, engine, tmp_path)
        request = step_request(engine, link.sandbox_id, "echo begun; sleep 30")
        env, run = await attempt(activities, request, 1)
        for _ in range(100):
            if stored(engine, request)[0].output:
                break
            await asyncio.sleep(0.05)
        env.cancel()  # cancel_requested: the workflow's wish
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, 10)
        # By the time the attempt is over, the command is dead and the step's end recorded.
        (execution,) = link.agent.executions.values()
        assert execution.finished and execution.exit_code not in (0, None)
        row, kinds = stored(engine, request)
        assert row.status == "cancelled" and row.output == "begun\n"
        assert kinds[-1] == EventType.step_finished


@pytest.mark.chromium
@pytest.mark.skipif(chromium_path() is None, reason="no Chromium on this host")
async def test_a_browser_step_stores_its_screenshot_once_across_attempts(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    engine = sqlite_engine
    with serve_pages() as base:
        async with guest_link(tmp_path) as link:
            activities = link_activities(link.gateway, engine, tmp_path)
            step = BrowserStep(
                action="navigate",
                url=f"{base}/form",
                check=Check(kind="page_text_contains", value="Go"),
            )
            request = step_request(engine, link.sandbox_id, step)
            first = await (await attempt(activities, request, 1))[1]
            # A retry after the step ended (the completion was lost): it re-attaches, and
            # the screenshot comes again under the same id.
            again = await (await attempt(activities, request, 2))[1]
    assert first.ok and first.check is not None and first.check.ok
    assert first.result is not None and first.result.title == "Form"
    (artifact_id,) = first.artifacts
    assert again.artifacts == [artifact_id]
    with Session(engine) as db:
        (row,) = db.exec(select(ArtifactRow)).all()
        finished = [e for e in events.read_after(db, request.sandbox.session_id, 0)]
    assert (row.id, row.task_id, row.step_index, row.name) == (
        artifact_id,
        "t",
        0,
        "screenshot.jpg",
    )
    assert row.media_type == "image/jpeg" and row.session_id == request.sandbox.session_id
    path = tmp_path / "artifacts" / row.session_id / artifact_id
    assert path.read_bytes()[:3] == b"\xff\xd8\xff" and path.stat().st_size == row.size
    assert path.stat().st_mode & 0o777 == 0o600
    (end,) = [e for e in finished if e.type == EventType.step_finished]
    assert end.data["artifacts"] == [artifact_id] and end.data["check"]["ok"] is True
    assert end.data["result"]["url"] == f"{base}/form"
    step_row, _ = stored(engine, request)
    assert step_row.artifacts == [artifact_id] and step_row.check_result == end.data["check"]


async def test_a_step_kind_the_guest_lacks_is_refused_for_good(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTH_CHROMIUM", str(tmp_path / "no-chromium"))
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        activities = link_activities(link.gateway, sqlite_engine, tmp_path)
        step = BrowserStep(action="navigate", url="http://127.0.0.1:9/")
        request = step_request(sqlite_engine, link.sandbox_id, step)
        with pytest.raises(ApplicationError) as refused:
            await (await attempt(activities, request, 1))[1]
    assert refused.value.type == "StepKindUnsupported" and refused.value.non_retryable
    assert "does not run browser steps" in str(refused.value)
    assert not link.agent.executions  # nothing was sent to the guest
    row, kinds = stored(sqlite_engine, request)
    assert row.status == "refused" and "does not run browser steps" in (row.error or "")
    assert kinds[-1] == EventType.step_finished


@pytest.mark.parametrize(("number", "last"), [(GUEST_UNAVAILABLE_ATTEMPTS - 1, False),
                                              (GUEST_UNAVAILABLE_ATTEMPTS, True)])  # fmt: skip
async def test_a_guest_that_stays_away_fails_the_step_after_its_own_attempts(
    sqlite_engine: Engine, tmp_path: Path, number: int, last: bool
) -> None:
    """The step's retry policy leaves room for lost workers; an absent guest is retried only
    GUEST_UNAVAILABLE_ATTEMPTS times, as before."""
    assert GUEST_UNAVAILABLE_ATTEMPTS < STEP_ATTEMPTS
    gateway = GuestGateway(KEY, reconnect_grace_s=0.3)  # no guest ever dials it
    activities = link_activities(gateway, sqlite_engine, tmp_path)
    request = step_request(sqlite_engine, "sbx-absent", "echo never")
    with pytest.raises(ApplicationError) as failed:
        await asyncio.wait_for((await attempt(activities, request, number))[1], 10)
    assert failed.value.type == "GuestUnavailable"
    assert failed.value.non_retryable is last


async def test_output_waits_out_a_database_that_cannot_be_reached(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines that arrive while the database is down (its writes raise OperationalError, as
    a restarting PostgreSQL's do) are stored once it is back, none dropped, in order."""
    monkeypatch.setattr(sandbox_activities, "STORE_RETRY_S", (0.01, 0.05))
    request = step_request(sqlite_engine, "sbx-1", "echo")
    recorder = StepRecorder(sqlite_engine, ArtifactStore(tmp_path / "a", 1 << 20), request)
    store = recorder._store
    down = 3  # writes that fail before the database is back

    def flaky(batch: list[OutputLine]) -> None:
        nonlocal down
        if down:
            down -= 1
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        store(batch)

    monkeypatch.setattr(recorder, "_store", flaky)
    await recorder.begin()
    for seq in range(1, 16):
        await recorder.write(seq, "stdout", f"line {seq}\n")
        await asyncio.sleep(0.01)
    await recorder.finish("succeeded", StepOutcome(exit_code=0), None)
    row, _ = stored(sqlite_engine, request)
    assert down == 0
    assert row.output == EXPECTED and row.output_seq == 15
