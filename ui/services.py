"""The session page's services panel: each service a ``service`` step started, running or
ended, its output, and a button that stops it (api/services.py). An htmx fragment, polled
while the page is open; a refusal is said in it."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from api import guest_link, service, services
from api.deps import DbDep, IpDep, Problem, SettingsDep
from config.settings import Settings
from store import audit
from ui.render import PageUser, dashboard_router, templates

router = dashboard_router()


async def _panel(
    request: Request, settings: Settings, sid: str, sandbox: str | None, note: str = ""
) -> HTMLResponse:
    found: list[services.ServiceOut] = []
    error = "" if sandbox else "the session has no running machine now"
    if sandbox is not None:
        try:
            found = await services.listing(settings, sandbox)
        except Problem as exc:
            error = exc.detail
    context = {"sid": sid, "services": found, "error": error, "note": note}
    return templates.TemplateResponse(request, "services.html", context)


@router.get("/ui/sessions/{sid}/services", response_class=HTMLResponse)
async def panel(
    sid: str, request: Request, db: DbDep, settings: SettingsDep, user: PageUser
) -> Response:
    row = service.own_session(db, user, sid)
    try:
        sandbox: str | None = guest_link.running_sandbox(db, row)
    except Problem:
        sandbox = None
    return await _panel(request, settings, sid, sandbox)


@router.get("/ui/sessions/{sid}/services/{name}/output", response_class=PlainTextResponse)
async def output(sid: str, name: str, db: DbDep, settings: SettingsDep, user: PageUser) -> Response:
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    return PlainTextResponse(await services.output(settings, sandbox, name))


@router.post("/ui/sessions/{sid}/services/{name}/stop", response_class=HTMLResponse)
async def stop(
    sid: str,
    name: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    user: PageUser,
    ip: IpDep,
) -> Response:
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    try:
        stopped = await services.stop(settings, sandbox, name)
        note = f"service {stopped.name} stopped"
        audit.record(db, user.id, "services.stop", target=sid, detail={"name": name}, ip=ip)
    except Problem as exc:
        note = exc.detail
    return await _panel(request, settings, sid, sandbox, note)
