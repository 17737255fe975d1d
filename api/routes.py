"""The JSON API under /api. Each route declares the problems it may answer (OpenAPI)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse

from api import accounts, checkpoints, cursors, files, guest_link, previews, service, services
from api.deps import (
    AdminDep,
    DbDep,
    EngineDep,
    HubDep,
    IpDep,
    PasswordsDep,
    Problem,
    SettingsDep,
    StreamsDep,
    TemporalDep,
    TokenDep,
    UserDep,
)
from api.events import stream
from api.problems import problems
from api.schemas import (
    CheckpointCreate,
    CheckpointOut,
    ForkCreate,
    Modification,
    PasswordChange,
    PoolOut,
    RollbackOut,
    SessionCreate,
    SessionOut,
    SignupOut,
    SignupRequest,
    TaskCreate,
    TaskOut,
    TaskRefOut,
    TokenCreate,
    TokenInfo,
    TokenOut,
    TokenRequest,
)
from store import audit
from store.models import ApiToken
from workflows.models import CheckpointAsk

# Every route under /api may be refused for its input; the others are named per route.
router = APIRouter(prefix="/api", responses=problems(422))
AUTHED = problems(401)
SESSION = problems(401, 404)
LIVE_SESSION = problems(401, 404, 409, 503)
NEXT = {"description": 'The next page, rel="next"', "schema": {"type": "string"}}
LISTING: dict[int | str, dict[str, Any]] = {**problems(400, 401), 200: {"headers": {"Link": NEXT}}}


@router.post("/auth/signup", status_code=201, tags=["auth"], responses=problems(403, 429))
async def signup(
    body: SignupRequest, db: DbDep, passwords: PasswordsDep, settings: SettingsDep, ip: IpDep
) -> SignupOut:
    """Registers the email if it is free. The answer is the same whether it was or not, so
    nobody learns who has an account here: log in to find out. 403 when sign-up is closed,
    or is by invite (BERTH_SIGNUP) and ``invite`` is not a live invite's code."""
    await accounts.sign_up(db, passwords, settings, body, ip, body.invite)
    return SignupOut(
        email=body.email.lower(),
        detail="registered unless it was already: log in with POST /api/auth/token",
    )


@router.post("/auth/token", tags=["auth"], responses=problems(401, 429))
async def token(
    body: TokenRequest, db: DbDep, passwords: PasswordsDep, settings: SettingsDep, ip: IpDep
) -> TokenOut:
    """Logs in: a new revocable token, named ``name``."""
    user = await accounts.log_in(db, passwords, settings, body, ip)
    return _token_out(*accounts.issue_token(db, settings, user, body.name, ip))


@router.get("/tokens", tags=["auth"], responses=LISTING)
def list_tokens(db: DbDep, user: UserDep, page: cursors.PagingDep) -> list[TokenInfo]:
    """The caller's live tokens (their secrets are never shown again)."""
    after = cursors.decode(page.cursor, 1)[0] if page.cursor else None
    rows = accounts.list_tokens(db, user, page.fetch, after)
    return [
        TokenInfo.model_validate(row, from_attributes=True)
        for row in page.take(rows, lambda row: (row.id,))
    ]


@router.post("/tokens", status_code=201, tags=["auth"], responses=AUTHED)
def create_token(
    body: TokenCreate, db: DbDep, settings: SettingsDep, user: UserDep, ip: IpDep
) -> TokenOut:
    """Another token for the caller, e.g. one per script, each revocable on its own."""
    return _token_out(*accounts.issue_token(db, settings, user, body.name, ip))


@router.delete("/tokens/{token_id}", status_code=204, tags=["auth"], responses=SESSION)
def revoke_token(token_id: str, db: DbDep, user: UserDep, ip: IpDep) -> Response:
    accounts.revoke(db, user, token_id, ip)
    return Response(status_code=204)


@router.post("/auth/logout", status_code=204, tags=["auth"], responses=AUTHED)
def logout(db: DbDep, caller: TokenDep, ip: IpDep) -> Response:
    """Revokes the token this request carries."""
    user, current = caller
    accounts.revoke(db, user, current.id, ip)
    return Response(status_code=204)


@router.post("/auth/password", status_code=204, tags=["auth"], responses=problems(401, 403, 429))
async def change_password(
    body: PasswordChange,
    db: DbDep,
    passwords: PasswordsDep,
    settings: SettingsDep,
    caller: TokenDep,
    ip: IpDep,
) -> Response:
    """Changes the caller's password (``current`` must be right) and revokes every other
    token and dashboard session they have; the token of this request stays valid."""
    user, current = caller
    await accounts.change_password(db, passwords, settings, user, current, body, ip)
    return Response(status_code=204)


def _token_out(row: ApiToken, secret: str) -> TokenOut:
    return TokenOut(token=secret, id=row.id, name=row.name, expires_at=row.expires_at)


