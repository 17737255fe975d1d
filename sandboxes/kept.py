"""Kept disks on this host: what each takes on disk, written onto its sandbox's row (the
API's per-user byte cap reads it), and their removal once older than the age limit
(BERTH_KEPT_MAX_AGE_DAYS), counted from the end of their session, the date the dashboard
and the API show beforehand (``kept_until``).

A removal is said in the session's log first (``sandbox.kept_expired``: the session is no
longer resumable, so no resume starts meanwhile), then the folder goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from sandboxes.provider import SandboxProvider
from store import events
from store.events import EventType
from store.models import SandboxRow, SessionRow, utcnow

log = logging.getLogger("berth.kept")

# How often the host looks at its kept disks: they age in days, and their size changes
# only when one is kept or restored.
SWEEP_EVERY_S = 600.0


def kept_until(ended_at: datetime | None, max_age_days: float) -> datetime | None:
    """When a disk kept at ``ended_at`` is removed; None if never (no age limit)."""
    if ended_at is None or not max_age_days:
        return None
    return ended_at + timedelta(days=max_age_days)


def size_on_disk(folder: Path) -> int:
    """Bytes the folder's files take (allocated blocks: a sparse disk counts what it holds)."""
    total = 0
    for path, _, files in os.walk(folder):
        for name in files:
            found = os.lstat(os.path.join(path, name))
            total += found.st_blocks * 512
    return total


@dataclass
class KeptReport:
    measured: int = 0
    removed: list[str] = field(default_factory=list)


class KeptDisks:
    def __init__(self, provider: SandboxProvider, engine: Engine, max_age_days: float) -> None:
        self.provider = provider
        self.engine = engine
        self.max_age_days = max_age_days

    def _kept(self) -> list[tuple[str, str, datetime | None]]:
        """(sandbox id, session id, session end) of this host's kept disks."""
        with Session(self.engine) as db:
            rows = db.exec(
                select(SandboxRow.id, SandboxRow.session_id, SessionRow.ended_at)
                .join(SessionRow, col(SessionRow.id) == col(SandboxRow.session_id))
                .where(
                    SandboxRow.status == "preserved",
                    SandboxRow.host_id == self.provider.host_id,
                    SandboxRow.provider == self.provider.name,
                    col(SessionRow.preserved),
                    col(SessionRow.ended_at).is_not(None),
                )
            )
            return [(r[0], r[1], r[2]) for r in rows]

    def sweep_once(self, now: datetime | None = None) -> KeptReport:
        now = now or utcnow()
        report = KeptReport()
        for sandbox_id, session_id, ended_at in self._kept():
            folder = self.provider.preserved(sandbox_id)
            until = kept_until(ended_at, self.max_age_days)
            if until is not None and until <= now:
                self._expire(sandbox_id, session_id, folder)
                report.removed.append(sandbox_id)
                continue
            size = size_on_disk(folder) if folder.exists() else 0
            with Session(self.engine) as db:
                row = db.get(SandboxRow, sandbox_id)
                if row is not None and row.kept_bytes != size:
                    row.kept_bytes = size
                    db.add(row)
                    db.commit()
            report.measured += 1
        return report

    def _expire(self, sandbox_id: str, session_id: str, folder: Path) -> None:
        with Session(self.engine) as db:
            events.record(
                db, session_id, EventType.sandbox_kept_expired,
                {"sandbox_id": sandbox_id, "days": self.max_age_days},
                key=f"kept-expired:{sandbox_id}",
            )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        log.info(
            "kept disk of sandbox %s (session %s) removed: past its age", sandbox_id, session_id
        )

    async def forever(self, every_s: float, stop: asyncio.Event) -> None:
        """Sweep every ``every_s`` until ``stop``; a failed pass is logged, the next tries."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.sweep_once)
            except Exception:
                log.exception("sweeping the kept disks failed; trying again later")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
