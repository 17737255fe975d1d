"""Artifacts: files that steps make (screenshots, ...), kept out of the event log and out of
workflow payloads. The bytes go under ``<root>/<session_id>/<artifact_id>`` (private files),
a row in ``artifacts`` says whose they are; events and step outcomes carry only the id."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from store import nofollow
from store.models import ArtifactRow

# Session ids and artifact ids as they may appear in a path: nothing that walks elsewhere.
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ArtifactTooLarge(ValueError):
    pass


def artifact_id(session_id: str, exec_id: str, name: str) -> str:
    """The same for every attempt of a step, so a retry stores an artifact once."""
    return hashlib.sha256(f"{session_id}\0{exec_id}\0{name}".encode()).hexdigest()[:32]


class ArtifactStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path(self, session_id: str, artifact_id: str) -> Path:
        if not (SAFE_ID.fullmatch(session_id) and SAFE_ID.fullmatch(artifact_id)):
            raise ValueError(f"not an artifact id: {artifact_id[:80]!r}")
        return self.root / session_id / artifact_id

    def save(
        self,
        db: Session,
        *,
        session_id: str,
        task_id: str,
        step_index: int,
        exec_id: str,
        name: str,
        media_type: str,
        data: bytes,
    ) -> str:
        """Store an artifact (again: the same id, nothing twice) and return its id."""
        if len(data) > self.max_bytes:
            raise ArtifactTooLarge(
                f"artifact {name} has {len(data)} bytes; {self.max_bytes} at most"
            )
        found = artifact_id(session_id, exec_id, name)
        self.path(session_id, found)  # both ids fit in a path
        # Private folders, the store's own too: the artifacts of other users' sessions are not
        # to be listed. The store may belong to another user (the API's, berth/privileges.py),
        # who could have put links in it: its folders are opened without following one.
        self.root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with nofollow.folder(self.root.parent, self.root.name) as store:
            owner = os.fstat(store)
            session = nofollow.open_folder(store, session_id)
            try:
                self._to_owner(session, owner)
                self._write(session, found, data, owner)
            finally:
                os.close(session)
        if db.get(ArtifactRow, found) is None:
            db.add(
                ArtifactRow(
                    id=found,
                    session_id=session_id,
                    task_id=task_id,
                    step_index=step_index,
                    name=name,
                    media_type=media_type,
                    size=len(data),
                )
            )
            try:
                db.commit()
            except IntegrityError:
                db.rollback()  # another attempt stored it meanwhile
        return found

    def _write(self, folder: int, name: str, data: bytes, owner: os.stat_result) -> None:
        """Written aside and renamed, so a reader never sees half a file; the draft is made
        here (O_EXCL), never a file or link that was waiting under its name."""
        draft = f".draft-{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(draft, flags, 0o600, dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as sink:
                sink.write(data)
                self._to_owner(sink.fileno(), owner)
            os.replace(draft, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(draft, dir_fd=folder)
            raise

    def _to_owner(self, fd: int, owner: os.stat_result) -> None:
        """Files belong to the store's owner: a worker running as root writes them for an API
        that may run as another user (berth/privileges.py); handed over through their
        descriptors, so never through a link."""
        if os.geteuid() == 0:
            nofollow.give(fd, owner.st_uid, owner.st_gid)

    def find(self, db: Session, session_id: str, artifact_id: str) -> tuple[ArtifactRow, Path]:
        """The artifact of this session and its file; LookupError if there is none."""
        row = db.get(ArtifactRow, artifact_id) if SAFE_ID.fullmatch(artifact_id) else None
        if row is None or row.session_id != session_id:
            raise LookupError(f"no artifact {artifact_id[:80]} in session {session_id}")
        path = self.path(session_id, artifact_id)
        if not path.is_file():
            raise LookupError(f"artifact {artifact_id} of session {session_id} has no file")
        return row, path
