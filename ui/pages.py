"""The dashboard: server-rendered pages, htmx for actions, SSE for live progress.

It calls the same service functions as the JSON API; the only difference is that the user
comes from a cookie and answers are HTML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Header, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import escape
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import Session, col, select

import vm_templates
from api import accounts, service
from api.deps import (
    DbDep,
    EngineDep,
    HubDep,
    IpDep,
    PasswordsDep,
    Problem,
    SettingsDep,
    StreamCountDep,
    TemporalDep,
)
from api.events import sse, stream
from api.schemas import Credentials
from berth.settings import Settings
from store.models import ApiToken, Event, StepRow, User
from workflows.models import TaskControl, TaskSubmission

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
COOKIE = "berth_token"
DASHBOARD_TOKEN = "dashboard"  # the name of the token each dashboard login makes
HOME_SESSIONS = 100  # the home page lists this many of the newest sessions

templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)


def cookie_caller(
    request: Request, db: Session, settings: Settings
) -> tuple[User, ApiToken] | None:
    secret = request.cookies.get(COOKIE)
    return accounts.authenticate(db, settings, secret) if secret else None


def page_caller(request: Request, db: DbDep, settings: SettingsDep) -> tuple[User, ApiToken]:
    found = cookie_caller(request, db, settings)
    if found is None:
        raise Problem(401, "log in first")
    return found


def page_user(caller: Annotated[tuple[User, ApiToken], Depends(page_caller)]) -> User:
    return caller[0]


PageCaller = Annotated[tuple[User, ApiToken], Depends(page_caller)]
PageUser = Annotated[User, Depends(page_user)]


def error_fragment(message: str, status: int = 200) -> HTMLResponse:
    # htmx swaps 200 answers only; errors are shown where the action's result would go.
    return HTMLResponse(f'<p class="error">{escape(message)}</p>', status_code=status)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, db: DbDep, settings: SettingsDep) -> Response:
    found = cookie_caller(request, db, settings)
    if found is None:
        return RedirectResponse("/login", status_code=303)
    user = found[0]
    return templates.TemplateResponse(
        request,
        "index.html",
        {
            "user": user,
            "sessions": service.list_sessions(db, user, limit=HOME_SESSIONS),
            "templates": vm_templates.names(),
        },
    )


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    return templates.TemplateResponse(request, "login.html", {"error": None})


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
        credentials = Credentials(email=email, password=password)
        if action == "signup":
            await accounts.sign_up(db, passwords, settings, credentials, ip)
        user = await accounts.log_in(db, passwords, settings, credentials, ip)
    except ValidationError as exc:
        error = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors())
        return templates.TemplateResponse(request, "login.html", {"error": error}, 422)
    except Problem as exc:
        return templates.TemplateResponse(request, "login.html", {"error": exc.detail}, exc.status)
    _, secret = accounts.issue_token(db, settings, user, DASHBOARD_TOKEN, ip)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE, secret, httponly=True, samesite="lax", max_age=settings.token_ttl_hours * 3600
    )
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
    template: Annotated[str, Form()] = vm_templates.DEFAULT,
) -> Response:
    try:
        row = await service.start_session(db, temporal, settings, user, template, ip)
    except Problem as exc:
        return error_fragment(exc.detail)
    return Response(status_code=204, headers={"HX-Redirect": f"/sessions/{row.id}"})


@router.get("/sessions/{sid}", response_class=HTMLResponse)
def session_page(sid: str, request: Request, db: DbDep, user: PageUser) -> Response:
    row = service.visible_session(db, user, sid)
    return templates.TemplateResponse(request, "session.html", {"user": user, "session": row})


@router.post("/ui/sessions/{sid}/tasks", response_class=HTMLResponse)
async def submit_task(
    sid: str,
    db: DbDep,
    temporal: TemporalDep,
    user: PageUser,
    prompt: Annotated[str, Form()] = "",
) -> Response:
    try:
        row = service.own_session(db, user, sid)
        ref = await service.update(temporal, row, "submit_task", TaskSubmission(prompt=prompt))
    except ValidationError:
        return error_fragment("Type a task first: a description, or commands as '$ ...' lines.")
    except Problem as exc:
        return error_fragment(exc.detail)
    return HTMLResponse(f'<p class="ok">Task {ref.id[:8]} queued.</p>')


@router.post("/ui/sessions/{sid}/tasks/{tid}/{action}", response_class=HTMLResponse)
async def control_task(
    sid: str, tid: str, action: str, db: DbDep, temporal: TemporalDep, user: PageUser
) -> Response:
    if action not in ("pause", "resume", "cancel"):
        return error_fragment(f"no action {action}")
    try:
        row = service.own_session(db, user, sid)
        await service.update(temporal, row, f"{action}_task", TaskControl(task_id=tid))
    except Problem as exc:
        return error_fragment(exc.detail)
    return HTMLResponse("")


@router.post("/ui/sessions/{sid}/end", response_class=HTMLResponse)
async def end_session(
    sid: str, db: DbDep, temporal: TemporalDep, user: PageUser, ip: IpDep
) -> Response:
    try:
        await service.end_session(db, temporal, user, service.own_session(db, user, sid), ip)
    except Problem as exc:
        return error_fragment(exc.detail)
    return HTMLResponse('<p class="ok">Ending the session…</p>')


@router.get("/ui/sessions/{sid}/events")
def session_events(
    sid: str,
    db: DbDep,
    engine: EngineDep,
    hub: HubDep,
    streams: StreamCountDep,
    user: PageUser,
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
) -> Response:
    row = service.visible_session(db, user, sid)
    fragments = templates.get_template("events.html").module

    def render(event: Event) -> str:
        context: dict[str, Any] = {"e": event, "d": event.data}
        # A plan, and a task's end that skipped the steps left, redraw its steps.
        if event.type == "task.plan" or (
            event.type == "task.status" and event.data["status"] in ("failed", "cancelled")
        ):
            context["steps"] = _steps(engine, event.data["task_id"])
        macro: Any = getattr(fragments, event.type.replace(".", "_"), None) or fragments.other  # type: ignore[attr-defined]
        return sse(event, str(macro(**context)).strip())

    return stream(db, engine, hub, streams, row, last_event_id or 0, render)


def _steps(engine: Engine, task_id: str) -> list[StepRow]:
    with Session(engine) as db:
        query = select(StepRow).where(StepRow.task_id == task_id).order_by(col(StepRow.index))
        return list(db.exec(query))
