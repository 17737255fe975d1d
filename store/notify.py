"""Wake-ups for followers of the event log, so a live stream sees a new event within
milliseconds without polling the database.

Writers call ``commit``; readers hold one ``Hub`` per process and ``watch`` a session.
On PostgreSQL the wake-up is ``pg_notify`` in the writing transaction (delivered at commit,
to every API replica). On the embedded SQLite default, API and worker share one machine,
so the writer sends a datagram to each listening process's Unix socket in a folder named
after the database file. A lost wake-up costs a fallback read, never an event: the log is the
truth and followers always read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlmodel import Session

log = logging.getLogger("berth.notify")

CHANNEL = "berth_events"


def commit(db: Session, session_id: str) -> None:
    """Commit, and wake whoever follows ``session_id``'s log, in any process."""
    engine = db.get_bind().engine
    if engine.dialect.name == "postgresql":
        db.execute(select(func.pg_notify(CHANNEL, session_id)))
        db.commit()
        return
    db.commit()
    folder = _bell_folder(engine)
    if folder is not None:
        _ring(folder, session_id.encode())


def _bell_folder(engine: Engine) -> Path | None:
    database = engine.url.database
    if not database or database == ":memory:":
        return None
    # A Unix socket's path must stay short, so not beside the database: in a folder of this
    # user's own in the temp dir, named after the database.
    digest = hashlib.sha256(str(Path(database).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"berth-{os.getuid()}" / f"bell-{digest}"


def _private_folder(folder: Path) -> None:
    """Create ``folder`` (and its parent) as this user's alone, or refuse one that is not:
    in a shared temp dir, another user could otherwise read or block the wake-ups."""
    for path in (folder.parent, folder):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(f"{path} must be a directory of this user's, mode 0700")


def _ring(folder: Path, message: bytes) -> None:
    # Never raises: the event is committed already, and a wake-up is only a hint.
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # nobody listens
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for entry in entries:
            try:
                if not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                    continue
                sender.sendto(message, entry.path)
            except (ConnectionRefusedError, FileNotFoundError):
                # The listener died without unlinking its socket.
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            except OSError:
                pass  # its queue is full (it is awake anyway), or it is no listener of ours


class Hub:
    """One per reading process: turns wake-ups into per-session asyncio events."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @contextlib.contextmanager
    def watch(self, session_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``session_id``'s log may have grown. Clear it before each
        read, so a wake-up that comes between the read and the wait is not lost."""
        bell = asyncio.Event()
        self._watchers.setdefault(session_id, set()).add(bell)
        try:
            yield bell
        finally:
            watchers = self._watchers.get(session_id)
            if watchers is not None:
                watchers.discard(bell)
                if not watchers:
                    del self._watchers[session_id]

    def _wake(self, session_id: str) -> None:
        for bell in self._watchers.get(session_id, ()):
            bell.set()

    async def start(self) -> None:
        if self._engine.dialect.name == "postgresql":
            self._task = asyncio.create_task(self._listen_postgres())
            return
        folder = _bell_folder(self._engine)
        if folder is None:
            return
        _private_folder(folder)
        path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.setblocking(False)
        asyncio.get_running_loop().add_reader(self._socket.fileno(), self._drain)

    def _drain(self) -> None:
        assert self._socket is not None
        while True:
            try:
                message = self._socket.recv(256)
            except BlockingIOError:
                return
            self._wake(message.decode(errors="replace"))

    async def _listen_postgres(self) -> None:
        import psycopg

        url = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    # Whatever was written while we were not listening.
                    for session_id in list(self._watchers):
                        self._wake(session_id)
                    async for note in conn.notifies():
                        self._wake(note.payload)
            except psycopg.Error as exc:
                log.warning("LISTEN %s lost (%s); again in %.1f s", CHANNEL, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._socket is not None:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            path = self._socket.getsockname()
            self._socket.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
