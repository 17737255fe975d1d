"""Activities of checkpoints: save a sandbox's machine state (the machine going on), put it
back to one (a rollback), make a new machine from one (a fork), and delete one. They run on
the host queue where the checkpoint is kept (the sandbox's)."""

from __future__ import annotations

import asyncio
import shutil

from sqlalchemy import Engine
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.models import CheckpointRequest, CheckpointSaved, ForkRequest
from sandboxes.kept import size_on_disk
from sandboxes.models import SandboxInfo
from sandboxes.provider import SandboxProvider
from store import kept


def unsupported(exc: NotImplementedError) -> ApplicationError:
    """A provider that cannot do it will not on a retry either."""
    return ApplicationError(str(exc), type="Unsupported", non_retryable=True)


class CheckpointActivities:
    def __init__(
        self,
        provider: SandboxProvider,
        connect_timeout_s: float,
        engine: Engine | None = None,
        kept_bytes_default: int = 0,
    ) -> None:
        self.provider = provider
        self.connect_timeout_s = connect_timeout_s
        # The user's kept-bytes limit is checked here too (with the engine): a checkpoint
        # the session takes by itself passes no API that would check it.
        self.engine, self.kept_bytes_default = engine, kept_bytes_default

    def _over_quota(self, session_id: str) -> str | None:
        if self.engine is None:
            return None
        with Session(self.engine) as db:
            return kept.over_bytes(db, session_id, self.kept_bytes_default)

    @activity.defn(name="TakeCheckpoint")
    async def take(self, request: CheckpointRequest) -> CheckpointSaved:
        folder = self.provider.checkpoint_folder(request.checkpoint_id)
        # A retry after the save (its answer lost) finds the folder: not refused then.
        if not folder.exists():
            why = await asyncio.to_thread(self._over_quota, request.sandbox.session_id)
            if why is not None:
                raise ApplicationError(why, type="QuotaExceeded", non_retryable=True)
        async with heartbeating():
            try:
                memory = await self.provider.save_checkpoint(
                    request.sandbox, folder, request.memory
                )
            except NotImplementedError as exc:
                raise unsupported(exc) from exc
            size = await asyncio.to_thread(size_on_disk, folder)
        return CheckpointSaved(memory=memory, size_bytes=size)

    @activity.defn(name="RollBackSandbox")
    async def roll_back(self, request: CheckpointRequest) -> SandboxInfo:
        """The sandbox put back to the checkpoint, connected: the same machine (a
        container's workspace), or one made again under its id (a VM booted from the
        checkpoint's disk)."""
        folder = self.provider.checkpoint_folder(request.checkpoint_id)
        if not folder.exists():
            raise ApplicationError(
                f"checkpoint {request.checkpoint_id} is not kept on this host",
                type="CheckpointGone",
                non_retryable=True,
            )
        async with heartbeating():
            try:
                return await self.provider.load_checkpoint(
                    request.sandbox, folder, self.connect_timeout_s
                )
            except NotImplementedError as exc:
                raise unsupported(exc) from exc

    @activity.defn(name="ForkSandbox")
    async def fork(self, request: ForkRequest) -> SandboxInfo:
        """A new machine from the checkpoint, its guest connected; a failure removes it."""
        folder = self.provider.checkpoint_folder(request.checkpoint_id)
        async with heartbeating():
            try:
                return await self.provider.from_checkpoint(
                    folder,
                    request.sandbox_id,
                    request.session_id,
                    request.template,
                    self.connect_timeout_s,
                )
            except FileNotFoundError as exc:
                raise ApplicationError(str(exc), type="CheckpointGone", non_retryable=True) from exc
            except Exception:  # a cancel is the session's end, which destroys it itself
                placeholder = self.provider.placeholder(
                    request.sandbox_id, request.session_id, request.template
                )
                await asyncio.shield(self.provider.destroy(placeholder))
                raise

    @activity.defn(name="DeleteCheckpoint")
    async def delete(self, checkpoint_id: str) -> None:
        folder = self.provider.checkpoint_folder(checkpoint_id)
        await asyncio.to_thread(shutil.rmtree, folder, True)
