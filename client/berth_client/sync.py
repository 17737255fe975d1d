"""The blocking client: ``Berth(url, token)``; aio.py is the same over asyncio."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType
from typing import TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from berth_client import calls, core, errors
from berth_client.models import (
    Event,
    SessionOut,
    TaskOut,
    TaskRefOut,
    TokenOut,
    UserUsage,
)

M = TypeVar("M", bound=BaseModel)


class Berth:
    """A Berth API at ``url``, as the owner of ``token``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers=core.auth_headers(token),
            timeout=timeout,
            transport=transport,
        )
        self.sessions = Sessions(self)

    def __enter__(self) -> Berth:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, call: core.Call) -> httpx.Response:
        """The call's answer, tried again as core.delay allows; its problem raised."""
        attempt = 0
        while True:
            try:
                response = self.http.request(
                    call.method, call.path, json=call.json(), params=call.params,
                    headers=call.headers,
                )  # fmt: skip
            except httpx.TransportError as exc:
                wait = core.delay(call, attempt, exc)
                if wait is None:
                    raise
            else:
                wait = core.delay(call, attempt, response) if response.is_error else None
                if wait is None:
                    return core.checked(response)
            time.sleep(wait)
            attempt += 1

    def read(self, call: core.Call, model: type[M]) -> M:
        return model.model_validate_json(self.send(call).content)

    def pages(self, call: core.Call, model: type[M]) -> Iterator[M]:
        """Every item of a list, a page at a time (following its Link header)."""
        items = TypeAdapter(list[model])  # type: ignore[valid-type]
        while True:
            response = self.send(call)
            yield from items.validate_json(response.content)
            found = core.next_page(response)
            if found is None:
                return
            call = core.Call("GET", found, repeatable=True)

    def log_in(self, email: str, password: str, name: str = "api") -> TokenOut:
        """A new token (and this client uses it from now on)."""
        token = self.read(calls.log_in(email, password, name), TokenOut)
        self.http.headers.update(core.auth_headers(token.token))
        return token

    def usage(self) -> UserUsage:
        return self.read(calls.usage(), UserUsage)

    def artifact(self, sid: str, artifact_id: str) -> bytes:
        return self.send(calls.artifact(sid, artifact_id)).content

    def events(
        self, sid: str, after: int = 0, timeout: float | None = None, idle: float | None = None
    ) -> Iterator[Event]:
        """The session's events after ``after``, live: a dropped stream is reopened where it
        left off; it ends after the session's final event, or once none came for ``idle``
        seconds (the log as it is so far), or raises TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            try:
                with self.http.stream(
                    "GET", calls.events_path(sid), headers=core.stream_headers(after),
                    timeout=core.stream_timeout(self.http.timeout, idle),
                ) as response:  # fmt: skip
                    if response.status_code == 204:
                        return  # the session ended and nothing follows
                    if response.is_error:
                        response.read()
                        core.checked(response)
                    reader = core.SSEReader()
                    for line in response.iter_lines():
                        if deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError(f"session {sid}: no end after {timeout} s")
                        event = reader.feed(line)
                        if event is not None:
                            failures, after = 0, event.seq
                            yield event
            except httpx.ReadTimeout:
                if idle is None:
                    raise
                return
            except httpx.TransportError as exc:
                failures += 1
                if failures >= core.STREAM_TRIES:
                    raise errors.StreamLost(f"session {sid}'s events: {exc}") from exc
                time.sleep(core.BACKOFF[min(failures, len(core.BACKOFF)) - 1])
            # Ended by the server (its streams' lifetime): open it again from `after`.


class Sessions:
    def __init__(self, berth: Berth) -> None:
        self._berth = berth

    def create(self, template: str | None = None) -> Session:
        return Session(self._berth, self._berth.read(calls.create_session(template), SessionOut))

    def list(self, limit: int = core.PAGE) -> Iterator[Session]:
        for info in self._berth.pages(calls.list_sessions(limit), SessionOut):
            yield Session(self._berth, info)

    def get(self, sid: str) -> Session:
        return Session(self._berth, self._berth.read(calls.get_session(sid), SessionOut))

    def end(self, sid: str, preserve: bool = False) -> Session:
        return Session(self._berth, self._berth.read(calls.end_session(sid, preserve), SessionOut))

    def resume(self, sid: str) -> Session:
        return Session(self._berth, self._berth.read(calls.resume_session(sid), SessionOut))


class Session:
    """A session; ``info`` is what the server said of it last (``refresh()`` asks again)."""

    def __init__(self, berth: Berth, info: SessionOut) -> None:
        self._berth = berth
        self.info = info
        self.id = info.id

    def __repr__(self) -> str:
        return f"Session({self.id!r}, {self.info.status})"

    def refresh(self) -> SessionOut:
        self.info = self._berth.read(calls.get_session(self.id), SessionOut)
        return self.info

    def run(self, prompt: str, idempotency_key: str | None = None) -> Task:
        """Queue a task (once, however often the request is retried)."""
        ref = self._berth.read(calls.submit_task(self.id, prompt, idempotency_key), TaskRefOut)
        return Task(self._berth, self.id, ref)

    def tasks(self) -> Iterator[Task]:
        for ref in self._berth.pages(calls.list_tasks(self.id, core.PAGE), TaskRefOut):
            yield Task(self._berth, self.id, ref)

    def task(self, tid: str) -> Task:
        info = self._berth.read(calls.get_task(self.id, tid), TaskOut)
        return Task(self._berth, self.id, TaskRefOut(id=info.id, status=info.status))

    def events(self, after: int = 0, timeout: float | None = None) -> Iterator[Event]:
        return self._berth.events(self.id, after, timeout)

    def artifact(self, artifact_id: str) -> bytes:
        return self._berth.artifact(self.id, artifact_id)

    def end(self, preserve: bool = False) -> SessionOut:
        self.info = self._berth.sessions.end(self.id, preserve).info
        return self.info

    def resume(self) -> SessionOut:
        self.info = self._berth.sessions.resume(self.id).info
        return self.info


class Task:
    """A task of a session; ``status`` as last seen."""

    def __init__(self, berth: Berth, sid: str, ref: TaskRefOut) -> None:
        self._berth = berth
        self.session_id = sid
        self.id = ref.id
        self.status = ref.status

    def __repr__(self) -> str:
        return f"Task({self.id!r}, {self.status})"

    def get(self) -> TaskOut:
        info = self._berth.read(calls.get_task(self.session_id, self.id), TaskOut)
        self.status = info.status
        return info

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """This task's events, live, until it ends."""
        for event in self._berth.events(self.session_id, 0, timeout):
            if event.task_id != self.id:
                continue
            yield event
            if core.is_end(event):
                return

    def wait(self, timeout: float | None = None, check: bool = False) -> TaskOut:
        """The task once it has ended; with ``check``, TaskFailed unless it succeeded."""
        for _ in self.events(timeout):
            pass
        return core.finished(self.get(), check)

    def pause(self) -> TaskRefOut:
        return self._control("pause")

    def resume(self) -> TaskRefOut:
        return self._control("resume")

    def cancel(self) -> TaskRefOut:
        return self._control("cancel")

    def modify(self, instruction: str) -> TaskRefOut:
        ref = self._berth.read(calls.modify_task(self.session_id, self.id, instruction), TaskRefOut)
        self.status = ref.status
        return ref

    def _control(self, action: str) -> TaskRefOut:
        ref = self._berth.read(calls.control_task(self.session_id, self.id, action), TaskRefOut)
        self.status = ref.status
        return ref
