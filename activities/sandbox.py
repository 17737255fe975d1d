"""Sandbox activities. They run on the worker of the host that holds the sandbox, since the
guest's link ends in that host's gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.models import SandboxRequest, StepRequest
from sandboxes.gateway import GuestUnavailable, SandboxDied, StepKindUnsupported
from sandboxes.models import Health, SandboxInfo, StepOutcome
from sandboxes.policy import CommandPolicy, judge, load_policy
from sandboxes.policy.brief import rules_named
from sandboxes.provider import SandboxProvider
from store import events
from store.artifacts import ArtifactStore
from store.events import EventType, OutputLine
from telemetry.metrics import POLICY_REFUSALS

log = logging.getLogger("berth.activities")

# Output waiting for the database before the guest is held back.
MAX_PENDING_CHARS = 4 * 1024 * 1024
# A batch of output the database could not take (down, restarting) is tried again after
# this long, doubling up to the second figure, until it is stored.
STORE_RETRY_S = (0.2, 5.0)
# How long a cancelled step waits for its command's exit after the kill.
KILL_WAIT_S = 15.0
# Attempts of a step whose guest cannot be reached before it fails (each waits the guest's
# reconnect grace): about 2.5 min with the default grace and Temporal's backoff.
GUEST_UNAVAILABLE_ATTEMPTS = 5


def exec_id(request: StepRequest) -> str:
    """The guest's id of a step's command: the same for every attempt, so a retry
    re-attaches to it instead of running it again."""
    return f"{request.task_id}-{request.index}"


def step_key(task_id: str, index: int, what: str) -> str:
    """The event key of a step's start or end: the same in every attempt and in the
    workflow, so whichever records it first wins."""
    return f"step/{task_id}/{index}/{what}"


class StepRecorder:
    """One step's life in the event log: started, its output (each line once across retried
    attempts, in order, flushed as soon as the previous write is done), its artifacts (in the
    artifact store), and finished."""

    def __init__(self, engine: Engine, artifacts: ArtifactStore, request: StepRequest) -> None:
        self._engine = engine
        self._artifacts = artifacts
        self._session_id = request.sandbox.session_id
        self._request = request
        self._pending: list[OutputLine] = []
        self._pending_chars = 0
        self._started: asyncio.Future[int] | None = None
        self._writer: asyncio.Task[None] | None = None

    def _data(self, **extra: Any) -> dict[str, Any]:
        request = self._request
        return {
            "task_id": request.task_id,
            "index": request.index,
            "step": request.step.model_dump(),
            **extra,
        }

    def begin(self) -> asyncio.Future[int]:
        """Record the start (once); resolves to the last output line an earlier attempt
        stored, from which the guest replays. Output is written only after it."""
        self._started = asyncio.ensure_future(asyncio.to_thread(self._start))
        return self._started

    def _start(self) -> int:
        request = self._request
        with Session(self._engine) as db:
            key = step_key(request.task_id, request.index, "started")
            events.record(db, self._session_id, EventType.step_started, self._data(), key)
            return events.stored_output_seq(db, request.task_id, request.index)

    async def write(self, seq: int, stream: str, text: str) -> None:
        self._pending.append(OutputLine(seq, stream, text))
        self._pending_chars += len(text)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        elif self._pending_chars >= MAX_PENDING_CHARS:
            await asyncio.shield(self._writer)  # the database is behind: hold the guest

    async def _drain(self) -> None:
        assert self._started is not None, "begin() first"
        await self._started
        # Lines that come while one write runs go together in the next.
        while self._pending:
            batch, self._pending, self._pending_chars = self._pending, [], 0
            await self._store_until_stored(batch)

    async def _store_until_stored(self, batch: list[OutputLine]) -> None:
        """Store a batch, waiting out a database that cannot be reached: the lines are the
        step's output, and none may be dropped (the guest is held back meanwhile, once
        MAX_PENDING_CHARS wait behind it)."""
        wait_s, most_s = STORE_RETRY_S
        while True:
            try:
                await asyncio.to_thread(self._store, batch)
                return
            except OperationalError as exc:
                log.warning("step output waits for the database (%s); again in %.1f s",
                            str(exc).splitlines()[0], wait_s)  # fmt: skip
            await asyncio.sleep(wait_s)
            wait_s = min(2 * wait_s, most_s)

    def _store(self, batch: list[OutputLine]) -> None:
        request = self._request
        with Session(self._engine) as db:
            events.append_output(db, self._session_id, request.task_id, request.index, batch)

    async def artifact(self, name: str, media_type: str, data: bytes) -> str:
        """Store an artifact as it arrives; its id is the same in every attempt."""
        return await asyncio.to_thread(self._save_artifact, name, media_type, data)

    def _save_artifact(self, name: str, media_type: str, data: bytes) -> str:
        request = self._request
        with Session(self._engine) as db:
            return self._artifacts.save(
                db,
                session_id=self._session_id,
                task_id=request.task_id,
                step_index=request.index,
                exec_id=exec_id(request),
                name=name,
                media_type=media_type,
                data=data,
            )

    async def finish(self, status: str, outcome: StepOutcome | None, error: str | None) -> None:
        if self._started is not None:
            await self._started
        if self._writer is not None:
            await self._writer
        data = self._data(
            status=status,
            exit_code=outcome.exit_code if outcome else None,
            error=outcome.error if outcome else error,
            check=outcome.check.model_dump() if outcome and outcome.check else None,
            result=outcome.result.model_dump() if outcome and outcome.result else None,
            artifacts=outcome.artifacts if outcome else [],
        )
        request = self._request
        key = step_key(request.task_id, request.index, "finished")
        await asyncio.to_thread(self._finish, data, key)

    def _finish(self, data: dict[str, Any], key: str) -> None:
        with Session(self._engine) as db:
            events.finish_step(db, self._session_id, data, key)


class SandboxActivities:
    def __init__(
        self,
        provider: SandboxProvider,
        engine: Engine,
        connect_timeout_s: float,
        artifacts: ArtifactStore,
        command_policy_path: Path | None = None,
    ) -> None:
        self.provider = provider
        self.engine = engine
        self.connect_timeout_s = connect_timeout_s
        self.artifacts = artifacts
        self.command_policy_path = command_policy_path
        self.policies: dict[str, CommandPolicy] = {}  # by template, read once per worker

    def refuse_unless_allowed(self, request: StepRequest) -> None:
        """Hold a terminal or service step's command to its template's policy before the guest
        sees it; a refused one fails the activity for good, with the reason, and runs nothing."""
        step = request.step
        template = request.sandbox.template
        if template not in self.policies:
            self.policies[template] = load_policy(template, self.command_policy_path)
        policy = self.policies[template]
        if step.kind == "terminal":
            command, verdict = step.command, judge(step.command, policy, cwd=step.cwd)
        elif step.kind == "service" and step.command is not None:
            policy = policy.for_services()
            command, verdict = step.command, judge(step.command, policy)
        else:
            return
        if not verdict.allowed:
            POLICY_REFUSALS.labels(template).inc()
            # The rules of the programs it names, quoted: the planner sees what it ran into.
            quoted = "".join(f"\npolicy rule: {rule}" for rule in rules_named(policy, command))
            raise ApplicationError(
                verdict.reason + quoted, type="CommandRefused", non_retryable=True
            )

    @activity.defn(name="ProvisionSandbox")
    async def provision(self, request: SandboxRequest) -> SandboxInfo:
        """Start the session's sandbox (or find the one an earlier attempt started) and wait
        until its guest agent has dialled in."""
        # Removable by its name until provision() returns it.
        sandbox = self.provider.placeholder(
            request.sandbox_id, request.session_id, request.template
        )
        async with heartbeating():
            try:
                sandbox = await self.provider.provision(
                    request.sandbox_id, request.session_id, request.template
                )
                await self.provider.wait_connected(sandbox, self.connect_timeout_s)
            except asyncio.CancelledError:
                details = activity.cancellation_details()
                if details is not None and details.cancel_requested:
                    await asyncio.shield(self.provider.destroy(sandbox))  # its owner ended
                # Timed out: a newer attempt may be using this very machine now.
                raise
            except Exception:
                # A retry starts afresh under the same id.
                await asyncio.shield(self.provider.destroy(sandbox))
                raise
        return sandbox

    @activity.defn(name="RunStep")
    async def run_step(self, request: StepRequest) -> StepOutcome:
        """Run one step through the guest, recording its start, output and end.

        The command's id is the step's, so a retried attempt re-attaches to the command
        rather than running it twice, and resumes its output after the last line stored.
        The command is killed only when the workflow asks: after a heartbeat timeout or a
        worker shutdown it keeps running for the next attempt to re-attach to.
        """
        self.refuse_unless_allowed(request)
        sandbox = request.sandbox
        command = exec_id(request)
        recorder = StepRecorder(self.engine, self.artifacts, request)
        started = recorder.begin()
        # A first attempt starts the command while its start is being recorded; a retry
        # needs to know where the stored output ends first.
        after_seq = await started if activity.info().attempt > 1 else 0
        run = asyncio.ensure_future(
            self.provider.run_step(
                sandbox,
                command,
                request.step,
                request.timeout_s,
                recorder.write,
                after_seq,
                recorder.artifact,
            )
        )
        try:
            async with heartbeating():
                outcome = await asyncio.shield(run)
        except asyncio.CancelledError:
            details = activity.cancellation_details()
            if details is None or not details.cancel_requested:
                run.cancel()
                raise
            await self.provider.cancel_step(sandbox, command)
            killed: StepOutcome | None = None
            with contextlib.suppress(Exception):
                killed = await asyncio.wait_for(run, KILL_WAIT_S)
            await recorder.finish("cancelled", killed, "cancelled")
            raise
        except SandboxDied as exc:
            # No retry can help: the session replaces the machine for its next task.
            raise ApplicationError(
                f"the sandbox's machine died: {exc}", type="SandboxDied", non_retryable=True
            ) from exc
        except GuestUnavailable as exc:
            # The step's attempts leave room for lost workers (workflows/options.py), not for
            # a guest that stays away: that gives up after as many attempts as it always did.
            last = activity.info().attempt >= GUEST_UNAVAILABLE_ATTEMPTS
            raise ApplicationError(str(exc), type="GuestUnavailable", non_retryable=last) from exc
        except StepKindUnsupported as exc:
            # No retry can help: the machine's guest lacks what the step needs; it never ran.
            await recorder.finish("refused", None, str(exc))
            raise ApplicationError(
                str(exc), type="StepKindUnsupported", non_retryable=True
            ) from exc
        await recorder.finish("succeeded" if outcome.ok else "failed", outcome, None)
        return outcome

    @activity.defn(name="StopStep")
    async def stop_step(self, request: StepRequest) -> None:
        """Kill a step's command if an attempt left it running; one that ended is left be."""
        await self.provider.cancel_step(request.sandbox, exec_id(request))

    @activity.defn(name="CheckSandbox")
    async def check(self, sandbox: SandboxInfo) -> Health:
        """Whether the sandbox's machine runs and its guest is connected, as its host sees
        them now (asked when steps ran out of attempts without the guest)."""
        return await self.provider.health(sandbox)

    @activity.defn(name="DestroySandbox")
    async def destroy(self, sandbox: SandboxInfo) -> None:
        await self.provider.destroy(sandbox)