@router.post("/sessions", status_code=201, tags=["sessions"], responses=problems(401, 429, 503))
async def create_session(
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    user: UserDep,
    ip: IpDep,
    body: SessionCreate | None = None,
) -> SessionOut:
    """Starts a session of ``template``, by default the caller's preferred one (GET
    /api/preferences), with the caller's preferred model and timeouts."""
    body = body or SessionCreate()
    row = await service.start_session(
        db, temporal, settings, user, body.template, ip, body.auto_checkpoint
    )
    return service.session_out(row, settings)


@router.get("/sessions", tags=["sessions"], responses={**LISTING, **problems(403)})
def list_sessions(
    db: DbDep,
    settings: SettingsDep,
    user: UserDep,
    ip: IpDep,
    page: cursors.PagingDep,
    all: Annotated[bool, Query(description="Every user's sessions (admins only)")] = False,
) -> list[SessionOut]:
    """The caller's sessions, newest first (everyone's with ``all=true``, for admins)."""
    if all:
        if not user.is_admin:
            raise Problem(403, "only an admin may list every user's sessions")
        audit.record(db, user.id, "admin.sessions.list", ip=ip)
    after = cursors.decode_moment(page.cursor) if page.cursor else None
    rows = service.list_sessions(db, None if all else user, page.fetch, after)
    return [service.session_out(row, settings) for row in page.take(rows, cursors.moment)]


@router.get("/sessions/{sid}", tags=["sessions"], responses=SESSION)
def get_session(sid: str, db: DbDep, settings: SettingsDep, user: UserDep) -> SessionOut:
    return service.session_out(service.visible_session(db, user, sid), settings)


@router.delete(
    "/sessions/{sid}",
    status_code=202,
    tags=["sessions"],
    responses={**LIVE_SESSION, **problems(429)},
)
async def end_session(
    sid: str,
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    user: UserDep,
    ip: IpDep,
    preserve: bool = False,
) -> SessionOut:
    """End the session. With ``preserve=true`` its sandbox is shut down with its disk (a
    container: its workspace) kept, and ``POST .../resume`` brings the session back until
    ``kept_until``; 429 past the caller's kept disks (count or bytes)."""
    row = service.own_session(db, user, sid)
    await service.end_session(db, temporal, settings, user, row, ip, preserve=preserve)
    return service.session_out(row, settings)


@router.post(
    "/sessions/{sid}/resume",
    status_code=202,
    tags=["sessions"],
    responses=problems(401, 404, 409, 429, 503),
)
async def resume_session(
    sid: str, db: DbDep, temporal: TemporalDep, settings: SettingsDep, user: UserDep, ip: IpDep
) -> SessionOut:
    """Resume a session that ended with its disk preserved: the same session (id, events,
    tasks) on a new machine with the kept disk; 409 unless it ended preserved."""
    row = service.own_session(db, user, sid)
    resumed = await service.resume_session(db, temporal, settings, user, row, ip)
    return service.session_out(resumed, settings)


@router.post("/sessions/{sid}/tasks", status_code=202, tags=["tasks"], responses=LIVE_SESSION)
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
    return await service.submit_task(temporal, row, body.prompt, key)


@router.get("/sessions/{sid}/tasks", tags=["tasks"], responses={**LISTING, **problems(404)})
def list_tasks(sid: str, db: DbDep, user: UserDep, page: cursors.PagingDep) -> list[TaskRefOut]:
    """The session's tasks, oldest first."""
    service.visible_session(db, user, sid)
    after = cursors.decode_moment(page.cursor) if page.cursor else None
    rows = service.list_tasks(db, sid, page.fetch, after)
    return [TaskRefOut(id=row.id, status=row.status) for row in page.take(rows, cursors.moment)]


@router.get("/sessions/{sid}/tasks/{tid}", tags=["tasks"], responses=SESSION)
def get_task(sid: str, tid: str, db: DbDep, user: UserDep) -> TaskOut:
    service.visible_session(db, user, sid)
    return service.task_out(db, sid, tid)


@router.post("/sessions/{sid}/tasks/{tid}/{action}", tags=["tasks"], responses=LIVE_SESSION)
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
    instruction = body.instruction if body else None
    return await service.control_task(temporal, row, tid, action, instruction)


@router.get(
    "/sessions/{sid}/events",
    tags=["sessions"],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: each has `id` (the sequence number), `event` "
            "(its type) and `data` (the event as JSON)",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        204: {"description": "The session has ended and nothing follows the given event"},
        **problems(400, 401, 404, 429),
    },
)
def session_events(
    sid: str,
    db: DbDep,
    engine: EngineDep,
    hub: HubDep,
    streams: StreamsDep,
    user: UserDep,
    after: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
) -> Response:
    """Server-Sent Events: replays from ``Last-Event-ID`` (or ``?after=``), then live; ends
    after the session's final event (204 when there is nothing more to send)."""
    start = last_event_id if last_event_id is not None else (after or 0)
    return stream(db, engine, hub, streams, user, sid, start)


