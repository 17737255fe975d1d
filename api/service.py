"""What a user can do, shared by the JSON API and the dashboard.

A session is a row plus a SessionWorkflow; everything that changes a running session is a
Temporal update on that workflow, whose validators say no with a reason the user sees.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from datetime import datetime
from enum import StrEnum
from typing import TypeVar

from fastapi.responses import FileResponse
from pydantic import BaseModel
from sqlmodel import Session, col, func, or_, select
from sqlmodel.sql.expression import SelectOfScalar
from temporalio.client import (
    Client,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

import vm_templates
from activities.fleet import fleet as read_fleet
from activities.models import pool_workflow_id
from api import preferences, quotas
from api.deps import Problem, TemporalLink
from api.problems import logged
from api.schemas import PoolOut, SessionOut, StepOut, TaskOut, TaskRefOut
from config.settings import Settings
from llm.accounting import task_usage
from sandboxes.kept import kept_until
from sandboxes.models import SandboxInfo
from store import audit
from store.artifacts import ArtifactStore
from store.db import take_turn
from store.models import (
    CheckpointRow,
    SandboxRow,
    SessionRow,
    SessionStatus,
    StepRow,
    TaskRow,
    TaskStatus,
    User,
    utcnow,
)
from telemetry import tracing
from workflows import search, sweeper
from workflows.client import workflow_id
from workflows.models import (
    AutoCheckpoint,
    SessionInput,
    TaskControl,
    TaskModification,
    TaskRef,
    TaskSubmission,
)
from workflows.placement import Placement, place
from workflows.pool import SandboxPool
from workflows.session import SessionWorkflow

FINAL = (SessionStatus.ended, SessionStatus.failed)
# When a session refused for want of a host with room may be asked for again: a host's
# heartbeat (BERTH_HOST_HEARTBEAT_S) says sooner than this when one has room again.
NO_ROOM_RETRY_S = 30


async def start_session(
    db: Session,
    temporal: TemporalLink,
    settings: Settings,
    user: User,
    template: str | None,
    ip: str | None = None,
    auto_checkpoint: AutoCheckpoint | None = None,
) -> SessionRow:
    """Starts a session of ``template`` (None: the user's preferred one, else the default),
    with the user's other preferences."""
    prefs = preferences.load(db, user)
    template = template or prefs.template or vm_templates.DEFAULT
    if template not in vm_templates.names():
        known = ", ".join(vm_templates.names())
        raise Problem(422, f"no sandbox template {template!r}; known: {known}")
    check_live_sessions(db, settings, user)  # at once, without connecting
    placed = place_session(db, settings, template)
    client = await temporal.client()  # before the row: no session is left half-made
    row = SessionRow(
        user_id=user.id,
        template=template,
        idle_timeout_s=prefs.idle_timeout_s or settings.session_idle_timeout_s,
        hibernate_after_s=prefs.hibernate_after_s or settings.session_hibernate_after_s,
        model=prefs.model,
        auto_checkpoint=auto_checkpoint,
    )
    admit_live(db, settings, user, row)
    audit.record(db, user.id, "session.create", row.id, {"template": template}, ip=ip)
    await start_run(db, client, settings, user, row, placed, searchable=await temporal.searchable())
    return row


def admit_live(db: Session, settings: Settings, user: User, row: SessionRow) -> None:
    """Write ``row`` as one of the user's live sessions if the limit has room (else 429):
    counted and written in one turn of the user's (store/db.py:take_turn), so requests made
    at once to any number of API processes admit exactly as many as the limit allows."""
    take_turn(db, f"live-sessions:{user.id}")
    try:
        check_live_sessions(db, settings, user)
    except Problem:
        db.rollback()
        raise
    db.add(row)
    db.commit()
    db.refresh(row)


def place_session(
    db: Session,
    settings: Settings,
    template: str,
    keeper: str | None = None,
    keeper_only: bool = False,
) -> Placement:
    """The host a new session goes to (workflows/placement.py), from the registry as it
    reads now: one query per session, none per step. No host with room: 503 with
    Retry-After (the client asks again; no queue holds it meanwhile). With no host
    registered yet (its worker not started), this API's own host, as on one machine. A
    resumed session goes back to ``keeper``, the host that kept its disk, while that host is
    active and has room; elsewhere only if the disk is in a folder every host reaches
    (BERTH_KEPT_DISKS_DIR). ``keeper_only``: there or nowhere (a fork of a checkpoint that
    its host keeps)."""
    fleet = read_fleet(db, template, settings.host_lost_after_s)
    if not fleet.hosts:
        return Placement(
            settings.host_id, "no host registered yet: this API's own", settings.host_task_queue
        )
    home = [h for h in fleet.hosts if h.id == keeper]
    if home and place(home, template, fleet.memory_mb, random.Random()).host == keeper:
        return Placement(keeper, "the host that kept its disk", home[0].task_queue)
    if keeper_only:  # what it is made from is on that host alone (a fork's checkpoint)
        raise Problem(
            503,
            f"host {keeper}, which keeps the checkpoint, has no room now; try again later",
            headers={"Retry-After": str(NO_ROOM_RETRY_S)},
        )
    placed = place(fleet.hosts, template, fleet.memory_mb, random.Random())
    if placed.host is None:
        raise Problem(
            503,
            f"{placed.why}; try again later",
            headers={"Retry-After": str(NO_ROOM_RETRY_S)},
        )
    return placed


def check_live_sessions(db: Session, settings: Settings, user: User) -> None:
    """429 once the user has as many live sessions as allowed."""
    live = db.exec(
        select(func.count())
        .select_from(SessionRow)
        .where(SessionRow.user_id == user.id, col(SessionRow.ended_at).is_(None))
    ).one()
    if live >= settings.max_live_sessions:
        raise Problem(
            429,
            f"you have {live} live sessions, the most allowed (BERTH_MAX_LIVE_SESSIONS); "
            "end one first",
        )


async def start_run(
    db: Session,
    client: Client,
    settings: Settings,
    user: User,
    row: SessionRow,
    placed: Placement,
    restore: SandboxInfo | None = None,
    searchable: bool = False,
    fork: str | None = None,
) -> None:
    """Start the session's workflow: a new session, or a resumed one's next run, with the
    timeouts and model the session began with (sessions from before they were kept on the
    row: the system's); with its search attributes when the namespace has them, and a
    summary the Web UI shows without the codec."""
    began = row.idle_timeout_s is not None
    state = "resuming" if restore else "provisioning"
    attributes = (
        search.at_start(user.id, row.template, placed.host or "", SessionStatus.provisioning)
        if searchable
        else None
    )
    try:
        # The summary and details go as ready payloads (past the codec: readable in the Web UI
        # without it); the SDK takes a Payload there though its overloads type only str.
        await client.start_workflow(  # type: ignore[call-overload]
            SessionWorkflow.run,
            SessionInput(
                session_id=row.id,
                template=row.template,
                host_task_queue=placed.task_queue,
                warm_pool=settings.warm_pool,
                idle_timeout_s=row.idle_timeout_s or settings.session_idle_timeout_s,
                hibernate_after_s=(
                    row.hibernate_after_s if began else settings.session_hibernate_after_s
                ),
                step_timeout_s=settings.step_timeout_s,
                max_steps=settings.agent_max_steps,
                max_revisions=settings.agent_max_revisions,
                max_replacements=settings.session_max_replacements,
                model=row.model,
                restore=restore,
                search_attributes=searchable,
                auto_checkpoint=row.auto_checkpoint or settings.session_auto_checkpoint,
                fork=fork,
                checkpoints=list(
                    db.exec(select(CheckpointRow.id).where(CheckpointRow.session_id == row.id))
                ),
                placed_host=placed.host,
                placed_why=placed.why,
            ),
            id=workflow_id(row.id),
            task_queue=placed.task_queue,  # the session lives on its host
            search_attributes=attributes,
            # Ids and states only (the user's id, not their email): operators see these.
            static_summary=search.summary(row.id, row.template, state),
            static_details=search.details(
                row.id, user.id, row.template, f"{placed.host} ({placed.why})"
            ),
        )
    except WorkflowAlreadyStartedError as exc:
        raise Problem(409, f"session {row.id} is running already") from exc
    except RPCError as exc:
        problem = _unavailable(exc)
        row.status, row.error = SessionStatus.failed, f"could not start (error {problem.error_id})"
        row.ended_at = utcnow()
        db.add(row)
        db.commit()
        raise problem from exc


async def resume_session(
    db: Session,
    temporal: TemporalLink,
    settings: Settings,
    user: User,
    row: SessionRow,
    ip: str | None = None,
) -> SessionRow:
    """A new run of an ended session whose sandbox's disk was preserved: same id, same
    event log and tasks, a new machine with the kept disk."""
    kept = db.exec(
        select(SandboxRow).where(SandboxRow.session_id == row.id, SandboxRow.status == "preserved")
    ).first()
    if row.status not in FINAL or not row.preserved or kept is None:
        raise Problem(409, f"session {row.id} is not an ended session with its disk kept")
    check_live_sessions(db, settings, user)  # at once, without connecting
    placed = place_session(db, settings, row.template, keeper=kept.host_id)
    client = await temporal.client()
    restore = SandboxInfo(
        id=kept.id, session_id=row.id, provider=kept.provider, host_id=kept.host_id,
        task_queue=placed.task_queue, template=kept.template, handle=kept.handle,
    )  # fmt: skip
    # Live again from now (the workflow's events say the rest), admitted under the limit
    # before its run starts; a run that cannot start marks it failed again.
    row.status, row.error, row.ended_at = SessionStatus.provisioning, None, None
    admit_live(db, settings, user, row)
    await start_run(db, client, settings, user, row, placed, restore, await temporal.searchable())
    audit.record(db, user.id, "session.resume", row.id, {"sandbox": kept.id}, ip=ip)
    return row


def list_sessions(
    db: Session,
    user: User | None,
    limit: int,
    after: tuple[datetime, str] | None = None,
    search: str | None = None,
) -> list[SessionRow]:
    """Newest first; ``user`` None lists everyone's (admins); ``after`` is the
    (created_at, id) of the last row of the previous page; ``search`` keeps the sessions
    whose id starts with it, whose status or template it is, or with a task that mentions it."""
    query = select(SessionRow)
    if user is not None:
        query = query.where(SessionRow.user_id == user.id)
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        mentioned = select(TaskRow.session_id).where(
            col(TaskRow.prompt).ilike(f"%{escaped}%", escape="\\")
        )
        if user is not None:  # only the user's tasks are searched, not everyone's
            mentioned = mentioned.join(SessionRow).where(SessionRow.user_id == user.id)
        query = query.where(
            or_(
                col(SessionRow.id).startswith(search, autoescape=True),
                col(SessionRow.status) == search,
                col(SessionRow.template) == search,
                col(SessionRow.id).in_(mentioned),
            )
        )
    return list(db.exec(_keyset(query, SessionRow, after, newest_first=True).limit(limit)))


T = TypeVar("T", SessionRow, TaskRow)


def _keyset(
    query: SelectOfScalar[T], table: type[T], after: tuple[datetime, str] | None, newest_first: bool
) -> SelectOfScalar[T]:
    """Rows past ``after`` in (created_at, id) order: a page that does not shift as rows come."""
    created, row_id = col(table.created_at), col(table.id)
    if after is not None:
        moment, last = after
        if newest_first:
            query = query.where(or_(created < moment, (created == moment) & (row_id < last)))
        else:
            query = query.where(or_(created > moment, (created == moment) & (row_id > last)))
    if newest_first:
        return query.order_by(created.desc(), row_id.desc())
    return query.order_by(created, row_id)


def own_session(db: Session, user: User, session_id: str) -> SessionRow:
    """A session the user may change: their own."""
    row = db.get(SessionRow, session_id)
    if row is None or row.user_id != user.id:
        raise Problem(404, f"no session {session_id}")
    return row


def visible_session(db: Session, user: User, session_id: str) -> SessionRow:
    """A session the user may read: their own, or any for an admin."""
    row = db.get(SessionRow, session_id)
    if row is None or not (row.user_id == user.id or user.is_admin):
        raise Problem(404, f"no session {session_id}")
    return row


def session_out(row: SessionRow, settings: Settings) -> SessionOut:
    return SessionOut(
        id=row.id,
        status=row.status,
        template=row.template,
        error=row.error,
        preserved=row.preserved,
        kept_until=kept_until(row.ended_at, settings.kept_max_age_days) if row.preserved else None,
        created_at=row.created_at,
        ended_at=row.ended_at,
        events_url=f"/api/sessions/{row.id}/events",
        parent_id=row.parent_id,
        parent_checkpoint_id=row.parent_checkpoint_id,
    )


async def end_session(
    db: Session,
    temporal: TemporalLink,
    settings: Settings,
    user: User,
    row: SessionRow,
    ip: str | None = None,
    preserve: bool = False,
) -> None:
    """End the session: its sandbox is destroyed, or with ``preserve`` shut down with its
    disk kept, so that resume_session brings it back (429 past the user's kept disks)."""
    if preserve:
        quotas.check_kept(db, settings, user)
    client = await temporal.client()
    handle = client.get_workflow_handle(workflow_id(row.id))
    try:
        if preserve:  # said first: the end reads it
            await handle.signal(SessionWorkflow.preserve_sandbox)
        await handle.cancel()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise _unavailable(exc) from exc
        # Already over: ending it again is not an error.
    # Temporal takes a cancel of a closed workflow without a word: one that closed (or was
    # lost) without writing its end has its row ended now, with the reason.
    await _close_if_over(db, client, row)
    audit.record(db, user.id, "session.delete", row.id, {"preserve": preserve}, ip=ip)


async def _close_if_over(db: Session, client: Client, row: SessionRow) -> None:
    if row.status in FINAL:
        return
    try:
        over = await sweeper.outcome(client, row.id)
    except RPCError as exc:
        raise _unavailable(exc) from exc
    if over is not None:
        sweeper.close_row(db, row.id, over)
        db.refresh(row)


def _unavailable(exc: RPCError) -> Problem:
    # Temporal's message may name internal addresses: it goes to the log only.
    return logged(503, "the orchestrator is unavailable; try again", exc.message)


def idempotency_id(header: str) -> str:
    """A client's Idempotency-Key as the workflow keeps it: short and of fixed size."""
    return hashlib.sha256(header.encode()).hexdigest()[:32]


async def update(
    temporal: TemporalLink,
    row: SessionRow,
    name: str,
    argument: BaseModel,
    idempotency_key: str | None = None,
) -> TaskRefOut:
    """Run one of the workflow's task updates; a validator's refusal becomes a 409. Temporal
    runs an update once per id within a run, so a retried request with the same key gets
    the first answer (across runs, the workflow itself remembers submissions' keys)."""
    ref = await call_update(temporal, row, name, argument, TaskRef, idempotency_key)
    return TaskRefOut(id=ref.id, status=ref.status)


Answer = TypeVar("Answer")


async def call_update(
    temporal: TemporalLink,
    row: SessionRow,
    name: str,
    argument: BaseModel,
    result_type: type[Answer],
    idempotency_key: str | None = None,
) -> Answer:
    """Run one of the workflow's updates (see update), its answer a ``result_type``."""
    if row.status in (SessionStatus.ended, SessionStatus.failed):
        raise Problem(409, f"session {row.id} has {row.status}")
    handle = (await temporal.client()).get_workflow_handle(workflow_id(row.id))
    update_id = f"{name}-{idempotency_key}" if idempotency_key else None
    wait_s = temporal.settings.session_update_timeout_s
    try:
        # Bounded: with the session's worker down, Temporal holds the update until one polls.
        answer: Answer = await asyncio.wait_for(
            handle.execute_update(name, argument, id=update_id, result_type=result_type), wait_s
        )
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as exc:
        raise Problem(
            503,
            f"session {row.id} is not answering (its host may be down); try again later. "
            "A task sent again with the same Idempotency-Key is queued once.",
            headers={"Retry-After": str(math.ceil(wait_s))},
        ) from exc
    except WorkflowUpdateFailedError as exc:
        # The validator's words, without Temporal's wrapping.
        raise Problem(409, str(exc.cause or exc)) from exc
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise Problem(409, f"session {row.id} has ended") from exc
        raise _unavailable(exc) from exc
    return answer


class TaskAction(StrEnum):
    """What a user may do to a task; each is the workflow's update ``<action>_task``."""

    pause = "pause"
    resume = "resume"
    cancel = "cancel"
    modify = "modify"  # the only one that takes an instruction


# What pause, resume and cancel leave a task as: a repeat of one finds it so already.
GOALS = {
    TaskAction.pause: TaskStatus.paused,
    TaskAction.resume: TaskStatus.running,
    TaskAction.cancel: TaskStatus.cancelled,
}


async def submit_task(
    temporal: TemporalLink, row: SessionRow, prompt: str, key: str | None = None
) -> TaskRefOut:
    """Queue a task; with ``key`` (see idempotency_id) it is queued once, however often sent."""
    submission = TaskSubmission(prompt=prompt, key=key, trace=tracing.traceparent())
    return await update(temporal, row, "submit_task", submission, key)


async def control_task(
    temporal: TemporalLink,
    row: SessionRow,
    task_id: str,
    action: str,
    instruction: str | None = None,
) -> TaskRefOut:
    """Pause, resume or cancel a task, or modify it with ``instruction``; a 404 for any
    other action."""
    try:
        chosen = TaskAction(action)
    except ValueError:
        known = ", ".join(TaskAction)
        raise Problem(404, f"no task action {action!r}: {known}") from None
    if chosen is TaskAction.modify:
        if instruction is None:
            raise Problem(422, 'modify needs a body: {"instruction": "..."}')
        change = TaskModification(task_id=task_id, instruction=instruction)
        return await update(temporal, row, "modify_task", change)
    try:
        return await update(temporal, row, f"{chosen}_task", TaskControl(task_id=task_id))
    except Problem as refused:
        if refused.status != 409 or await _task_status(temporal, row, task_id) != GOALS[chosen]:
            raise
    # A retried control (its first answer lost) finds its work done: the same answer again.
    return TaskRefOut(id=task_id, status=GOALS[chosen])


async def _task_status(temporal: TemporalLink, row: SessionRow, task_id: str) -> TaskStatus | None:
    """A task's status as its session's workflow knows it; None if it cannot say."""
    handle = (await temporal.client()).get_workflow_handle(workflow_id(row.id))
    try:
        state = await asyncio.wait_for(
            handle.query(SessionWorkflow.state), temporal.settings.session_update_timeout_s
        )
    except (RPCError, TimeoutError, WorkflowQueryFailedError):
        return None
    live = {task.id: task.status for task in state.tasks}
    return live.get(task_id) or state.finished.get(task_id)


def task_out(db: Session, session_id: str, task_id: str) -> TaskOut:
    task = db.get(TaskRow, task_id)
    if task is None or task.session_id != session_id:
        raise Problem(404, f"no task {task_id} in session {session_id}")
    steps = db.exec(select(StepRow).where(StepRow.task_id == task.id).order_by(col(StepRow.index)))
    return TaskOut(
        id=task.id,
        session_id=task.session_id,
        prompt=task.prompt,
        status=task.status,
        result=task.result,
        error=task.error,
        created_at=task.created_at,
        steps=[StepOut.model_validate(step, from_attributes=True) for step in steps],
        llm=task_usage(db, task.id),
    )


def list_tasks(
    db: Session, session_id: str, limit: int, after: tuple[datetime, str] | None
) -> list[TaskRow]:
    query = select(TaskRow).where(TaskRow.session_id == session_id)
    return list(db.exec(_keyset(query, TaskRow, after, newest_first=False).limit(limit)))


def artifact_response(
    db: Session, settings: Settings, row: SessionRow, artifact_id: str, cache_s: int
) -> FileResponse:
    """A file a step of the session made (a browser step's screenshot, ...), or a 404; kept
    in the reader's own cache only, for ``cache_s``."""
    store = ArtifactStore(settings.artifacts_dir, settings.artifact_max_bytes)
    try:
        artifact, path = store.find(db, row.id, artifact_id)
    except LookupError:
        raise Problem(404, f"no artifact {artifact_id[:80]} in session {row.id}") from None
    return FileResponse(
        path,
        media_type=artifact.media_type,
        filename=artifact.name,
        content_disposition_type="inline",
        # Served as what it says it is (the gateway allows no type a browser would run).
        headers={
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": f"private, max-age={cache_s}",
        },
    )


async def pool_state(temporal: TemporalLink, settings: Settings, template: str) -> PoolOut:
    """The warm pool of a template on this host, from its workflow; 404 if none runs."""
    handle = (await temporal.client()).get_workflow_handle(
        pool_workflow_id(settings.host_id, template)
    )
    try:
        state = await handle.query(SandboxPool.state)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise Problem(404, f"no warm pool of template {template!r} on this host") from exc
        raise _unavailable(exc) from exc
    return PoolOut(
        template=state.template, target=state.target, ready=len(state.ready),
        booting=len(state.booting), hits=state.hits, misses=state.misses,
        boot_failures=state.boot_failures,
    )  # fmt: skip
