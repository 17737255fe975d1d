"""The asyncio client, ``AsyncBerth(url, token)``: the one implementation of the API's
calls and streams (sync.py's ``Berth`` runs it for blocking code)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from berth_client import calls, core, errors
from berth_client.models import (
    Event,
    FileEntry,
    FileListing,
    SessionOut,
    TaskOut,
    TaskRefOut,
    TokenOut,
    UserUsage,
)

M = TypeVar("M", bound=BaseModel)


class AsyncBerth:
    """A Berth API at ``url``, as the owner of ``token``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers=core.auth_headers(token),
            timeout=timeout,
            transport=transport,
        )
        self.sessions = Sessions(self)

    async def __aenter__(self) -> AsyncBerth:
        return self

    async def __aexit__(
        self, *exc: type[BaseException] | BaseException | TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, call: core.Call) -> httpx.Response:
        """The call's answer, tried again as core.delay allows; its problem raised."""
        attempt = 0
        while True:
            try:
                response = await self.http.request(
                    call.method, call.path, json=call.json(), params=call.params,
                    headers=call.headers, content=call.content,
                )  # fmt: skip
            except httpx.TransportError as exc:
                wait = core.delay(call, attempt, exc)
                if wait is None:
                    raise
            else:
                wait = core.delay(call, attempt, response) if response.is_error else None
                if wait is None:
                    return core.checked(response)
            await asyncio.sleep(wait)
            attempt += 1

    async def read(self, call: core.Call, model: type[M]) -> M:
        return model.model_validate_json((await self.send(call)).content)

    async def pages(self, call: core.Call, model: type[M]) -> AsyncIterator[M]:
        """Every item of a list, a page at a time (following its Link header)."""
        items = TypeAdapter(list[model])  # type: ignore[valid-type]
        while True:
            response = await self.send(call)
            for item in items.validate_json(response.content):
                yield item
            found = core.next_page(response)
            if found is None:
                return
            call = core.Call("GET", found, repeatable=True)

    async def log_in(self, email: str, password: str, name: str = "api") -> TokenOut:
        """A new token (and this client uses it from now on)."""
        token = await self.read(calls.log_in(email, password, name), TokenOut)
        self.http.headers.update(core.auth_headers(token.token))
        return token

    async def usage(self) -> UserUsage:
        return await self.read(calls.usage(), UserUsage)

    async def artifact(self, sid: str, artifact_id: str) -> bytes:
        return (await self.send(calls.artifact(sid, artifact_id))).content

    async def list_files(self, sid: str, path: str = ".") -> FileListing:
        """A folder of the session's workspace (or one file's size)."""
        return await self.read(calls.list_files(sid, path), FileListing)

    async def download(self, sid: str, path: str) -> bytes:
        """A file of the workspace; a folder as a zip."""
        return (await self.send(calls.download(sid, path))).content

    async def upload(self, sid: str, path: str, data: bytes) -> FileEntry:
        return await self.read(calls.upload(sid, path, data), FileEntry)

    async def delete_file(self, sid: str, path: str) -> None:
        await self.send(calls.delete_file(sid, path))

    async def events(
        self, sid: str, after: int = 0, idle: float | None = None
    ) -> AsyncIterator[Event]:
        """The session's events after ``after``, live: a dropped stream is reopened where it
        left off; it ends after the session's final event, or once none came for ``idle``
        seconds (the log as it is so far); bound it with asyncio.timeout."""
        failures = 0
        while True:
            try:
                async with self.http.stream(
                    "GET", calls.events_path(sid), headers=core.stream_headers(after),
                    timeout=core.stream_timeout(self.http.timeout, idle),
                ) as response:  # fmt: skip
                    if response.status_code == 204:
                        return  # the session ended and nothing follows
                    if response.is_error:
                        await response.aread()
                        core.checked(response)
                    reader = core.SSEReader()
                    async for line in response.aiter_lines():
                        event = reader.feed(line)
                        if event is not None:
                            failures, after = 0, event.seq
                            yield event
            except httpx.TransportError as exc:
                if idle is not None and isinstance(exc, httpx.ReadTimeout):
                    return  # quiet for `idle` seconds: that is the log so far
                failures += 1
                if failures >= core.STREAM_TRIES:
                    raise errors.StreamLost(f"session {sid}'s events: {exc}") from exc
                await asyncio.sleep(core.BACKOFF[min(failures, len(core.BACKOFF)) - 1])
            # Ended by the server (its streams' lifetime): open it again from `after`.


