"""Sandbox activities. They run on the worker of the host that holds the sandbox, since the
guest's link ends in that host's gateway."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import Engine
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from sandboxes.gateway import GuestUnavailable
from sandboxes.models import SandboxInfo, StepOutcome
from sandboxes.provider import SandboxProvider
from store import events
from workflows.models import SandboxRequest, StepRequest

OUTPUT_FLUSH_S = 0.1


class OutputRecorder:
    """Turns a step's output lines into ``step.output`` events, a batch per ~100 ms, so a
    chatty command costs a few writes a second rather than one per line."""

    def __init__(self, engine: Engine, session_id: str, task_id: str, index: int) -> None:
        self._engine = engine
        self._base = {"task_id": task_id, "index": index}
        self._session_id = session_id
        self._pending: list[tuple[str, str]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, stream: str, text: str) -> None:
        self._pending.append((stream, text))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_later())

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        await self._flush()

    async def _flush_later(self) -> None:
        await asyncio.sleep(OUTPUT_FLUSH_S)
        await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        runs: list[tuple[str, str]] = []
        for stream, text in batch:  # one event per run of the same stream
            if runs and runs[-1][0] == stream:
                runs[-1] = (stream, runs[-1][1] + text)
            else:
                runs.append((stream, text))
        if runs:
            await asyncio.to_thread(self._record, runs)

    def _record(self, runs: list[tuple[str, str]]) -> None:
        with Session(self._engine) as db:
            for stream, text in runs:
                events.record(
                    db,
                    self._session_id,
                    "step.output",
                    {**self._base, "stream": stream, "text": text},
                )


class SandboxActivities:
    def __init__(self, provider: SandboxProvider, engine: Engine, connect_timeout_s: float) -> None:
        self.provider = provider
        self.engine = engine
        self.connect_timeout_s = connect_timeout_s

    @activity.defn(name="ProvisionSandbox")
    async def provision(self, request: SandboxRequest) -> SandboxInfo:
        """Start a sandbox and wait until its guest agent has dialled in."""
        sandbox = await self.provider.provision(
            uuid.uuid4().hex, request.session_id, request.template
        )
        try:
            async with heartbeating():
                await self.provider.wait_connected(sandbox, self.connect_timeout_s)
        except BaseException:
            # A retry makes a new sandbox; this one must not linger.
            await asyncio.shield(self.provider.destroy(sandbox))
            raise
        return sandbox

    @activity.defn(name="RunStep")
    async def run_step(self, request: StepRequest) -> StepOutcome:
        """Run one step through the guest, recording its output as it comes.

        The command's id is the step's, so a retried attempt re-attaches to the command
        rather than running it twice; the heartbeat carries the last output seen.
        """
        exec_id = f"{request.task_id}-{request.index}"
        details = activity.info().heartbeat_details
        after_seq = int(details[0]) if details else 0
        recorder = OutputRecorder(
            self.engine, request.sandbox.session_id, request.task_id, request.index
        )
        try:
            async with heartbeating(
                lambda: self.provider.gateway.last_seq(request.sandbox.id, exec_id) or after_seq
            ):
                outcome = await self.provider.run_step(
                    request.sandbox,
                    exec_id,
                    request.step,
                    request.timeout_s,
                    recorder.write,
                    after_seq,
                )
        except GuestUnavailable as exc:
            raise ApplicationError(str(exc), type="GuestUnavailable") from exc
        except asyncio.CancelledError:
            # A cancelled step is killed in the guest; a worker shutting down leaves it
            # running, for the retry on another worker start to re-attach to.
            if not activity.is_worker_shutdown():
                await self.provider.cancel_step(request.sandbox, exec_id)
            raise
        finally:
            await asyncio.shield(recorder.close())
        return outcome

    @activity.defn(name="DestroySandbox")
    async def destroy(self, sandbox: SandboxInfo) -> None:
        await self.provider.destroy(sandbox)
