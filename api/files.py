"""A session's workspace files for its owner: list, download (a folder as a zip), upload,
delete. Each operation is a channel to the session's guest (api/guest_link.py), done there
with the step user's rights, confined to the workspace (guest_agent/hands.py).
"""

from __future__ import annotations

import posixpath
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from urllib.parse import quote

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from api.deps import Problem
from api.guest_link import guest_channel
from config.settings import Settings

MAX_PATH_CHARS = 4096
# Bytes of a zip read (or an upload sent) at a time.
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


async def listing(settings: Settings, sandbox_id: str, path: str) -> FileListing:
    async with guest_channel(settings, sandbox_id, "file", {"op": "list", "path": path}) as link:
        found = await link.result()
    return FileListing(path=path, **found)


async def read(settings: Settings, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
    async with guest_channel(settings, sandbox_id, "file", {"op": "read", "path": path}) as link:
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
    async with guest_channel(settings, sandbox_id, "file", {"op": "walk", "path": path}) as link:
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
    async with guest_channel(settings, sandbox_id, "file", {"op": "write", "path": path}) as link:
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
    async with guest_channel(settings, sandbox_id, "file", {"op": "delete", "path": path}) as link:
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