@router.get(
    "/sessions/{sid}/artifacts/{artifact_id}",
    tags=["sessions"],
    response_class=FileResponse,
    responses=SESSION,
)
def get_artifact(
    sid: str, artifact_id: str, db: DbDep, settings: SettingsDep, user: UserDep
) -> Response:
    """A file a step made (a browser step's screenshot, ...), to whoever may read the
    session: its owner, and admins."""
    row = service.visible_session(db, user, sid)
    return service.artifact_response(db, settings, row, artifact_id, cache_s=3600)


@router.get("/pools/{template}", tags=["pools"], responses=problems(401, 403, 404, 503))
async def pool_state(
    template: str, temporal: TemporalDep, settings: SettingsDep, admin: AdminDep
) -> PoolOut:
    """The warm pool of VMs of a template on this host (libvirt provider), for admins."""
    return await service.pool_state(temporal, settings, template)


@router.post(
    "/sessions/{sid}/checkpoints",
    status_code=201,
    tags=["checkpoints"],
    responses={**LIVE_SESSION, **problems(429)},
)
async def create_checkpoint(
    sid: str,
    body: CheckpointCreate,
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    user: UserDep,
) -> CheckpointOut:
    """Checkpoint the session between steps (a running step is waited for, a minute at
    most): its machine's disk (Docker: its workspace) and, with ``memory``, its memory if
    the provider can (``note`` says when not), with the session's tasks and plans. Counted
    in the caller's kept bytes (429 past them); deleted with the session unless preserved."""
    row = service.own_session(db, user, sid)
    ask = CheckpointAsk(memory=body.memory, label=body.label)
    return await checkpoints.create(db, temporal, settings, user, row, ask)


@router.get("/sessions/{sid}/checkpoints", tags=["checkpoints"], responses=SESSION)
def list_checkpoints(sid: str, db: DbDep, user: UserDep) -> list[CheckpointOut]:
    row = service.visible_session(db, user, sid)
    return [checkpoints.checkpoint_out(c) for c in checkpoints.listed(db, row.id)]


@router.delete(
    "/sessions/{sid}/checkpoints/{cid}",
    status_code=204,
    tags=["checkpoints"],
    responses=LIVE_SESSION,
)
async def delete_checkpoint(
    sid: str, cid: str, db: DbDep, temporal: TemporalDep, user: UserDep
) -> Response:
    row = service.own_session(db, user, sid)
    await checkpoints.delete(db, temporal, row, cid)
    return Response(status_code=204)


@router.post(
    "/sessions/{sid}/checkpoints/{cid}/rollback", tags=["checkpoints"], responses=LIVE_SESSION
)
async def rollback(
    sid: str, cid: str, db: DbDep, temporal: TemporalDep, user: UserDep
) -> RollbackOut:
    """Stop the running task, put the machine back to the checkpoint, and mark every task
    run since rolled back (``session.rolled_back``); the next task starts from there."""
    row = service.own_session(db, user, sid)
    ref = await checkpoints.rollback(db, temporal, row, cid)
    return RollbackOut(checkpoint_id=ref.checkpoint_id, rolled_back=ref.rolled_back)


@router.post(
    "/sessions/{sid}/checkpoints/{cid}/fork",
    status_code=201,
    tags=["checkpoints"],
    responses=problems(401, 404, 429, 503),
)
async def fork(
    sid: str,
    cid: str,
    body: ForkCreate,
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    user: UserDep,
    ip: IpDep,
) -> list[SessionOut]:
    """``count`` new sessions (at most BERTH_FORK_MAX_COUNT), each on its own machine made
    from the checkpoint; each one's log begins with ``session.forked_from``, and the parent's
    log up to the checkpoint is its inherited history."""
    row = service.own_session(db, user, sid)
    forks = await checkpoints.fork(db, temporal, settings, user, row, cid, body.count, ip)
    return [service.session_out(f, settings) for f in forks]


# --- The workspace's files (api/files.py): its owner's only ---
FILES = problems(401, 403, 404, 409, 503)
PathQuery = Annotated[str, Query(description="Relative to the workspace (its home folder)")]


@router.get("/sessions/{sid}/files", tags=["files"], responses=FILES)
async def list_files(
    sid: str, db: DbDep, settings: SettingsDep, user: UserDep, path: PathQuery = "."
) -> files.FileListing:
    """A folder's entries (or a file's own size) in the session's workspace."""
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    return await files.listing(settings, sandbox, files.checked_path(path))


