"""The dashboard: server-rendered pages, htmx for actions, SSE for live progress.

It calls the same service functions as the JSON API; the only difference is that the user
comes from a cookie and answers are HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Header, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import escape
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Engine
from sqlmodel import Session, col, select

import vm_templates
from api import accounts, cursors, preferences, service
from api.deps import (
    DbDep,
    EngineDep,
    HubDep,
    IpDep,
    PasswordsDep,
    Problem,
    SettingsDep,
    StreamsDep,
    TemporalDep,
)
from api.events import sse, stream
from api.schemas import Credentials
from config.settings import Settings
from sandboxes.models import Step
from store.events import EventType, is_final
from store.models import ApiToken, Event, StepRow, TaskRow, User, utcnow
from ui import ansi, guard, state
from workflows.models import TaskControl, TaskModification, TaskSubmission

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
COOKIE = "berth_token"
DASHBOARD_TOKEN = "dashboard"  # the name of the token each dashboard login makes
SESSIONS_PAGE = 25  # sessions per page of the home page's list
# Live updates go out at most this often: a fast command's output arrives as one swap.
FRAME_S = 0.1

templates = Jinja2Templates(directory=HERE / "templates")
# Every unsafe request to the dashboard must come from its own pages.
router = APIRouter(include_in_schema=False, dependencies=[Depends(guard.check_origin)])
STEP = TypeAdapter(Step)


def step_text(spec: dict[str, Any]) -> str:
    """A step as a line of the plan (steps in events and rows are plain JSON)."""
    try:
        return STEP.validate_python(spec).describe()
    except ValidationError:
        return str(spec.get("kind", "step"))


def step_check(spec: dict[str, Any]) -> str:
    """A step's success criterion, in words."""
    try:
        check = STEP.validate_python(spec).check
    except ValidationError:
        return ""
    return check.describe() if check else ""


templates.env.filters.update(
    step_text=step_text,
    step_check=step_check,
    ansi=ansi.to_html,
    age=state.age,
    duration=state.duration,
)


def cookie_caller(
    request: Request, db: Session, settings: Settings
) -> tuple[User, ApiToken] | None:
    secret = request.cookies.get(COOKIE)
    return accounts.authenticate(db, settings, secret) if secret else None


async def page_caller(request: Request, db: DbDep, settings: SettingsDep) -> tuple[User, ApiToken]:
    """The signed-in user; for an unsafe method, also a CSRF token bound to their login."""
    found = cookie_caller(request, db, settings)
    if found is None:
        raise Problem(401, "log in first")
    await guard.check_token(request, settings, found[1].id)
    return found


def page_user(caller: Annotated[tuple[User, ApiToken], Depends(page_caller)]) -> User:
    return caller[0]


PageCaller = Annotated[tuple[User, ApiToken], Depends(page_caller)]
PageUser = Annotated[User, Depends(page_user)]


