"""The dashboard's pages and actions: server-rendered pages, htmx for actions (the live
stream is in ui/live.py, how pages render in ui/render.py).

It calls the same service functions as the JSON API; the only difference is that the user
comes from a cookie and answers are HTML.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import TypeAdapter, ValidationError

import vm_templates
from api import accounts, cursors, preferences, service
from api.deps import (
    COOKIE,
    DASHBOARD_TOKEN,
    DbDep,
    EngineDep,
    IpDep,
    PasswordsDep,
    Problem,
    SettingsDep,
    TemporalDep,
    cookie_caller,
)
from api.schemas import Credentials
from config.settings import Settings
from sandboxes.kept import kept_until
from store.models import utcnow
from ui import guard, state
from ui.render import PageCaller, PageUser, dashboard_router, render_page, templates
from workflows.models import Prompt

SESSIONS_PAGE = 25  # sessions per page of the home page's list
PROMPT = TypeAdapter(Prompt)

router = dashboard_router()


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
    request: Request,
    settings: Settings,
    error: str | None = None,
    status: int = 200,
    invite: str = "",
) -> Response:
    """The login page; sign-up is offered as BERTH_SIGNUP says (with an invite field, or
    not at all when it is closed)."""
    binding = guard.login_binding(request)
    token = guard.token_for(settings, f"login:{binding}")
    response = render_page(
        request,
        "login.html",
        settings,
        None,
        status,
        error=error,
        csrf=token,
        signup=settings.signup,
        invite=invite,
    )
    guard.set_login_cookie(request, response, binding)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(
    request: Request, settings: SettingsDep, invite: Annotated[str, Query(max_length=200)] = ""
) -> Response:
    """``invite``: an invite link's code, filled into the sign-up form."""
    return login_form(request, settings, invite=invite)


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
    invite: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    try:
        # Bound to this browser's login cookie: a foreign site cannot post this form.
        await guard.check_token(
            request, settings, f"login:{request.cookies.get(guard.LOGIN_COOKIE)}"
        )
        credentials = Credentials(email=email, password=password)
        if action == "signup":
            await accounts.sign_up(db, passwords, settings, credentials, ip, invite or None)
        user = await accounts.log_in(db, passwords, settings, credentials, ip)
    except ValidationError as exc:
        error = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors())
        return login_form(request, settings, error, 422, invite)
    except Problem as exc:
        return login_form(request, settings, exc.detail, exc.status, invite)
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
    ended, keep_days = view.session.ended_at, settings.kept_max_age_days
    kept = kept_until(ended, keep_days) if view.session.preserved else None
    return render_page(
        request, "session.html", settings, caller,
        temporal=temporal, view=view, spec=spec, kept_until=kept,
    )  # fmt: skip


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
    return service.artifact_response(db, settings, row, artifact_id, cache_s=86400)


def form_prompt(text: str, refusal: str) -> str:
    """A form's text as a Prompt, or a 422 saying ``refusal`` (a written plan over the cap
    says so instead): a refused text never reaches the workflow."""
    try:
        return PROMPT.validate_python(text)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "value_error":
            raise Problem(422, str(error["ctx"]["error"])) from None
        raise Problem(422, refusal) from None


@router.post("/ui/sessions/{sid}/tasks", response_class=HTMLResponse)
async def submit_task(
    sid: str,
    db: DbDep,
    temporal: TemporalDep,
    user: PageUser,
    prompt: Annotated[str, Form()] = "",
) -> Response:
    row = service.own_session(db, user, sid)
    text = form_prompt(prompt, "Type a task first: a description, or commands as '$ ...' lines.")
    ref = await service.submit_task(temporal, row, text)
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
    text = form_prompt(instruction, "Say how to change the task (up to 20,000 characters).")
    await service.control_task(temporal, row, tid, service.TaskAction.modify, text)
    return HTMLResponse('<span class="ok">Sent: the agent takes it into account.</span>')


@router.post("/ui/sessions/{sid}/tasks/{tid}/{action}", response_class=HTMLResponse)
async def control_task(
    sid: str, tid: str, action: str, db: DbDep, temporal: TemporalDep, user: PageUser
) -> Response:
    row = service.own_session(db, user, sid)
    await service.control_task(temporal, row, tid, action)
    return HTMLResponse("")


@router.post("/ui/sessions/{sid}/end", response_class=HTMLResponse)
async def end_session(
    sid: str,
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    user: PageUser,
    ip: IpDep,
    preserve: Annotated[bool, Form()] = False,
) -> Response:
    row = service.own_session(db, user, sid)
    await service.end_session(db, temporal, settings, user, row, ip, preserve=preserve)
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
