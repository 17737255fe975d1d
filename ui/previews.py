"""Previews on the dashboard: the owner's way into a port's preview (their login, sent on to
a URL with an owner token: api/previews.py), and the session page's previews panel (the
ports something listens on, each with its link, and share links made and revoked)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api import previews, service
from api.deps import DbDep, IpDep, Problem, SettingsDep
from config.settings import Settings
from store import audit
from store.models import SessionRow
from ui.render import PageUser, dashboard_router, templates

router = dashboard_router()


@router.get("/preview/{sid}/{port}")
@router.get("/preview/{sid}/{port}/")
def enter(
    sid: str, port: previews.PortPath, db: DbDep, settings: SettingsDep, user: PageUser
) -> Response:
    row = service.own_session(db, user, sid)
    token = previews.owner_token(settings, row, port)
    return RedirectResponse(f"{previews.base(sid, port)}@{token}/", 303)


async def _panel(
    request: Request,
    db: DbDep,
    settings: Settings,
    row: SessionRow,
    note: str = "",
    made: previews.ShareOut | None = None,
) -> HTMLResponse:
    found, error = None, ""
    try:
        found = await previews.previews(db, settings, row)
    except Problem as exc:
        error = exc.detail
    context = {"sid": row.id, "found": found, "error": error, "note": note, "made": made}
    return templates.TemplateResponse(request, "previews.html", context)


@router.get("/ui/sessions/{sid}/previews", response_class=HTMLResponse)
async def panel(
    sid: str, request: Request, db: DbDep, settings: SettingsDep, user: PageUser
) -> Response:
    return await _panel(request, db, settings, service.own_session(db, user, sid))


@router.post("/ui/sessions/{sid}/previews/{port}/shares", response_class=HTMLResponse)
async def share(
    sid: str,
    port: previews.PortPath,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    user: PageUser,
    ip: IpDep,
) -> Response:
    row = service.own_session(db, user, sid)
    made = previews.share(db, settings, row, port)
    audit.record(db, user.id, "previews.share", target=sid, detail={"port": port}, ip=ip)
    return await _panel(request, db, settings, row, made=made)


@router.post("/ui/sessions/{sid}/previews/shares/{share_id}/revoke", response_class=HTMLResponse)
async def revoke(
    sid: str,
    share_id: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    user: PageUser,
    ip: IpDep,
) -> Response:
    row = service.own_session(db, user, sid)
    previews.revoke(db, row, share_id)
    audit.record(db, user.id, "previews.revoke", target=sid, detail={"share": share_id}, ip=ip)
    return await _panel(request, db, settings, row, note="share link revoked")