class Sessions:
    def __init__(self, berth: AsyncBerth) -> None:
        self._berth = berth

    async def create(self, template: str | None = None) -> Session:
        return Session(
            self._berth, await self._berth.read(calls.create_session(template), SessionOut)
        )

    async def list(self, limit: int = core.PAGE) -> AsyncIterator[Session]:
        async for info in self._berth.pages(calls.list_sessions(limit), SessionOut):
            yield Session(self._berth, info)

    async def get(self, sid: str) -> Session:
        return Session(self._berth, await self._berth.read(calls.get_session(sid), SessionOut))

    async def end(self, sid: str, preserve: bool = False) -> Session:
        return Session(
            self._berth, await self._berth.read(calls.end_session(sid, preserve), SessionOut)
        )

    async def resume(self, sid: str) -> Session:
        return Session(self._berth, await self._berth.read(calls.resume_session(sid), SessionOut))


class Session:
    """A session; ``info`` is what the server said of it last (``refresh()`` asks again)."""

    def __init__(self, berth: AsyncBerth, info: SessionOut) -> None:
        self._berth = berth
        self.info = info
        self.id = info.id

    def __repr__(self) -> str:
        return f"Session({self.id!r}, {self.info.status})"

    async def refresh(self) -> SessionOut:
        self.info = await self._berth.read(calls.get_session(self.id), SessionOut)
        return self.info

    async def run(self, prompt: str, idempotency_key: str | None = None) -> Task:
        """Queue a task (once, however often the request is retried)."""
        ref = await self._berth.read(
            calls.submit_task(self.id, prompt, idempotency_key), TaskRefOut
        )
        return Task(self._berth, self.id, ref)

    async def tasks(self) -> AsyncIterator[Task]:
        async for ref in self._berth.pages(calls.list_tasks(self.id, core.PAGE), TaskRefOut):
            yield Task(self._berth, self.id, ref)

    async def task(self, tid: str) -> Task:
        info = await self._berth.read(calls.get_task(self.id, tid), TaskOut)
        return Task(self._berth, self.id, TaskRefOut(id=info.id, status=info.status))

    def events(self, after: int = 0) -> AsyncIterator[Event]:
        return self._berth.events(self.id, after)

    async def artifact(self, artifact_id: str) -> bytes:
        return await self._berth.artifact(self.id, artifact_id)

    async def end(self, preserve: bool = False) -> SessionOut:
        self.info = (await self._berth.sessions.end(self.id, preserve)).info
        return self.info

    async def resume(self) -> SessionOut:
        self.info = (await self._berth.sessions.resume(self.id)).info
        return self.info


class Task:
    """A task of a session; ``status`` as last seen."""

    def __init__(self, berth: AsyncBerth, sid: str, ref: TaskRefOut) -> None:
        self._berth = berth
        self.session_id = sid
        self.id = ref.id
        self.status = ref.status

    def __repr__(self) -> str:
        return f"Task({self.id!r}, {self.status})"

    async def get(self) -> TaskOut:
        info = await self._berth.read(calls.get_task(self.session_id, self.id), TaskOut)
        self.status = info.status
        return info

    async def events(self) -> AsyncIterator[Event]:
        """This task's events, live, until it ends."""
        async for event in self._berth.events(self.session_id, 0):
            if event.task_id != self.id:
                continue
            yield event
            if core.is_end(event):
                return

    async def wait(self, check: bool = False) -> TaskOut:
        """The task once it has ended; with ``check``, TaskFailed unless it succeeded."""
        async for _ in self.events():
            pass
        return core.finished(await self.get(), check)

    async def pause(self) -> TaskRefOut:
        return await self._control("pause")

    async def resume(self) -> TaskRefOut:
        return await self._control("resume")

    async def cancel(self) -> TaskRefOut:
        return await self._control("cancel")

    async def modify(self, instruction: str) -> TaskRefOut:
        ref = await self._berth.read(
            calls.modify_task(self.session_id, self.id, instruction), TaskRefOut
        )
        self.status = ref.status
        return ref

    async def _control(self, action: str) -> TaskRefOut:
        ref = await self._berth.read(
            calls.control_task(self.session_id, self.id, action), TaskRefOut
        )
        self.status = ref.status
        return ref