def render_page(
    request: Request,
    name: str,
    settings: Settings,
    caller: tuple[User, ApiToken] | None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page; a signed-in one carries the CSRF token that htmx sends with each action."""
    if caller is not None:
        context.update(user=caller[0], csrf=guard.token_for(settings, caller[1].id))
    return templates.TemplateResponse(request, name, context, status)


def is_dashboard(path: str) -> bool:
    """Whether a path is one of the dashboard's (HTML) rather than an API's."""
    return path in ("/", "/login", "/logout", "/preferences", "/tokens", "/admin") or (
        path.startswith(("/sessions/", "/ui/"))
    )


def problem_page(request: Request, problem: Problem) -> Response:
    """A dashboard error: htmx gets a fragment with the real status (its responseHandling
    config in base.html swaps it in), a page load an error page; a lost login goes to the
    login page (for htmx through HX-Redirect, which it follows instead of swapping a 303)."""
    htmx = request.headers.get("hx-request") == "true"
    if problem.status == 401:
        if htmx:
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        return RedirectResponse("/login", status_code=303)
    if htmx:
        fragment = f'<p class="error">{escape(problem.detail)}</p>'
        return HTMLResponse(fragment, problem.status, headers=problem.headers)
    context = {"request": request, "problem": problem}
    return templates.TemplateResponse(request, "error.html", context, problem.status)


@router.get("/", response_class=HTMLResponse)
def home(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    q: Annotated[str, Query(max_length=200)] = "",
    cursor: cursors.Cursor = None,
) -> Response:
    """The user's sessions, newest first, a page at a time; ``q`` searches them."""
    found = cookie_caller(request, db, settings)
    if found is None:
        return RedirectResponse("/login", status_code=303)
    after = cursors.decode_moment(cursor) if cursor else None
    rows = service.list_sessions(db, found[0], SESSIONS_PAGE + 1, after, q.strip() or None)
    more = len(rows) > SESSIONS_PAGE
    rows = rows[:SESSIONS_PAGE]
    ids = [r.id for r in rows]
    older = None
    if more:
        older = request.url.include_query_params(cursor=cursors.encode(*cursors.moment(rows[-1])))
    return render_page(
        request,
        "index.html",
        settings,
        found,
        sessions=rows,
        usage=state.usage_by_session(db, ids),
        tasks=state.task_counts(db, ids),
        q=q,
        paged=cursor is not None,
        older=f"{older.path}?{older.query}" if older else None,
        now=utcnow(),
        templates={name: _spec(name) for name in vm_templates.names()},
        preferred=preferences.load(db, found[0]).template or vm_templates.DEFAULT,
    )


def _spec(template: str) -> vm_templates.TemplateSpec | None:
    """A template's machine spec; None if its file is broken (the page still draws)."""
    try:
        return vm_templates.spec(template)
    except (KeyError, ValueError, OSError):
        return None


def login_form(
    request: Request, settings: Settings, error: str | None = None, status: int = 200
) -> Response:
    binding = guard.login_binding(request)
    token = guard.token_for(settings, f"login:{binding}")
    response = render_page(request, "login.html", settings, None, status, error=error, csrf=token)
    guard.set_login_cookie(request, response, binding)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, settings: SettingsDep) -> Response:
    return login_form(request, settings)


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    passwords: PasswordsDep,
    ip: IpDep,
    email: Annotated[str, Form()],
    password: Annotated[str, Form()],
    action: Annotated[str, Form()] = "login",
) -> Response:
    try:
        # Bound to this browser's login cookie: a foreign site cannot post this form.
        await guard.check_token(
            request, settings, f"login:{request.cookies.get(guard.LOGIN_COOKIE)}"
        )
        credentials = Credentials(email=email, password=password)
        if action == "signup":
            await accounts.sign_up(db, passwords, settings, credentials, ip)
        user = await accounts.log_in(db, passwords, settings, credentials, ip)
    except ValidationError as exc:
        error = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors())
        return login_form(request, settings, error, 422)
    except Problem as exc:
        return login_form(request, settings, exc.detail, exc.status)
    _, secret = accounts.issue_token(db, settings, user, DASHBOARD_TOKEN, ip)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        secret,
        httponly=True,
        samesite="lax",
        secure=guard.is_https(request),
        max_age=settings.token_ttl_hours * 3600,
    )
    response.delete_cookie(guard.LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(db: DbDep, caller: PageCaller, ip: IpDep) -> Response:
    """Revokes the dashboard's token: a copy of the cookie opens nothing afterwards."""
    user, token = caller
    accounts.revoke(db, user, token.id, ip)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


@router.post("/ui/sessions")
async def start_session(
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    user: PageUser,
    ip: IpDep,
    # Empty: the user's preferred template.
    template: Annotated[str | None, Form()] = None,
) -> Response:
    row = await service.start_session(db, temporal, settings, user, template or None, ip)
    return Response(status_code=204, headers={"HX-Redirect": f"/sessions/{row.id}"})


@router.get("/sessions/{sid}", response_class=HTMLResponse)
def session_page(
    sid: str,
    request: Request,
    db: DbDep,
    engine: EngineDep,
    settings: SettingsDep,
    caller: PageCaller,
) -> Response:
    service.visible_session(db, caller[0], sid)
    # Operators follow a session into its workflow's history.
    temporal = state.workflow_url(settings, sid) if caller[0].is_admin else None
    view = state.session_view(engine, sid)
    if view is None:
        raise Problem(404, f"no session {sid}")
    spec = _spec(view.session.template)
    return render_page(
        request, "session.html", settings, caller, temporal=temporal, view=view, spec=spec
    )


@router.get("/ui/sessions/{sid}/machine", response_class=HTMLResponse)
def machine(sid: str, request: Request, db: DbDep, engine: EngineDep, user: PageUser) -> Response:
    """The machine panel, which the session page polls while the session is live."""
    service.visible_session(db, user, sid)
    view = state.machine_view(engine, sid)
    if view is None:
        raise Problem(404, f"no session {sid}")
    context = {"view": view, "spec": _spec(view.session.template)}
    return templates.TemplateResponse(request, "machine.html", context)


@router.get("/ui/sessions/{sid}/artifacts/{artifact_id}")
def artifact(
    sid: str, artifact_id: str, db: DbDep, settings: SettingsDep, user: PageUser
) -> Response:
    """A screenshot, for the signed-in owner (or an admin)."""
    row = service.visible_session(db, user, sid)
    found, path = service.artifact_file(db, settings, row, artifact_id)
    return FileResponse(
        path, media_type=found.media_type, headers={"Cache-Control": "private, max-age=86400"}
    )


@router.post("/ui/sessions/{sid}/tasks", response_class=HTMLResponse)
async def submit_task(
    sid: str,
    db: DbDep,
    temporal: TemporalDep,
    user: PageUser,
    prompt: Annotated[str, Form()] = "",
) -> Response:
    row = service.own_session(db, user, sid)
    try:
        submission = TaskSubmission(prompt=prompt)
    except ValidationError:
        raise Problem(
            422, "Type a task first: a description, or commands as '$ ...' lines."
        ) from None
    ref = await service.update(temporal, row, "submit_task", submission)
    return HTMLResponse(f'<span class="ok">Task {ref.id[:8]} queued.</span>')


@router.post("/ui/sessions/{sid}/tasks/{tid}/modify", response_class=HTMLResponse)
async def modify_task(
    sid: str,
    tid: str,
    db: DbDep,
    temporal: TemporalDep,
    user: PageUser,
    instruction: Annotated[str, Form()] = "",
) -> Response:
    row = service.own_session(db, user, sid)
    try:
        change = TaskModification(task_id=tid, instruction=instruction)
    except ValidationError:
        raise Problem(422, "Say how to change the task (up to 20,000 characters).") from None
    await service.update(temporal, row, "modify_task", change)
    return HTMLResponse('<span class="ok">Sent: the agent takes it into account.</span>')


@router.post("/ui/sessions/{sid}/tasks/{tid}/{action}", response_class=HTMLResponse)
async def control_task(
    sid: str, tid: str, action: str, db: DbDep, temporal: TemporalDep, user: PageUser
) -> Response:
    row = service.own_session(db, user, sid)
    if action not in ("pause", "resume", "cancel"):
        raise Problem(404, f"no action {action}")
    await service.update(temporal, row, f"{action}_task", TaskControl(task_id=tid))
    return HTMLResponse("")


@router.post("/ui/sessions/{sid}/end", response_class=HTMLResponse)
async def end_session(
    sid: str,
    db: DbDep,
    temporal: TemporalDep,
    user: PageUser,
    ip: IpDep,
    preserve: Annotated[bool, Form()] = False,
) -> Response:
    row = service.own_session(db, user, sid)
    await service.end_session(db, temporal, user, row, ip, preserve=preserve)
    note = "keeping its disk" if preserve else "its machine shuts down"
    return HTMLResponse(f'<span class="ok">Ending the session, {note}…</span>')


@router.post("/ui/sessions/{sid}/resume")
async def resume_session(
    sid: str, db: DbDep, temporal: TemporalDep, settings: SettingsDep, user: PageUser, ip: IpDep
) -> Response:
    """Reopens an ended session whose disk was kept: the page reloads, live again."""
    row = service.own_session(db, user, sid)
    await service.resume_session(db, temporal, settings, user, row, ip)
    return Response(status_code=204, headers={"HX-Redirect": f"/sessions/{sid}"})


@router.get("/ui/sessions/{sid}/events")
def session_events(
    sid: str,
    db: DbDep,
    engine: EngineDep,
    hub: HubDep,
    streams: StreamsDep,
    user: PageUser,
    after: Annotated[int, Query(ge=0)] = 0,
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
) -> Response:
    """The session page's live updates after event ``after`` (the page's own), or after the
    browser's Last-Event-ID when it reconnects: each batch of new events is one message of
    out-of-band swaps, at most one per ``FRAME_S``, so fast output costs few DOM updates."""
    row = service.visible_session(db, user, sid)
    return stream(
        db,
        engine,
        hub,
        streams,
        user,
        row,
        max(after, last_event_id or 0),
        partial(render_batch, engine),
        pace_s=FRAME_S,
    )


def render_batch(engine: Engine, batch: Sequence[Event]) -> str:
    """New events as one SSE message (and, after the session's last, an ``end`` one that
    closes the page's stream)."""
    fragments = templates.get_template("events.html").module
    parts = []
    for event in coalesce(batch):
        context: dict[str, Any] = {"e": event, "d": event.data}
        # A plan, and a task's end, redraw the task from its rows.
        if event.type in (EventType.task_plan, EventType.task_status):
            context["view"] = _task_view(engine, event.data["task_id"])
        # The macro named as the type's member (events.html has one for every member): a
        # type the enumeration does not know raises here rather than drawing a fallback.
        macro: Any = getattr(fragments, EventType(event.type).name)
        parts.append(str(macro(**context)).strip())
    last = batch[-1]
    message = sse(last, "\n".join(parts))
    return message + (sse(last, "", name="end") if is_final(last) else "")


def coalesce(batch: Sequence[Event]) -> list[Event]:
    """Runs of one step's output on one stream as one event (the last one's number)."""
    out: list[Event] = []
    for event in batch:
        prev = out[-1] if out else None
        if (
            prev is not None
            and event.type == prev.type == EventType.step_output
            and all(event.data[k] == prev.data[k] for k in ("task_id", "index", "stream"))
        ):
            text = prev.data["text"] + event.data["text"]
            data = {**event.data, "text": text}
            out[-1] = Event(session_id=event.session_id, seq=event.seq, type=event.type, data=data)
        else:
            out.append(event)
    return out


def _task_view(engine: Engine, task_id: str) -> state.TaskView | None:
    with Session(engine) as db:
        task = db.get(TaskRow, task_id)
        if task is None:
            return None
        query = select(StepRow).where(StepRow.task_id == task_id).order_by(col(StepRow.index))
        return state.TaskView(task, list(db.exec(query)))
