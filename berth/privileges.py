"""`make run` as root: the processes that need no root (the API, the Temporal server) run as
an unprivileged system user (BERTH_RUN_AS, made if missing).

Root is kept by the supervisor (it starts the Docker engine) and the worker: it drives
Docker (whose socket is root's equal anyway), libvirt, and iptables rules for every VM it
makes, so an unprivileged worker would need grants that give root back.

The user owns one folder, the data dir's ``shared/`` (Settings.shared_dir): what its processes
write or read, that is the databases (with the journals made beside them), the artifacts
(written by the worker, read by the API: see store/artifacts.py) and the API's secrets (user
tokens, payloads). The data dir and everything else in it stay root's (the guest token
secret, the gateway's key, logs, pid files, VM images, kept disks), so the user can neither
read them nor swap what root opens there. A TLS key it could not read is given to it as a
private copy in its folder.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from config.keys import payload_keys, user_keys
from config.settings import Settings
from store import nofollow

log = logging.getLogger(__name__)

NO_HOME = "/nonexistent"


class Unreachable(RuntimeError):
    """The account cannot reach what its processes need."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int

    @property
    def groups(self) -> set[int]:
        return {self.gid} | {g.gr_gid for g in grp.getgrall() if self.name in g.gr_mem}

    def may(self, path: Path, bit: int) -> bool:
        """Whether the account has permission ``bit`` (4 read, 1 search) on ``path``."""
        st = path.stat()
        if st.st_uid == self.uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid in self.groups:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    def blocked_at(self, path: Path) -> Path | None:
        """The first directory on the way to ``path`` that the account may not enter."""
        for folder in (*reversed(path.parents), path):
            if folder.is_dir() and not self.may(folder, 1):
                return folder
        return None


def unprivileged(settings: Settings) -> Account | None:
    """The account to run the API and Temporal as: None unless this process is root and
    BERTH_RUN_AS names one; made (a system user) if missing."""
    if os.geteuid() != 0 or not settings.run_as:
        return None
    try:
        entry = pwd.getpwnam(settings.run_as)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", NO_HOME,
             "--shell", "/usr/sbin/nologin", settings.run_as],
            check=True, capture_output=True,
        )  # fmt: skip
        entry = pwd.getpwnam(settings.run_as)
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def interpreter() -> tuple[Path, ...]:
    """Where the API's Python lives: the virtualenv, and the installation it links to."""
    return Path(sys.executable).parent, Path(sys.base_prefix).resolve()


def _readable_copy(account: Account, path: Path, copy: Path) -> Path:
    """``path``, or a private copy of it that the account owns if it may not read it. The
    copy is in the account's folder: written to a draft made here (O_EXCL, never a link
    waiting under the name) and renamed over whatever the account left at ``copy``."""
    if account.blocked_at(path.parent) is None and account.may(path, 4):
        return path
    draft = copy.with_name(f".{copy.name}.{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(draft, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as sink, path.open("rb") as source:
            shutil.copyfileobj(source, sink)
            nofollow.give(sink.fileno(), account.uid, account.gid, str(copy))
        draft.replace(copy)
    except BaseException:
        draft.unlink(missing_ok=True)
        raise
    return copy


def settle_layout(settings: Settings) -> None:
    """Move what the API and Temporal write from the data dir's top, where versions before
    the shared folder kept it, into the shared folder (once; nothing there is replaced)."""
    shared = settings.shared_dir
    top = settings.data_dir
    top.mkdir(parents=True, exist_ok=True)
    with nofollow.folder(top, shared.name):
        pass  # made if missing; never moved into through a link
    legacy = [*top.glob("berth.db*"), *top.glob("temporal.db*"), top / "artifacts"]
    legacy += [top / "user_token_secret", top / "payload_secret"]
    for path in legacy:
        if path.exists() and not (shared / path.name).exists():
            path.rename(shared / path.name)


def hand_over(settings: Settings, account: Account) -> dict[str, str]:
    """Give the account what the API and Temporal need; the environment they run with.
    Unreachable (before anything is changed) if it cannot reach the data dir or Python."""
    data = settings.data_dir.resolve()
    for needed in (data.parent, *interpreter()):
        blocked = account.blocked_at(needed)
        if blocked is not None:
            raise Unreachable(
                f"user {account.name} cannot enter {blocked}, so cannot reach {needed} (to "
                "drop root, choose a data dir, checkout and Python it can reach, or chmod o+x "
                "the folders on the way)"
            )
    # Root's: the account only passes through it to the folder it owns. Given back, if an
    # earlier version gave it away.
    os.chown(data, 0, 0, follow_symlinks=False)
    data.chmod(0o711)
    shared = settings.shared_dir
    # The account's folder, where it may have left links (to make root chown or write any
    # path) and hard links (to root's files): root opens nothing there through a link, and
    # hands over only folders and files that have no other name (store/nofollow.py).
    with nofollow.folder(data, shared.name):
        pass  # made if missing; Planted if the name is a link
    # Generated now, as root, if they are not yet: then given to the account.
    user_keys(settings)
    payload_keys(settings)
    with nofollow.folder(shared, settings.artifacts_dir.name):
        pass
    left = nofollow.give_tree(shared, account.uid, account.gid)
    if left:
        log.warning("left alone in %s (links, hard links, special files): %s", shared, left)
    env = {**os.environ, "HOME": str(shared)}
    if settings.tls_cert_file and settings.tls_key_file:
        env["BERTH_TLS_CERT_FILE"] = str(
            _readable_copy(account, settings.tls_cert_file, shared / "api-tls.crt")
        )
        env["BERTH_TLS_KEY_FILE"] = str(
            _readable_copy(account, settings.tls_key_file, shared / "api-tls.key")
        )
    return env
