"""The blocking client, ``Berth(url, token)``: AsyncBerth (aio.py) run on an event loop of
its own, in a daemon thread (a client left open never holds the process at exit), so the two
cannot drift apart: each call and each stream here is the async client's, waited for."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import httpx

from berth_client import aio, core
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

T = TypeVar("T")


class Berth:
    """A Berth API at ``url``, as the owner of ``token``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="berth-client", daemon=True
        )
        self._thread.start()
        self.inner = aio.AsyncBerth(url, token, timeout=timeout, transport=transport)
        self.sessions = Sessions(self)

    def __enter__(self) -> Berth:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self.call(self.inner.close)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def call(
        self, work: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None
    ) -> T:
        """``work(*args)`` on the client's loop; TimeoutError after ``timeout`` seconds."""

        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await work(*args)

        done = asyncio.run_coroutine_threadsafe(bounded(), self._loop)
        try:
            return done.result()
        except BaseException:
            done.cancel()  # interrupted (Ctrl-C): the work stops too
            raise

    def iterate(self, items: AsyncIterator[T], timeout: float | None = None) -> Iterator[T]:
        """An async iterator's items, one at a time; TimeoutError once ``timeout`` seconds
        have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    yield self.call(anext, items, timeout=left)
                except StopAsyncIteration:
                    return
        finally:
            close = getattr(items, "aclose", None)
            if close is not None and not self._loop.is_closed():
                self.call(close)

    def log_in(self, email: str, password: str, name: str = "api") -> TokenOut:
        """A new token (and this client uses it from now on)."""
        return self.call(self.inner.log_in, email, password, name)

    def usage(self) -> UserUsage:
        return self.call(self.inner.usage)

    def artifact(self, sid: str, artifact_id: str) -> bytes:
        return self.call(self.inner.artifact, sid, artifact_id)

    def list_files(self, sid: str, path: str = ".") -> FileListing:
        return self.call(self.inner.list_files, sid, path)

    def download(self, sid: str, path: str) -> bytes:
        return self.call(self.inner.download, sid, path)

    def upload(self, sid: str, path: str, data: bytes) -> FileEntry:
        return self.call(self.inner.upload, sid, path, data)

    def delete_file(self, sid: str, path: str) -> None:
        self.call(self.inner.delete_file, sid, path)

    def events(
        self, sid: str, after: int = 0, timeout: float | None = None, idle: float | None = None
    ) -> Iterator[Event]:
        """The session's events after ``after``, live (AsyncBerth.events), or TimeoutError
        after ``timeout`` seconds."""
        return self.iterate(self.inner.events(sid, after, idle), timeout)


class Sessions:
    def __init__(self, berth: Berth) -> None:
        self._berth = berth

    def create(self, template: str | None = None) -> Session:
        return Session(self._berth, self._berth.call(self._berth.inner.sessions.create, template))

    def list(self, limit: int = core.PAGE) -> Iterator[Session]:
        for found in self._berth.iterate(self._berth.inner.sessions.list(limit)):
            yield Session(self._berth, found)

    def get(self, sid: str) -> Session:
        return Session(self._berth, self._berth.call(self._berth.inner.sessions.get, sid))

    def end(self, sid: str, preserve: bool = False) -> Session:
        return Session(self._berth, self._berth.call(self._berth.inner.sessions.end, sid, preserve))

    def resume(self, sid: str) -> Session:
        return Session(self._berth, self._berth.call(self._berth.inner.sessions.resume, sid))


class Session:
    """A session; ``info`` is what the server said of it last (``refresh()`` asks again)."""

    def __init__(self, berth: Berth, inner: aio.Session) -> None:
        self._berth = berth
        self.inner = inner
        self.id = inner.id

    def __repr__(self) -> str:
        return f"Session({self.id!r}, {self.info.status})"

    @property
    def info(self) -> SessionOut:
        return self.inner.info

    def refresh(self) -> SessionOut:
        return self._berth.call(self.inner.refresh)

    def run(self, prompt: str, idempotency_key: str | None = None) -> Task:
        """Queue a task (once, however often the request is retried)."""
        return Task(self._berth, self._berth.call(self.inner.run, prompt, idempotency_key))

    def tasks(self) -> Iterator[Task]:
        for found in self._berth.iterate(self.inner.tasks()):
            yield Task(self._berth, found)

    def task(self, tid: str) -> Task:
        return Task(self._berth, self._berth.call(self.inner.task, tid))

    def events(self, after: int = 0, timeout: float | None = None) -> Iterator[Event]:
        return self._berth.events(self.id, after, timeout)

    def artifact(self, artifact_id: str) -> bytes:
        return self._berth.call(self.inner.artifact, artifact_id)

    def end(self, preserve: bool = False) -> SessionOut:
        return self._berth.call(self.inner.end, preserve)

    def resume(self) -> SessionOut:
        return self._berth.call(self.inner.resume)


class Task:
    """A task of a session; ``status`` as last seen."""

    def __init__(self, berth: Berth, inner: aio.Task) -> None:
        self._berth = berth
        self.inner = inner
        self.id = inner.id
        self.session_id = inner.session_id

    def __repr__(self) -> str:
        return f"Task({self.id!r}, {self.status})"

    @property
    def status(self) -> str:
        return self.inner.status

    def get(self) -> TaskOut:
        return self._berth.call(self.inner.get)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """This task's events, live, until it ends (TimeoutError after ``timeout`` s)."""
        return self._berth.iterate(self.inner.events(), timeout)

    def wait(self, timeout: float | None = None, check: bool = False) -> TaskOut:
        """The task once it has ended; with ``check``, TaskFailed unless it succeeded."""
        return self._berth.call(self.inner.wait, check, timeout=timeout)

    def pause(self) -> TaskRefOut:
        return self._berth.call(self.inner.pause)

    def resume(self) -> TaskRefOut:
        return self._berth.call(self.inner.resume)

    def cancel(self) -> TaskRefOut:
        return self._berth.call(self.inner.cancel)

    def modify(self, instruction: str) -> TaskRefOut:
        return self._berth.call(self.inner.modify, instruction)
