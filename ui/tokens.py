"""The API tokens page: the user's live tokens, a form that makes one (its secret shown this
once), and revoke buttons. Each dashboard login is a token too, listed as such; revoking this
browser's own logs it out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from api import accounts
from api.deps import COOKIE, DASHBOARD_TOKEN, DbDep, IpDep, SettingsDep
from api.schemas import TokenCreate
from ui.fragments import field_errors, render_block
from ui.render import PageCaller, dashboard_router, render_page

router = dashboard_router()
PAGE = "tokens.html"
# Shown at most; every dashboard login adds one, and they expire (BERTH_TOKEN_TTL_HOURS).
MOST_SHOWN = 500


def _listing(db: DbDep, caller: PageCaller) -> dict[str, Any]:
    rows = accounts.list_tokens(db, caller[0], MOST_SHOWN, None)
    return {
        "tokens": sorted(rows, key=lambda row: row.created_at, reverse=True),
        "current": caller[1].id,
        "dashboard": DASHBOARD_TOKEN,
        "more": len(rows) == MOST_SHOWN,
    }


@router.get("/tokens", response_class=HTMLResponse)
def tokens_page(request: Request, db: DbDep, settings: SettingsDep, caller: PageCaller) -> Response:
    return render_page(request, PAGE, settings, caller, **_listing(db, caller))


@router.post("/ui/tokens", response_class=HTMLResponse)
def create_token(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    caller: PageCaller,
    ip: IpDep,
    name: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """A new token; the answer is the only place its secret ever appears."""
    try:
        body = TokenCreate(name=name.strip())
    except ValidationError as exc:
        return render_block(
            request, PAGE, "tokens", settings, caller, 422,
            typed=name, error=field_errors(exc)["name"], **_listing(db, caller),
        )  # fmt: skip
    row, secret = accounts.issue_token(db, settings, caller[0], body.name, ip)
    return render_block(
        request, PAGE, "tokens", settings, caller, created=row, secret=secret,
        **_listing(db, caller),
    )  # fmt: skip


@router.post("/ui/tokens/{token_id}/revoke", response_class=HTMLResponse)
def revoke_token(
    token_id: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    caller: PageCaller,
    ip: IpDep,
) -> Response:
    """Revokes one of the user's tokens; this browser's own login logs it out."""
    accounts.revoke(db, caller[0], token_id, ip)
    if token_id == caller[1].id:
        response = Response(status_code=200, headers={"HX-Redirect": "/login"})
        response.delete_cookie(COOKIE)
        return response
    return render_block(request, PAGE, "tokens", settings, caller, **_listing(db, caller))
