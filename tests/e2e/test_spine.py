"""The spine under stress, end to end: one system (Temporal dev server, worker, API, Docker
sandboxes) whose Temporal suggests continue-as-new after ~60 history events, driven over the
JSON API. Long tasks across continue-as-new, every order of DELETE and cancel mid-step, a
worker killed mid-step, idempotent submission, bad input, the live-session limit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import WorkflowExecutionStatus

from store.events import EventType
from tests.e2e.test_system import token_for
from tests.support.local import LocalSystem, python_script
from workflows.models import SessionInput

Event = dict[str, Any]
FINAL_TASK = ("succeeded", "failed", "cancelled")
FINAL_SESSION = ("ended", "failed")
SLEEP = "$ sleep 60"
MAX_RECONNECTS = 120  # a minute of a stream that cannot be opened


class Spine(LocalSystem):
    def tail(self, chars: int = 4000) -> str:
        """The supervisor's output (the worker's log goes there too), without health checks."""
        lines = (self.data / "run.log").read_text(errors="replace").splitlines(keepends=True)
        noise = ("/healthz", '"GET /api/sessions/')  # health checks, the tests' polling
        return "".join(line for line in lines if not any(n in line for n in noise))[-chars:]

    def story(self, sid: str) -> str:
        """What Temporal knows of session ``sid``'s workflow (its latest run), for failures."""

        async def ask() -> str:
            client = await self.client()
            handle = client.get_workflow_handle(f"session-{sid}")
            described = await handle.describe()
            history = await handle.fetch_history()
            kinds = [
                HistoryEventType.Name(e.event_type).removeprefix("EVENT_TYPE_")
                for e in history.events
            ]
            cancel = described.raw_description.workflow_extended_info.cancel_requested
            status = described.status.name if described.status else None
            return f"workflow {status}, cancel requested: {cancel}, history: {kinds}"

        try:
            return asyncio.run(ask())
        except Exception as exc:
            return f"(Temporal could not be asked: {exc!r})"

    def fail(self, why: str) -> AssertionError:
        return AssertionError(f"{why}\n--- supervisor output (tail):\n{self.tail()}")


@pytest.fixture(scope="module")
def spine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spine]:
    system = Spine.start(
        tmp_path_factory.mktemp("berth-spine"),
        "spine",
        # Continue-as-new after ~60 history events: a long task does so several times.
        {"BERTH_TEMPORAL_SUGGEST_CONTINUE_AS_NEW": "60", "BERTH_MAX_LIVE_SESSIONS": "3"},
    )
    try:
        yield system
    finally:
        assert system.stop() == 0, system.tail()


class Stream:
    """A session's SSE stream, read by a background thread: every event it sends, whether
    the response has completed, and how (``error`` is None if it ended cleanly). With
    ``reconnect``, a stream that breaks (its API killed, say) is opened again where it was,
    with Last-Event-ID, as a browser's EventSource does, until the session's final event;
    ``reconnects`` counts those."""

    def __init__(
        self,
        base: str,
        headers: dict[str, str],
        sid: str,
        after: int = 0,
        reconnect: bool = False,
    ) -> None:
        self.events: list[Event] = []
        self.status: int | None = None
        self.done = False
        self.error: str | None = None
        self.reconnects = 0
        self._cond = threading.Condition()
        self._url = f"{base}/api/sessions/{sid}/events"
        self._headers = headers
        self._after = after
        self._reconnect = reconnect
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            while True:
                try:
                    self._read()
                except Exception as exc:
                    if not self._reconnect or self._final() or self.reconnects >= MAX_RECONNECTS:
                        raise
                    self.error = repr(exc)
                else:
                    if not self._reconnect or self._final():
                        return
                self.reconnects += 1
                time.sleep(0.5)  # EventSource waits a little before it reconnects, too
        except Exception as exc:
            self.error = repr(exc)
        finally:
            with self._cond:
                self.done = True
                self._cond.notify_all()

    def _final(self) -> bool:
        with self._cond:
            return any(
                e["type"] == EventType.session_status and e["data"]["status"] in FINAL_SESSION
                for e in self.events
            )

    def _read(self) -> None:
        """One response of the stream, from the last event seen."""
        # The server sends a keepalive every 15 s: a 30 s silence is a broken stream.
        timeout = httpx.Timeout(10, read=30)
        with self._cond:
            last = self.events[-1]["seq"] if self.events else self._after
        headers = {**self._headers, "Last-Event-ID": str(last)}
        with httpx.stream("GET", self._url, headers=headers, timeout=timeout) as r:
            self.status = r.status_code
            fields: dict[str, str] = {}
            for line in r.iter_lines():
                if line:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                elif "data" in fields:
                    event = json.loads(fields["data"])
                    assert int(fields["id"]) == event["seq"], fields
                    assert fields["event"] == event["type"], fields
                    with self._cond:
                        self.events.append(event)
                        self._cond.notify_all()
                    fields = {}
                else:
                    fields = {}
        self.error = None

    def wait_for(self, what: str, check: Callable[[Event], bool], timeout_s: float) -> Event:
        """The first event ``check`` accepts, waiting up to ``timeout_s`` for it."""

        def found() -> Event | None:
            return next((e for e in self.events if check(e)), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self.done, timeout_s)
            event = found()
        if event is None:
            seen = [(e["seq"], e["type"], e["data"].get("status")) for e in self.events]
            raise AssertionError(
                f"no {what} on the SSE stream within {timeout_s:.0f} s "
                f"(stream done={self.done}, error={self.error}); saw {seen[-15:]}"
            )
        return event

    def wait_done(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout_s)

    def output(self, task_id: str, index: int) -> str:
        with self._cond:
            return "".join(
                e["data"]["text"]
                for e in self.events
                if e["type"] == EventType.step_output
                and e["data"]["task_id"] == task_id
                and e["data"]["index"] == index
            )


