"""The unprivileged user that a machine's steps run as.

The agent stays root (it must start, watch and kill processes), but nothing a step runs
does: terminal commands and the browser go through ``setpriv`` to the step user, with no
capabilities and no way to gain any (no_new_privs: setuid and file-capability binaries give
nothing), and file steps touch the filesystem with the step user's rights (its uid and gid,
none of root's supplementary groups). Steps enter their working directory as the user, too.
So a step cannot read what only root may (the guest token) nor write outside what the user
owns.

Nothing of the step user's reaches root's code either: the agent runs ``python3 -I`` from
``/`` (no user site, no ``PYTHON*`` variables, no working directory on ``sys.path``), and
every process it starts gets an environment made here from nothing, never one inherited.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import pwd
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

# The step user of Berth's images (Docker's and VMs'), and its home: the workspace, steps'
# cwd. Mode 0711, so the agent (root, without CAP_DAC_* in a container) can start steps in it.
STEP_USER = "berth"
STEP_UID = 1000
WORKSPACE = "/home/berth"
WORKSPACE_MODE = 0o711

# Where the guest's processes find programs: the image's own directories, nothing inherited.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LANG = "C.UTF-8"

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")
# The raw setgroups system call (glibc's wrapper applies a change to every thread of the
# process; the kernel's own call, to the calling thread only), by machine.
SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}


def clean_environment(home: str, **more: str) -> dict[str, str]:
    """An environment built from nothing: the image's PATH and locale, ``home`` as HOME, and
    ``more``; no HOME, OLDPWD, PWD, CDPATH or PYTHON* of anyone else's."""
    return {"PATH": PATH, "LANG": LANG, "TERM": "dumb", "HOME": home, **more}


def own_environment(**more: str) -> dict[str, str]:
    """A clean environment for what the agent runs as itself (its helpers, Playwright's
    driver): its own home from the password database, not from any variable."""
    return clean_environment(pwd.getpwuid(os.getuid()).pw_dir, **more)


@dataclass(frozen=True)
class StepUser:
    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def named(cls, name: str) -> StepUser:
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run as this user: its uid and gid only, every capability dropped."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
            *argv,
        ]

    def environment(self) -> dict[str, str]:
        """The whole environment of a process this user runs (a step, Chromium)."""
        return clean_environment(self.home, USER=self.name, LOGNAME=self.name, SHELL="/bin/bash")

    @contextlib.contextmanager
    def filesystem(self) -> Iterator[None]:
        """File access from the calling thread (only) with this user's rights.

        The filesystem ids are per thread (unlike setuid, which glibc applies to every
        thread), so the agent's other threads keep root's; leaving the fsuid 0 also restores
        the file capabilities root had.
        """
        own_groups = os.getgroups()  # this thread's
        _thread_groups([])  # root's groups (0, disk...) would still open their files
        _libc.setfsgid(self.gid)
        _libc.setfsuid(self.uid)
        try:
            if _libc.setfsuid(-1) != self.uid:  # -1 changes nothing, answers the current fsuid
                raise PermissionError(f"cannot take the file rights of {self.name}")
            yield
        finally:
            _libc.setfsuid(os.getuid())
            _libc.setfsgid(os.getgid())
            _thread_groups(own_groups)


def _thread_groups(groups: list[int]) -> None:
    """Set the calling thread's supplementary groups (only its own: see SYS_SETGROUPS)."""
    number = SYS_SETGROUPS.get(platform.machine())
    if number is None:
        raise PermissionError(f"no thread-only setgroups known on {platform.machine()}")
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    if _libc.syscall(number, len(groups), array) != 0:
        error = ctypes.get_errno()
        raise PermissionError(error, f"cannot set this thread's groups: {os.strerror(error)}")


def with_rights(user: StepUser | None, work: Callable[..., T], *args: object) -> T:
    """``work(*args)`` with ``user``'s file rights (as the agent itself without a user); for
    a worker thread, since the rights are the calling thread's."""
    if user is None:
        return work(*args)
    with user.filesystem():
        return work(*args)
