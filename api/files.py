"""A session's workspace files for its owner: list, download (a folder as a zip), upload,
delete. Each operation is a channel to the session's guest (guest_agent/hands.py: done with
the step user's rights, confined to the workspace), reached through the relay of the worker
that holds the guest's link (sandboxes/relay.py).

The guest's refusals come back with their reason, as a problem document: ``refused`` (a path
outside the workspace, one the step user may not touch) is a 403, ``missing`` a 404, any
other failure a 409; a session without a running machine is a 409 too.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from sqlmodel import Session, col, select
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from api.deps import Problem
from config.keys import relay_token
from config.settings import Settings
from store.models import SandboxRow, SessionRow

MAX_PATH_CHARS = 4096
# Bytes read from a downloaded file's stream at a time (one data frame at most).
STATUSES = {"refused": 403, "missing": 404, "failed": 409, "unavailable": 409}
ZIP_CHUNK = 64 * 1024


class FileEntry(BaseModel):
    name: str
    kind: str  # dir, file, link, other
    size: int


class FileListing(BaseModel):
    """A folder's entries (``kind`` dir), or a single file's description."""

    path: str
    kind: str
    size: int
    entries: list[FileEntry]
    more: bool = False  # entries past the listing's bound were left out


def checked_path(path: str) -> str:
    """A path as the guest takes it (relative to the workspace); a 400 for one that cannot
    be a path at all."""
    if len(path) > MAX_PATH_CHARS or "\0" in path:
        raise Problem(400, "a path is at most 4096 characters, without NUL")
    return path.strip() or "."


@dataclass
class Link:
    """One operation's channel to the guest, through the relay."""

    ws: ClientConnection

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def end(self) -> None:
        await self.ws.send("end")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The guest's bytes, until its close: a Problem if the operation failed."""
        while True:
            try:
                message = await self.ws.recv()
            except ConnectionClosed:
                raise Problem(409, "the session's machine went away mid-way") from None
            if isinstance(message, bytes):
                yield message
                continue
            ending = json.loads(message)
            if ending.get("error"):
                raise _problem(str(ending["error"]))
            return

    async def result(self) -> dict[str, Any]:
        """The operation's result, once the guest closes its channel (data dropped)."""
        while True:
            try:
                message = await self.ws.recv()
            except ConnectionClosed:
                raise Problem(409, "the session's machine went away mid-way") from None
            if isinstance(message, str):
                ending = json.loads(message)
                if ending.get("error"):
                    raise _problem(str(ending["error"]))
                return dict(ending.get("result") or {})


def _problem(error: str) -> Problem:
    kind, _, reason = error.partition(": ")
    return Problem(STATUSES.get(kind, 409), reason or error)


def running_sandbox(db: Session, row: SessionRow) -> str:
    """The id of the session's running machine; a 409 if it has none now."""
    found = db.exec(
        select(SandboxRow.id)
        .where(SandboxRow.session_id == row.id, SandboxRow.status == "running")
        .order_by(col(SandboxRow.created_at).desc())
    ).first()
    if found is None:
        raise Problem(409, f"session {row.id} has no running machine now")
    return found


@asynccontextmanager
async def channel(settings: Settings, sandbox_id: str, op: str, path: str) -> AsyncIterator[Link]:
    """A channel open to the sandbox's guest for ``op`` on ``path``."""
    host = settings.relay_host if settings.relay_host not in ("", "0.0.0.0") else "127.0.0.1"
    try:
        async with connect(
            f"ws://{host}:{settings.relay_port}/relay",
            additional_headers={"Authorization": f"Bearer {relay_token(settings)}"},
            max_size=None,
            open_timeout=10,
        ) as ws:
            opening = {"sandbox_id": sandbox_id, "kind": "file", "args": {"op": op, "path": path}}
            await ws.send(json.dumps(opening))
            yield Link(ws)
    except (OSError, InvalidStatus) as exc:
        raise Problem(503, f"the session's host cannot be reached: {exc}") from None


