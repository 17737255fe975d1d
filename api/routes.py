"""The JSON API under /api."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response, StreamingResponse
from temporalio.service import RPCError, RPCStatusCode

from api import service
from api.deps import (
    DbDep,
    EngineDep,
    HubDep,
    Problem,
    SettingsDep,
    StreamCountDep,
    TemporalDep,
    UserDep,
)
from api.events import stream
from api.schemas import (
    Credentials,
    Modification,
    PoolOut,
    SessionCreate,
    SessionOut,
    TaskCreate,
    TaskOut,
    TaskRefOut,
    TokenOut,
    UserOut,
)
from workflows.models import TaskControl, TaskModification, TaskSubmission
from workflows.pool import PoolWorkflow, pool_workflow_id

router = APIRouter(prefix="/api")


@router.post("/auth/signup", status_code=201, response_model=UserOut, tags=["auth"])
def signup(body: Credentials, db: DbDep) -> UserOut:
    user = service.sign_up(db, body)
    return UserOut(id=user.id, email=user.email)


@router.post("/auth/token", tags=["auth"])
def token(body: Credentials, db: DbDep, settings: SettingsDep) -> TokenOut:
    return TokenOut(token=service.log_in(db, settings, body))


@router.post("/sessions", status_code=201, tags=["sessions"])
async def create_session(
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    user: UserDep,
    body: SessionCreate | None = None,
) -> SessionOut:
    template = (body or SessionCreate()).template
    return service.session_out(await service.start_session(db, temporal, settings, user, template))


@router.get("/sessions", tags=["sessions"])
def list_sessions(db: DbDep, user: UserDep) -> list[SessionOut]:
    return [service.session_out(row) for row in service.list_sessions(db, user)]


@router.get("/sessions/{sid}", tags=["sessions"])
def get_session(sid: str, db: DbDep, user: UserDep) -> SessionOut:
    return service.session_out(service.own_session(db, user, sid))


@router.delete("/sessions/{sid}", status_code=202, tags=["sessions"])
async def end_session(sid: str, db: DbDep, temporal: TemporalDep, user: UserDep) -> SessionOut:
    row = service.own_session(db, user, sid)
    await service.end_session(temporal, row)
    return service.session_out(row)


@router.post("/sessions/{sid}/tasks", status_code=202, tags=["tasks"])
async def submit_task(
    sid: str,
    body: TaskCreate,
    db: DbDep,
    temporal: TemporalDep,
    user: UserDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> TaskRefOut:
    """Queue a task. Sent again with the same ``Idempotency-Key``, it is queued once and
    the same task is answered."""
    row = service.own_session(db, user, sid)
    key = service.idempotency_id(idempotency_key) if idempotency_key else None
    submission = TaskSubmission(prompt=body.prompt, key=key)
    return await service.update(temporal, row, "submit_task", submission, key)


@router.get("/sessions/{sid}/tasks/{tid}", tags=["tasks"])
def get_task(sid: str, tid: str, db: DbDep, user: UserDep) -> TaskOut:
    service.own_session(db, user, sid)
    return service.task_out(db, sid, tid)


@router.post("/sessions/{sid}/tasks/{tid}/{action}", tags=["tasks"])
async def control_task(
    sid: str,
    tid: str,
    action: str,
    db: DbDep,
    temporal: TemporalDep,
    user: UserDep,
    body: Modification | None = None,
) -> TaskRefOut:
    """``pause``, ``resume``, ``cancel``, or ``modify`` with ``{"instruction"}``."""
    row = service.own_session(db, user, sid)
    if action == "modify":
        if body is None:
            raise Problem(422, 'modify needs a body: {"instruction": "..."}')
        change = TaskModification(task_id=tid, instruction=body.instruction)
        return await service.update(temporal, row, "modify_task", change)
    if action not in ("pause", "resume", "cancel"):
        raise Problem(404, f"no task action {action!r}: pause, resume, cancel, modify")
    return await service.update(temporal, row, f"{action}_task", TaskControl(task_id=tid))


@router.get("/sessions/{sid}/events", tags=["sessions"], response_class=StreamingResponse)
def session_events(
    sid: str,
    db: DbDep,
    engine: EngineDep,
    hub: HubDep,
    streams: StreamCountDep,
    user: UserDep,
    after: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
) -> Response:
    """Server-Sent Events: replays from ``Last-Event-ID`` (or ``?after=``), then live; ends
    after the session's final event (204 when there is nothing more to send)."""
    row = service.own_session(db, user, sid)
    start = last_event_id if last_event_id is not None else (after or 0)
    return stream(db, engine, hub, streams, row, start)


@router.get("/pools/{template}", tags=["pools"])
async def pool_state(
    template: str, temporal: TemporalDep, settings: SettingsDep, user: UserDep
) -> PoolOut:
    """The warm pool of VMs of a template on this host (libvirt provider)."""
    handle = temporal.get_workflow_handle(pool_workflow_id(settings.host_id, template))
    try:
        state = await handle.query(PoolWorkflow.state)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise Problem(404, f"no warm pool of template {template!r} on this host") from exc
        raise
    return PoolOut(
        template=state.template, target=state.target, ready=len(state.ready),
        booting=len(state.booting), hits=state.hits, misses=state.misses,
        boot_failures=state.boot_failures,
    )  # fmt: skip
