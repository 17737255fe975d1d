"""The session page's files panel: the workspace as a tree a folder at a time, each file's
download, an upload (a button, or files dropped on the panel) and a delete. The same
operations as the JSON API's (api/files.py), for the signed-in owner; the panel is an htmx
fragment, redrawn after each change, that shows a refusal's reason in place."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from pathlib import PurePosixPath

from fastapi import Query, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import UploadFile

from api import files, guest_link, service
from api.deps import DbDep, IpDep, Problem, SettingsDep
from config.settings import Settings
from store import audit
from ui.render import PageUser, dashboard_router, templates

router = dashboard_router()
# Read from an uploaded form's spooled file at a time.
UPLOAD_CHUNK = 256 * 1024


async def _panel(
    request: Request, settings: Settings, sid: str, sandbox: str | None, path: str, note: str = ""
) -> HTMLResponse:
    """The panel at folder ``path``; a refusal there is said in it, not as an error page."""
    listing, error = None, ""
    if sandbox is not None:
        try:
            listing = await files.listing(settings, sandbox, path)
        except Problem as exc:
            error = exc.detail
    folder = path if listing is None or listing.kind == "dir" else posixpath.dirname(path) or "."
    parts = [part for part in PurePosixPath(folder).parts if part not in (".", "/")]
    crumbs = [(part, "/".join(parts[: i + 1])) for i, part in enumerate(parts)]
    context = {
        "sid": sid,
        "path": folder,
        "crumbs": crumbs,
        "listing": listing,
        "error": error or ("" if sandbox else "the session has no running machine now"),
        "note": note,
        "join": posixpath.join,
    }
    return templates.TemplateResponse(request, "files.html", context)


def _sandbox(db: DbDep, user: PageUser, sid: str) -> str | None:
    row = service.own_session(db, user, sid)
    try:
        return guest_link.running_sandbox(db, row)
    except Problem:
        return None


@router.get("/ui/sessions/{sid}/files", response_class=HTMLResponse)
async def panel(
    sid: str, request: Request, db: DbDep, settings: SettingsDep, user: PageUser, path: str = "."
) -> Response:
    sandbox = _sandbox(db, user, sid)
    return await _panel(request, settings, sid, sandbox, files.checked_path(path))


@router.get("/ui/sessions/{sid}/files/content")
async def download(
    sid: str, db: DbDep, settings: SettingsDep, user: PageUser, path: str = Query()
) -> Response:
    """A file (or a folder as a zip), as the JSON API's download."""
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    return await files.download(settings, sandbox, files.checked_path(path))


@router.post("/ui/sessions/{sid}/files", response_class=HTMLResponse)
async def upload(
    sid: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    user: PageUser,
    ip: IpDep,
    path: str = Query("."),
) -> Response:
    """Files of a form (``upload``, one or many) into folder ``path``; the panel redrawn."""
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    folder = files.checked_path(path)
    form = await request.form(max_files=100, max_part_size=settings.files_max_upload_bytes + 1)
    done, refused = [], []
    for item in form.getlist("upload"):
        if not isinstance(item, UploadFile) or not item.filename:
            continue
        name = PurePosixPath(item.filename).name
        try:
            size = await files.write(settings, sandbox, posixpath.join(folder, name), _read(item))
        except Problem as exc:
            refused.append(f"{name}: {exc.detail}")
            continue
        audit.record(
            db, user.id, "files.upload", target=sid, detail={"path": name, "size": size}, ip=ip
        )
        done.append(f"{name} ({size} bytes)")
    note = "; ".join([*(f"uploaded {d}" for d in done), *refused])
    return await _panel(request, settings, sid, sandbox, folder, note)


async def _read(item: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await item.read(UPLOAD_CHUNK):
        yield chunk


@router.delete("/ui/sessions/{sid}/files", response_class=HTMLResponse)
async def delete(
    sid: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    user: PageUser,
    ip: IpDep,
    path: str = Query(),
) -> Response:
    sandbox = guest_link.running_sandbox(db, service.own_session(db, user, sid))
    path = files.checked_path(path)
    try:
        await files.delete(settings, sandbox, path)
        note = f"deleted {path}"
        audit.record(db, user.id, "files.delete", target=sid, detail={"path": path}, ip=ip)
    except Problem as exc:
        note = exc.detail
    return await _panel(request, settings, sid, sandbox, posixpath.dirname(path) or ".", note)