async def listing(settings: Settings, sandbox_id: str, path: str) -> FileListing:
    async with channel(settings, sandbox_id, "list", path) as link:
        found = await link.result()
    return FileListing(path=path, **found)


async def read(settings: Settings, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
    async with channel(settings, sandbox_id, "read", path) as link:
        async for chunk in link.chunks():
            yield chunk


async def first_and_rest(
    settings: Settings, sandbox_id: str, path: str
) -> tuple[bytes, AsyncIterator[bytes]]:
    """A file's stream, its first chunk read already: a refusal is known before the
    response starts."""
    stream = read(settings, sandbox_id, path)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = b""

    async def rest() -> AsyncIterator[bytes]:
        if first:
            yield first
            async for chunk in stream:
                yield chunk

    return first, rest()


async def archive(
    settings: Settings, sandbox_id: str, path: str
) -> tempfile.SpooledTemporaryFile[bytes]:
    """A folder's regular files as a zip (at most BERTH_FILES_MAX_ARCHIVE_BYTES read), in a
    temporary file rewound to its start."""
    async with channel(settings, sandbox_id, "walk", path) as link:
        walked = await link.result()
    # Handed to the response, which reads it to the end and drops it.
    spool: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(8 << 20)  # noqa: SIM115
    total = 0
    with zipfile.ZipFile(spool, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name in walked.get("files", []):
            with zipped.open(str(name), "w", force_zip64=True) as member:
                async for chunk in read(settings, sandbox_id, posixpath.join(path, str(name))):
                    total += len(chunk)
                    if total > settings.files_max_archive_bytes:
                        raise Problem(
                            413,
                            f"the folder holds more than {settings.files_max_archive_bytes} "
                            "bytes (BERTH_FILES_MAX_ARCHIVE_BYTES): download its files one by one",
                        )
                    member.write(chunk)
    spool.seek(0)
    return spool


async def write(settings: Settings, sandbox_id: str, path: str, body: AsyncIterator[bytes]) -> int:
    """Upload ``body`` to ``path``; its size. A 413 past BERTH_FILES_MAX_UPLOAD_BYTES (the
    guest then keeps nothing of it)."""
    cap = settings.files_max_upload_bytes
    async with channel(settings, sandbox_id, "write", path) as link:
        size = 0
        async for chunk in body:
            size += len(chunk)
            if size > cap:
                # Closing without "end" makes the guest drop its draft.
                raise Problem(413, f"the upload is over {cap} bytes (BERTH_FILES_MAX_UPLOAD_BYTES)")
            for start in range(0, len(chunk), ZIP_CHUNK):
                await link.send(chunk[start : start + ZIP_CHUNK])
        await link.end()
        result = await link.result()
    return int(result.get("size", size))


async def delete(settings: Settings, sandbox_id: str, path: str) -> None:
    async with channel(settings, sandbox_id, "delete", path) as link:
        await link.result()


async def download(settings: Settings, sandbox_id: str, path: str) -> Response:
    """A file of the workspace as a response; a folder as a zip of its regular files. A
    refusal is raised before the response starts."""
    found = await listing(settings, sandbox_id, path)
    name = PurePosixPath(path).name or "workspace"
    if found.kind == "dir":
        spool = await archive(settings, sandbox_id, path)
        return StreamingResponse(
            iter(lambda: spool.read(ZIP_CHUNK), b""),
            media_type="application/zip",
            headers={"Content-Disposition": attachment(f"{name}.zip")},
        )
    _first, rest = await first_and_rest(settings, sandbox_id, path)
    return StreamingResponse(
        rest,
        media_type="application/octet-stream",
        headers={"Content-Disposition": attachment(name), "Content-Length": str(found.size)},
    )


def attachment(name: str) -> str:
    """A Content-Disposition that names the file, in any script (RFC 6266)."""
    return f"attachment; filename*=UTF-8''{quote(name)}"
