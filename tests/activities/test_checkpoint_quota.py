"""A checkpoint the session takes by itself is held to its user's kept-bytes limit on the
host that saves it (no API call stands before it): refused past the limit, saved below it,
and a retry of a save that happened is never refused."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import Engine
from sqlmodel import Session
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.checkpoints import CheckpointActivities
from activities.models import CheckpointRequest
from sandboxes.models import SandboxInfo
from sandboxes.provider import SandboxProvider
from store.models import CheckpointRow, SessionRow, User, UserLimits


class Saving:
    """The provider's edge: saving a checkpoint writes one file into its folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoint_folder(self, checkpoint_id: str) -> Path:
        return self.root / checkpoint_id

    async def save_checkpoint(self, sandbox: SandboxInfo, folder: Path, memory: bool) -> bool:
        await asyncio.to_thread(self.write, folder)
        return False

    @staticmethod
    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "workspace.tar").write_bytes(b"x" * 100)


def session_with_checkpoint(engine: Engine, size: int, limit: int | None) -> str:
    with Session(engine) as db:
        user = User(email=f"{uuid.uuid4().hex}@example.com", password_hash="x")
        db.add(user)
        db.flush()
        row = SessionRow(user_id=user.id)
        db.add(row)
        db.flush()
        db.add(CheckpointRow(id=uuid.uuid4().hex, session_id=row.id, user_id=user.id,
                             task_queue="q", size_bytes=size))  # fmt: skip
        if limit is not None:
            db.add(UserLimits(user_id=user.id, kept_bytes=limit))
        db.commit()
        return row.id


def request(session_id: str) -> CheckpointRequest:
    sandbox = SandboxInfo(id="sb", session_id=session_id, provider="docker", host_id="h",
                          task_queue="q", template="default", handle="c")  # fmt: skip
    return CheckpointRequest(sandbox=sandbox, checkpoint_id=uuid.uuid4().hex)


async def test_a_checkpoint_past_the_users_kept_bytes_is_refused(
    engine: Engine, tmp_path: Path
) -> None:
    provider = cast(SandboxProvider, Saving(tmp_path))
    over = session_with_checkpoint(engine, size=2000, limit=1000)  # an admin's override
    activities = CheckpointActivities(provider, 5, engine, kept_bytes_default=10**9)
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(activities.take, request(over))
    assert refused.value.type == "QuotaExceeded" and "2000 bytes" in str(refused.value)

    below = session_with_checkpoint(engine, size=2000, limit=None)  # the default: 1 GB
    saved = await ActivityEnvironment().run(activities.take, request(below))
    assert saved.size_bytes >= 100


async def test_a_retried_save_is_not_refused_for_the_bytes_it_added(
    engine: Engine, tmp_path: Path
) -> None:
    provider = cast(SandboxProvider, Saving(tmp_path))
    sid = session_with_checkpoint(engine, size=2000, limit=1000)
    asked = request(sid)
    provider.checkpoint_folder(asked.checkpoint_id).mkdir()  # the first attempt saved it
    activities = CheckpointActivities(provider, 5, engine)
    saved = await ActivityEnvironment().run(activities.take, asked)
    assert saved.size_bytes >= 100
