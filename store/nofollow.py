"""File operations for a root process in a folder another user controls (the data dir's
``shared/``, which belongs to the API's user under `make run` as root: berth/privileges.py).

That user can put a symbolic link, or a hard link to a file of root's, under any name there,
and swap a folder for a link between two calls. So root never resolves a path through it:
each folder is opened by name in its parent's descriptor, without following a link
(O_NOFOLLOW), and what is changed is changed through a descriptor (fchown, fchmod) of the
very file that was checked (fstat: a folder, or a regular file with no other name).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

# A folder opened by name, never through a link (O_NOFOLLOW on the last name; the names
# before it are walked the same way, one at a time).
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A file opened to be looked at or handed over: no link followed, no side effect of opening
# (a FIFO does not block, a terminal does not become ours).
LOOK = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Planted(PermissionError):
    """A link, or a hard link to another file, where root expected its own file or folder."""


def open_folder(parent: int, name: str, make: bool = True, mode: int = 0o700) -> int:
    """The folder ``name`` in the folder open as ``parent``, made (``mode``) if missing and
    ``make``; Planted if the name is a link or anything but a folder."""
    if make:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent)
    try:
        return os.open(name, DIRECTORY, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link, a file, a link to one
            raise Planted(f"{name} is not a folder of its own (a link?): not followed") from exc
        raise


@contextlib.contextmanager
def folder(base: Path, *names: str, make: bool = True, mode: int = 0o700) -> Iterator[int]:
    """A descriptor of ``base/names...``: ``base`` is trusted (a path of root's own), each of
    ``names`` is opened without following a link, and made if missing (with ``make``)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names:
            inner = open_folder(fd, name, make, mode)
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def open_own(path: Path | str, flags: int, mode: int = 0o600, dir_fd: int | None = None) -> int:
    """``os.open`` of a file that must not be a link (O_NOFOLLOW added); Planted if it is."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Planted(f"{path} is a link: not followed") from exc
        raise


def checked(fd: int, name: str = "") -> os.stat_result:
    """The status of the open file ``fd``; Planted unless it is a folder or a regular file
    with one name (a hard link to a file elsewhere would carry root's change there)."""
    found = os.fstat(fd)
    if stat.S_ISDIR(found.st_mode):
        return found
    if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
        raise Planted(f"{name or fd} is not a file of its own (a hard link or special file)")
    return found


def give(fd: int, uid: int, gid: int, name: str = "") -> None:
    """Hand the open file ``fd`` to ``uid``:``gid``, after checked()."""
    found = checked(fd, name)
    if (found.st_uid, found.st_gid) != (uid, gid):
        os.fchown(fd, uid, gid)


def give_tree(base: Path, uid: int, gid: int) -> list[str]:
    """Hand ``base`` and every folder and regular file below it to ``uid``:``gid``, through
    descriptors; links, hard-linked and special files are left alone. Returns what was
    left alone."""
    left: list[str] = []
    with folder(base) as top:
        give(top, uid, gid, str(base))
        for path, _, files, dir_fd in os.fwalk(base, follow_symlinks=False):
            # fwalk opened each folder without following a link, and gives its descriptor.
            give(dir_fd, uid, gid, path)
            for name in files:
                try:
                    fd = os.open(name, LOOK, dir_fd=dir_fd)
                except OSError:  # a link (ELOOP), a socket, gone meanwhile
                    left.append(os.path.join(path, name))
                    continue
                try:
                    give(fd, uid, gid, name)
                except Planted:
                    left.append(os.path.join(path, name))
                finally:
                    os.close(fd)
    return left
