"""A person's file operations on the workspace (list, read, walk, write, delete), each over
a channel of its own (see protocol.py): what the dashboard's files panel and the files API do.

Every filesystem access is made with the step user's rights (user.py), on a path that
files.resolve confines to the workspace, its last component opened without following a
symlink: a person reaches through here what a step could, and nothing more. An upload goes
to a new file beside its target, renamed over it once whole, so a cut upload leaves no half
file behind.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from guest_agent.files import MAX_LISTED, Refused, resolve
from guest_agent.protocol import MAX_DATA_BYTES, Close, Data
from guest_agent.user import StepUser, with_rights

# Files a walk (a folder's download) names at most.
MAX_WALKED = 10_000
T = TypeVar("T")
# Sends one frame of the channel to the backend.
Send = Callable[[Data | Close], Awaitable[None]]


class Hands:
    """The file operations of one machine's workspace, as ``user``."""

    def __init__(self, workspace: str, user: StepUser | None) -> None:
        self.workspace, self.user = workspace, user

    def _as_user(self, work: Callable[..., T], *args: Any) -> Awaitable[T]:
        return asyncio.to_thread(with_rights, self.user, work, *args)

    async def serve(
        self, channel: str, args: dict[str, Any], inbox: asyncio.Queue[Data | Close], send: Send
    ) -> None:
        """Do the operation ``args`` names; its close (with the result or the reason it was
        refused) is always sent."""
        op, path = args.get("op"), str(args.get("path", ""))
        # The reason starts with its class (the API answers each with its own status).
        try:
            target = await self._as_user(resolve, self.workspace, path)
            result = await self._do(op, target, channel, inbox, send)
        except Refused as exc:
            await send(Close(channel, error=f"refused: {exc}"))
        except FileNotFoundError:
            await send(Close(channel, error=f"missing: {path} does not exist"))
        except PermissionError:
            await send(Close(channel, error=f"refused: the step user may not {op} {path}"))
        except OSError as exc:
            await send(Close(channel, error=f"failed: {op} {path}: {exc.strerror or exc}"))
        else:
            await send(Close(channel, result=result))

    async def _do(
        self,
        op: object,
        target: Path,
        channel: str,
        inbox: asyncio.Queue[Data | Close],
        send: Send,
    ) -> dict[str, Any]:
        root = await self._as_user(resolve, self.workspace, ".")
        if op == "list":
            return await self._as_user(_describe, target)
        if op == "walk":
            return await self._as_user(_walk, target)
        if op == "read":
            fd = await self._as_user(_open_regular, target)
            with os.fdopen(fd, "rb") as source:
                size = 0
                while chunk := await asyncio.to_thread(source.read, MAX_DATA_BYTES):
                    size += len(chunk)
                    await send(Data(channel, chunk))
            return {"size": size}
        if op == "write":
            if target == root:
                raise Refused("the workspace itself is a folder, not a file")
            fd, draft = await self._as_user(_draft, target)
            try:
                with os.fdopen(fd, "wb") as sink:
                    while isinstance(frame := await inbox.get(), Data):
                        await asyncio.to_thread(sink.write, frame.data)
                    size = sink.tell()
                if frame.error is not None:  # the upload was cut: nothing of it is kept
                    raise Refused(f"the upload did not finish: {frame.error}")
                await self._as_user(os.replace, draft, target)
            except BaseException:
                await self._as_user(_unlink_quietly, draft)
                raise
            return {"size": size}
        if op == "delete":
            if target == root:
                raise Refused("the workspace itself cannot be deleted")
            await self._as_user(_delete, target)
            return {}
        raise Refused(f"unknown file operation {op!r}")


def _describe(target: Path) -> dict[str, Any]:
    """A folder's entries (name, kind, size), or a file's own size."""
    info = os.lstat(target)
    if not stat.S_ISDIR(info.st_mode):
        return {"kind": _kind(info.st_mode), "size": info.st_size, "entries": []}
    with os.scandir(target) as found:
        everything = sorted(found, key=lambda e: e.name)
    entries = []
    for entry in everything[:MAX_LISTED]:
        mode = entry.stat(follow_symlinks=False)
        entries.append({"name": entry.name, "kind": _kind(mode.st_mode), "size": mode.st_size})
    return {"kind": "dir", "size": 0, "entries": entries, "more": len(everything) > MAX_LISTED}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "link" if stat.S_ISLNK(mode) else "other"


def _walk(target: Path) -> dict[str, Any]:
    """The regular files under a folder, by path relative to it (symlinks not followed)."""
    found: list[str] = []
    for folder, dirs, names in os.walk(target, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(str(path.relative_to(target)))
                if len(found) >= MAX_WALKED:
                    return {"files": found, "more": True}
    return {"files": found, "more": False}


def _open_regular(target: Path) -> int:
    fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(f"{target.name} is not a regular file")
    return fd


def _draft(target: Path) -> tuple[int, Path]:
    """A new file beside ``target`` (its folders made), open for writing."""
    if target.is_dir() and not target.is_symlink():
        raise Refused(f"{target.name} is a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    draft = target.with_name(f".{target.name}.{secrets.token_hex(4)}.upload")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return fd, draft


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)


def _delete(target: Path) -> None:
    if stat.S_ISDIR(os.lstat(target).st_mode):
        shutil.rmtree(target)  # fd-based on Linux: a symlink inside is removed, not followed
    else:
        target.unlink()
