"""File steps: write, read or list inside the workspace, and nowhere else.

A path is resolved with every symlink followed before it is used, and refused if it ends
up outside the workspace; the last component is then opened without following a symlink,
so one planted in between is not followed either. (The machine is the real boundary; this
keeps a step to what it was meant to touch.) With a step user, every access is made with that
user's rights, so a directory swapped for a symlink mid-way (by a step's background process)
leads nowhere the user could not go anyway.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from guest_agent.execution import Execution
from guest_agent.protocol import MAX_RESULT_CHARS
from guest_agent.user import StepUser, with_rights

# What a read takes from a file (all of it goes to the output; a prefix to the result).
MAX_READ_BYTES = 1024 * 1024
MAX_LISTED = 1000
T = TypeVar("T")


class Refused(Exception):
    """A path outside the workspace, or a file operation that cannot be done."""


def resolve(workspace: str, path: str) -> Path:
    """``path`` (relative to the workspace, or absolute inside it) with symlinks followed;
    Refused if that leaves the workspace."""
    root = Path(os.path.realpath(workspace))
    real = Path(os.path.realpath(root / path))
    if real != root and root not in real.parents:
        raise Refused(f"{path} is outside the workspace {root}")
    return real


async def run(
    execution: Execution, step: dict[str, Any], workspace: str, user: StepUser | None = None
) -> dict[str, Any]:
    """Do the step (with ``user``'s rights, if given); returns its result. Refused (with the
    reason) when it cannot."""
    op, path = step.get("op"), str(step.get("path", ""))

    def access(work: Callable[..., T], *args: Any) -> Awaitable[T]:
        return asyncio.to_thread(with_rights, user, work, *args)

    target = await access(resolve, workspace, path)
    try:
        if op == "write":
            data = str(step.get("content", "")).encode()
            await access(_write, target, data)
            await execution.say(f"wrote {len(data)} bytes to {target}")
            return {}
        if op == "read":
            text = await access(_read, target)
            if text:
                await execution.say(text.removesuffix("\n"))
            return {"content": text[:MAX_RESULT_CHARS]}
        if op == "list":
            entries = await access(_list, target)
            await execution.say("\n".join(entries) if entries else f"{path} is empty")
            return {"content": "\n".join(entries)[:MAX_RESULT_CHARS]}
    except OSError as exc:
        raise Refused(f"{op} {path}: {exc.strerror or exc}") from None
    raise Refused(f"unknown file operation {op!r}")


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as sink:
        sink.write(data)


def _read(target: Path) -> str:
    fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise Refused(f"{target} is not a regular file")
        data = source.read(MAX_READ_BYTES + 1)
    text = data[:MAX_READ_BYTES].decode(errors="replace")
    if len(data) > MAX_READ_BYTES:
        text += f"\n[only the first {MAX_READ_BYTES} bytes were read]\n"
    return text


def _list(target: Path) -> list[str]:
    """One line per entry: ``name/`` for a directory, ``name  size`` for anything else."""
    with os.scandir(target) as found:
        everything = sorted(found, key=lambda e: e.name)
    entries = [
        f"{entry.name}/"
        if entry.is_dir(follow_symlinks=False)
        else f"{entry.name}  {entry.stat(follow_symlinks=False).st_size}"
        for entry in everything[:MAX_LISTED]
    ]
    if len(everything) > MAX_LISTED:
        entries.append(f"[{len(everything) - MAX_LISTED} more entries not listed]")
    return entries