def is_event(kind: str, **data: Any) -> Callable[[Event], bool]:
    def check(event: Event) -> bool:
        return event["type"] == kind and all(event["data"].get(k) == v for k, v in data.items())

    return check


@dataclass
class User:
    """One user of the system, and every session they started (all ended at teardown)."""

    spine: Spine
    headers: dict[str, str]
    sessions: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.spine.base

    def create(self) -> httpx.Response:
        response = httpx.post(
            f"{self.base}/api/sessions", json={}, headers=self.headers, timeout=30
        )
        if response.status_code == 201:
            self.sessions.append(response.json()["id"])
        return response

    def new_session(self) -> str:
        response = self.create()
        assert response.status_code == 201, response.text
        sid: str = response.json()["id"]
        return sid

    def session(self, sid: str) -> dict[str, Any]:
        response = httpx.get(f"{self.base}/api/sessions/{sid}", headers=self.headers, timeout=10)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def end(self, sid: str) -> httpx.Response:
        return httpx.delete(f"{self.base}/api/sessions/{sid}", headers=self.headers, timeout=30)

    def wait_session(self, sid: str, wanted: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            session = self.session(sid)
            if session["status"] == wanted:
                return session
            if session["status"] in FINAL_SESSION:
                raise self.spine.fail(f"session {sid} became {session} while waiting for {wanted}")
            if time.monotonic() > deadline:
                raise self.spine.fail(
                    f"session {sid} is still {session['status']} after {timeout_s:.0f} s, "
                    f"not {wanted}; {self.spine.story(sid)}"
                )
            time.sleep(0.2)

    def submit(self, sid: str, prompt: str, key: str | None = None) -> httpx.Response:
        headers = self.headers if key is None else {**self.headers, "Idempotency-Key": key}
        return httpx.post(
            f"{self.base}/api/sessions/{sid}/tasks",
            json={"prompt": prompt},
            headers=headers,
            timeout=30,
        )

    def queue(self, sid: str, prompt: str) -> str:
        response = self.submit(sid, prompt)
        assert response.status_code == 202, response.text
        tid: str = response.json()["id"]
        return tid

    def task(self, sid: str, tid: str) -> dict[str, Any]:
        url = f"{self.base}/api/sessions/{sid}/tasks/{tid}"
        response = httpx.get(url, headers=self.headers, timeout=10)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_task(self, sid: str, tid: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            task = self.task(sid, tid)
            if task["status"] in FINAL_TASK:
                return task
            if time.monotonic() > deadline:
                steps = [(s["index"], s["status"]) for s in task["steps"]]
                raise self.spine.fail(
                    f"task {tid} is still {task['status']} after {timeout_s:.0f} s; steps {steps}"
                )
            time.sleep(0.3)

    def cancel(self, sid: str, tid: str, timeout_s: float) -> httpx.Response:
        url = f"{self.base}/api/sessions/{sid}/tasks/{tid}/cancel"
        return httpx.post(url, headers=self.headers, timeout=timeout_s)

    def stream(self, sid: str, after: int = 0, reconnect: bool = False) -> Stream:
        return Stream(self.base, self.headers, sid, after, reconnect)


@pytest.fixture
def user(spine: Spine, request: pytest.FixtureRequest) -> Iterator[User]:
    yield from user_of(spine, request.node.name)


def user_of(spine: Spine, name: str) -> Iterator[User]:
    """A user of its own for each test; every session it started is ended afterwards."""
    if spine.process.poll() is not None:
        raise spine.fail(f"the supervisor has exited, with {spine.process.returncode}")
    who = User(spine, token_for(spine.base, f"{name}@spine.example.com"))
    yield who
    lingering = []
    for sid in who.sessions:
        if who.end(sid).status_code != 202:
            lingering.append(sid)
    deadline = time.monotonic() + 40
    for sid in who.sessions:
        while who.session(sid)["status"] not in FINAL_SESSION:
            if time.monotonic() > deadline:
                lingering.append(sid)
                break
            time.sleep(0.3)
    if lingering:
        stories = "; ".join(f"{sid}: {spine.story(sid)}" for sid in lingering)
        for sid in lingering:  # no leaked sandbox on this machine, whatever the product did
            for container in session_containers(sid):
                subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        raise spine.fail(f"sessions {lingering} did not end at teardown ({stories})")


def session_containers(sid: str) -> list[str]:
    """Ids of the Docker containers labelled as session ``sid``'s."""
    found = subprocess.run(
        ["docker", "ps", "--all", "--quiet", "--filter", f"label=berth.session={sid}"],
        capture_output=True,
        text=True,
    )
    return found.stdout.split()


def container_exists(handle: str) -> bool:
    return subprocess.run(["docker", "inspect", handle], capture_output=True).returncode == 0


# ---- 1. continue-as-new


@pytest.mark.timeout(240)
def test_a_task_that_continues_as_new_keeps_its_sandbox_and_files(user: User) -> None:
    sid = user.new_session()
    workflow_id = f"session-{sid}"

    async def first_run_id() -> str:
        client = await user.spine.client()
        return (await client.get_workflow_handle(workflow_id).describe()).run_id

    first = asyncio.run(first_run_id())
    stream = user.stream(sid)
    prompt = "\n".join(["$ echo kept > f.txt", *["$ true"] * 40, "$ cat f.txt"])
    tid = user.queue(sid, prompt)
    task = user.wait_task(sid, tid, 150)
    assert task["status"] == "succeeded", task
    assert len(task["steps"]) == 42
    assert [s["status"] for s in task["steps"]] == ["succeeded"] * 42
    assert task["steps"][-1]["output"] == "kept\n"
    stream.wait_for(
        "the task's success", is_event(EventType.task_status, task_id=tid, status="succeeded"), 30
    )
    assert sum(e["type"] == EventType.sandbox_ready for e in stream.events) == 1, "a second sandbox"
    seqs = [e["seq"] for e in stream.events]
    assert seqs == list(range(1, len(seqs) + 1)), "the event log has gaps or repeats"

    async def runs() -> tuple[str, WorkflowExecutionStatus | None, SessionInput]:
        client = await user.spine.client()
        latest = await client.get_workflow_handle(workflow_id).describe()
        old = client.get_workflow_handle(workflow_id, run_id=first)
        history = await old.fetch_history()
        last = history.events[-1]
        assert last.HasField("workflow_execution_continued_as_new_event_attributes"), last
        payloads = last.workflow_execution_continued_as_new_event_attributes.input.payloads
        [carried] = await client.data_converter.decode(payloads, [SessionInput])
        status = (await old.describe()).status
        return latest.run_id, status, carried

    async def count_runs() -> int:
        """Runs of the session's workflow, as visibility lists them (it may lag a little)."""
        client = await user.spine.client()
        query = f"WorkflowId = '{workflow_id}'"
        deadline = time.monotonic() + 10
        while True:
            runs = [run async for run in client.list_workflows(query)]
            if len(runs) >= 3 or time.monotonic() > deadline:
                return len(runs)
            await asyncio.sleep(0.5)

    latest, first_status, handed_on = asyncio.run(runs())
    assert latest != first, "the session never continued as new"
    assert asyncio.run(count_runs()) >= 3, "fewer than two continue-as-new in 42 steps"
    assert first_status == WorkflowExecutionStatus.CONTINUED_AS_NEW
    # The first run handed the task on half-way: it continued as new mid-task.
    assert handed_on.carried is not None
    assert handed_on.carried.running == tid
    assert 0 < handed_on.carried.tasks[0].position < 42
    assert handed_on.carried.sandbox.handle == next(
        e["data"]["handle"] for e in stream.events if e["type"] == EventType.sandbox_ready
    )


# ---- 2-4. DELETE and cancel, mid-step, in every order


def start_sleeping(user: User) -> tuple[str, str, Stream, str]:
    """A session whose task is in the middle of ``sleep 60``: (sid, tid, stream, handle)."""
    sid = user.new_session()
    stream = user.stream(sid)
    tid = user.queue(sid, SLEEP)
    stream.wait_for(EventType.step_started, is_event(EventType.step_started, task_id=tid), 90)
    handle = str(
        stream.wait_for(EventType.sandbox_ready, is_event(EventType.sandbox_ready), 5)["data"][
            "handle"
        ]
    )
    assert container_exists(handle)
    return sid, tid, stream, handle


@pytest.mark.timeout(180)
def test_deleting_a_session_mid_step_kills_the_step_and_the_sandbox(user: User) -> None:
    sid, tid, stream, handle = start_sleeping(user)
    started = time.monotonic()
    assert user.end(sid).status_code == 202
    session = user.wait_session(sid, "ended", 30)
    assert session["ended_at"] is not None
    task = user.task(sid, tid)
    assert task["status"] == "cancelled", task
    assert task["steps"][0]["status"] == "cancelled", task["steps"]
    assert not container_exists(handle), "the sandbox container outlived its session"
    assert time.monotonic() - started < 30
    stream.wait_for("the session's end", is_event(EventType.session_status, status="ended"), 10)


@pytest.mark.timeout(180)
def test_cancel_then_delete_mid_step_ends_everything(user: User) -> None:
    sid, tid, stream, handle = start_sleeping(user)
    with ThreadPoolExecutor(1) as pool:
        cancel = pool.submit(user.cancel, sid, tid, 40)
        time.sleep(0.2)  # the cancel is on its way
        started = time.monotonic()
        assert user.end(sid).status_code == 202
        answer = cancel.result(timeout=35)
    assert time.monotonic() - started < 30, "the cancel took longer than 30 s to answer"
    assert answer.status_code in (200, 409), answer.text
    if answer.status_code == 200:
        assert answer.json() == {"id": tid, "status": "cancelled"}
    user.wait_session(sid, "ended", 30)
    assert user.task(sid, tid)["status"] == "cancelled"
    assert not container_exists(handle), "the sandbox container outlived its session"
    stream.wait_for("the session's end", is_event(EventType.session_status, status="ended"), 10)


@pytest.mark.timeout(180)
def test_delete_then_cancel_mid_step_is_answered_at_once(user: User) -> None:
    sid, tid, _stream, handle = start_sleeping(user)
    assert user.end(sid).status_code == 202
    started = time.monotonic()
    try:
        answer = user.cancel(sid, tid, 10)
    except httpx.TimeoutException:
        raise user.spine.fail("a cancel after DELETE got no answer within 10 s") from None
    assert time.monotonic() - started < 10
    assert answer.status_code in (200, 409), answer.text
    if answer.status_code == 409:
        assert "ending" in answer.text or "ended" in answer.text, answer.text
    else:
        assert answer.json()["status"] == "cancelled", answer.text
    user.wait_session(sid, "ended", 30)
    assert user.task(sid, tid)["status"] == "cancelled"
    assert not container_exists(handle), "the sandbox container outlived its session"


# ---- 5. a worker killed mid-step


@pytest.mark.timeout(240)
def test_a_worker_killed_mid_step_resumes_the_step_without_rerunning_it(user: User) -> None:
    sid = user.new_session()
    stream = user.stream(sid)
    tid = user.queue(
        sid,
        "$ echo run >> runs.txt; "
        + python_script(
            "count.py",
            "import time",
            "for i in range(1, 41):",
            '    print("line", i, flush=True)',
            "    time.sleep(0.25)",
        )
        + "\n$ wc -l < runs.txt",
    )
    deadline = time.monotonic() + 90
    while "line 5\n" not in stream.output(tid, 0):
        if time.monotonic() > deadline or stream.done:
            raise user.spine.fail(f"no 'line 5' on the stream; saw {stream.output(tid, 0)!r}")
        time.sleep(0.05)
    pid_file = user.spine.data / "run" / "worker.pid"
    killed = int(pid_file.read_text())
    os.kill(killed, signal.SIGKILL)

    try:
        task = user.wait_task(sid, tid, 120)
    except httpx.HTTPError as exc:
        code = user.spine.process.poll()
        raise user.spine.fail(f"the API stopped answering ({exc!r}); supervisor: {code}") from exc
    assert task["status"] == "succeeded", (task, user.spine.tail())
    assert int(pid_file.read_text()) != killed, "the worker was not restarted"
    expected = "".join(f"line {i}\n" for i in range(1, 41))
    assert task["steps"][0]["output"] == expected
    stream.wait_for(
        "the task's end", is_event(EventType.task_status, task_id=tid, status="succeeded"), 30
    )
    assert stream.output(tid, 0) == expected
    assert task["steps"][1]["output"].strip() == "1", "the first step's command ran again"
    started = [
        e for e in stream.events if is_event(EventType.step_started, task_id=tid, index=0)(e)
    ]
    assert len(started) == 1


# ---- 6. idempotent submission


@pytest.mark.timeout(120)
def test_a_task_sent_twice_with_one_idempotency_key_is_queued_once(user: User) -> None:
    sid = user.new_session()
    stream = user.stream(sid)
    first = user.submit(sid, "$ echo once", key="k1")
    again = user.submit(sid, "$ echo once", key="k1")
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    tid = first.json()["id"]
    assert again.json()["id"] == tid
    other = user.submit(sid, "$ echo once", key="k2")
    assert other.status_code == 202, other.text
    other_tid = other.json()["id"]
    assert other_tid != tid
    for task_id in (tid, other_tid):
        done = is_event(EventType.task_status, task_id=task_id, status="succeeded")
        stream.wait_for(f"the success of {task_id}", done, 90)
    queued = [e["data"]["task_id"] for e in stream.events if e["type"] == EventType.task_queued]
    assert queued == [tid, other_tid]


# ---- 7. bad input, and the end of a stream


@pytest.mark.timeout(120)
def test_bad_input_is_refused_and_an_ended_sessions_stream_ends(user: User) -> None:
    sid = user.new_session()
    too_long = "\n".join(["$ true"] * 51)
    refused = user.submit(sid, too_long)
    assert refused.status_code == 422, refused.text
    assert "at most 50 steps" in refused.text

    stream = user.stream(sid)
    stream.wait_for(
        "the session's readiness", is_event(EventType.session_status, status="ready"), 90
    )
    last = stream.events[-1]["seq"]
    beyond = httpx.get(
        f"{user.base}/api/sessions/{sid}/events",
        params={"after": last + 100},
        headers=user.headers,
        timeout=10,
    )
    assert beyond.status_code == 400, beyond.text

    assert user.end(sid).status_code == 202
    final = stream.wait_for(
        "the session's end", is_event(EventType.session_status, status="ended"), 30
    )
    assert stream.wait_done(10), "the stream of an ended session did not end"
    assert stream.error is None, stream.error
    assert stream.events[-1] == final, "events came after the final one"
    again = httpx.get(
        f"{user.base}/api/sessions/{sid}/events",
        headers={**user.headers, "Last-Event-ID": str(final["seq"])},
        timeout=10,
    )
    assert again.status_code == 204, again.text


# ---- 8. the live-session limit


@pytest.mark.timeout(180)
def test_a_user_has_at_most_three_live_sessions(user: User) -> None:
    first = [user.new_session() for _ in range(3)]
    # Ready before any is ended: ending one mid-provisioning is the last test's subject.
    for sid in first:
        user.wait_session(sid, "ready", 60)
    fourth = user.create()
    assert fourth.status_code == 429, fourth.text
    detail = fourth.json()["detail"]
    assert "BERTH_MAX_LIVE_SESSIONS" in detail and "3" in detail, detail
    assert user.end(first[0]).status_code == 202
    user.wait_session(first[0], "ended", 30)
    assert user.create().status_code == 201
    assert len(user.sessions) == 4
    user.wait_session(user.sessions[-1], "ready", 60)


# ---- DELETE while the sandbox is being provisioned, at several moments


@pytest.mark.timeout(180)
def test_deleting_a_session_while_its_sandbox_is_provisioned_ends_it(user: User) -> None:
    """Whether the DELETE lands while the container is being started or just as its guest
    dials in, the session ends and no sandbox is left."""
    for delay in (0.2, 0.5, 0.8, 1.1, 1.4):
        sid = user.new_session()
        time.sleep(delay)
        assert user.end(sid).status_code == 202
        user.wait_session(sid, "ended", 30)
        assert not session_containers(sid), f"a sandbox of session {sid} outlived it"
