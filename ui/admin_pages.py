"""The admins' page: the sandbox hosts in the registry, each template's warm pool on this
host, every user's sessions (newest first, each linked to its workflow in the Temporal Web UI)
and the audit log's newest entries. Anyone else gets a 403, as the admin API answers them;
reading it is audited."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

import vm_templates
from api import service
from api.admin import host_list, set_host_state
from api.deps import DbDep, IpDep, Problem, SettingsDep, TemporalDep
from api.schemas import PoolOut
from config.settings import Settings
from store import audit
from store.models import HostState
from ui.render import PageCaller, dashboard_router, render_page
from ui.state import workflow_url

router = dashboard_router()
SESSIONS_SHOWN = 100
AUDIT_SHOWN = 50


async def _pools(temporal: TemporalDep, settings: Settings) -> list[tuple[str, PoolOut | str]]:
    """Each template's pool, or why there is none to show."""
    found: list[tuple[str, PoolOut | str]] = []
    for template in vm_templates.names():
        try:
            found.append((template, await service.pool_state(temporal, settings, template)))
        except Problem as exc:
            if exc.status == 404:
                found.append((template, "no warm pool on this host"))
            else:
                found.append((template, exc.detail))
    return found


@router.get("/admin", response_class=HTMLResponse)
async def admin_page(
    request: Request,
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    caller: PageCaller,
    ip: IpDep,
) -> Response:
    if not caller[0].is_admin:
        raise Problem(403, "only an admin may see this page")
    audit.record(db, caller[0].id, "admin.page.read", ip=ip)
    sessions = service.list_sessions(db, None, limit=SESSIONS_SHOWN)
    return render_page(
        request,
        "admin.html",
        settings,
        caller,
        hosts=host_list(db, settings),
        pools=await _pools(temporal, settings),
        sessions=[(row, workflow_url(settings, row.id)) for row in sessions],
        entries=audit.newest(db, AUDIT_SHOWN),
        provider=settings.sandbox_provider,
    )


@router.post("/ui/admin/hosts/{host_id}/{action}", response_class=HTMLResponse)
def drain_host(
    host_id: str,
    action: str,
    db: DbDep,
    caller: PageCaller,
    ip: IpDep,
) -> Response:
    """The admin page's drain and undrain buttons (the CLI's ``host drain``, without
    ``--move``)."""
    if not caller[0].is_admin:
        raise Problem(403, "only an admin may drain a host")
    if action not in ("drain", "undrain"):
        raise Problem(404, f"no host action {action!r}: drain or undrain")
    state = HostState.draining if action == "drain" else HostState.active
    set_host_state(db, caller[0], host_id, state, ip)
    said = "draining: no new sessions" if action == "drain" else "active: takes new sessions"
    return HTMLResponse(f'<span class="ok">{said}</span>')