@router.get(
    "/sessions/{sid}/files/content",
    tags=["files"],
    response_class=StreamingResponse,
    responses={**FILES, **problems(413)},
)
async def download_file(
    sid: str, db: DbDep, settings: SettingsDep, user: UserDep, path: PathQuery
) -> Response:
    """A file of the workspace; a folder as a zip of its regular files."""
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    return await files.download(settings, sandbox, files.checked_path(path))


@router.put(
    "/sessions/{sid}/files/content",
    status_code=201,
    tags=["files"],
    responses={**FILES, **problems(413)},
)
async def upload_file(
    sid: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    user: UserDep,
    ip: IpDep,
    path: PathQuery,
) -> files.FileEntry:
    """Write the request's body to ``path`` (its folders made), replacing what was there;
    a 413 past BERTH_FILES_MAX_UPLOAD_BYTES."""
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    path = files.checked_path(path)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.files_max_upload_bytes:
        raise Problem(
            413,
            f"the upload is over {settings.files_max_upload_bytes} bytes "
            "(BERTH_FILES_MAX_UPLOAD_BYTES)",
        )
    size = await files.write(settings, sandbox, path, request.stream())
    audit.record(
        db, user.id, "files.upload", target=sid, detail={"path": path, "size": size}, ip=ip
    )
    return files.FileEntry(name=PurePosixPath(path).name, kind="file", size=size)


@router.delete("/sessions/{sid}/files", status_code=204, tags=["files"], responses=FILES)
async def delete_file(
    sid: str, db: DbDep, settings: SettingsDep, user: UserDep, ip: IpDep, path: PathQuery
) -> Response:
    """Delete a file, or a folder with everything in it (never the workspace itself)."""
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    path = files.checked_path(path)
    await files.delete(settings, sandbox, path)
    audit.record(db, user.id, "files.delete", target=sid, detail={"path": path}, ip=ip)
    return Response(status_code=204)


# --- The session's services (api/services.py): its owner's only ---


@router.get("/sessions/{sid}/services", tags=["services"], responses=FILES)
async def list_services(
    sid: str, db: DbDep, settings: SettingsDep, user: UserDep
) -> list[services.ServiceOut]:
    """The services that ``service`` steps started in the session's machine, running or
    ended (never restarted)."""
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    return await services.listing(settings, sandbox)


@router.get(
    "/sessions/{sid}/services/{name}/output",
    tags=["services"],
    response_class=PlainTextResponse,
    responses=FILES,
)
async def service_output(
    sid: str, name: str, db: DbDep, settings: SettingsDep, user: UserDep
) -> Response:
    """The newest of what the service printed (its tail, bounded in the guest)."""
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    return PlainTextResponse(await services.output(settings, sandbox, name))


@router.post("/sessions/{sid}/services/{name}/stop", tags=["services"], responses=FILES)
async def stop_service(
    sid: str, name: str, db: DbDep, settings: SettingsDep, user: UserDep, ip: IpDep
) -> services.ServiceOut:
    """Stop a service (its process group: SIGTERM, then SIGKILL after 5 s)."""
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    stopped = await services.stop(settings, sandbox, name)
    audit.record(db, user.id, "services.stop", target=sid, detail={"name": name}, ip=ip)
    return stopped


# --- Previews of the session's ports (api/previews.py): its owner's only ---


@router.get("/sessions/{sid}/previews", tags=["previews"], responses=FILES)
async def list_previews(
    sid: str, db: DbDep, settings: SettingsDep, user: UserDep
) -> previews.PreviewsOut:
    """The ports something listens on in the session's machine (each previewed at
    /preview/{sid}/{port}/), and the share links made for them."""
    return await previews.previews(db, settings, service.own_session(db, user, sid))


@router.post(
    "/sessions/{sid}/previews/{port}/shares", status_code=201, tags=["previews"], responses=SESSION
)
def share_preview(
    sid: str, port: previews.PortPath, db: DbDep, settings: SettingsDep, user: UserDep, ip: IpDep
) -> previews.ShareOut:
    """A link that opens the port's preview to whoever holds it, until it expires
    (BERTH_PREVIEW_SHARE_TTL_S) or is revoked. Its URL is shown this once."""
    made = previews.share(db, settings, service.own_session(db, user, sid), port)
    audit.record(db, user.id, "previews.share", target=sid, detail={"port": port}, ip=ip)
    return made


@router.delete(
    "/sessions/{sid}/previews/shares/{share_id}",
    status_code=204,
    tags=["previews"],
    responses=SESSION,
)
def revoke_preview_share(sid: str, share_id: str, db: DbDep, user: UserDep, ip: IpDep) -> Response:
    """Revoke a share link: it opens nothing from now on (403)."""
    previews.revoke(db, service.own_session(db, user, sid), share_id)
    audit.record(db, user.id, "previews.revoke", target=sid, detail={"share": share_id}, ip=ip)
    return Response(status_code=204)
