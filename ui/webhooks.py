"""The webhooks section of the preferences page: the user's endpoints, a form that adds one
(its signing secret shown this once), and per endpoint its delivery log, a new secret, and
removal. The same functions as the JSON API's (api/webhooks.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from api import webhooks
from api.deps import DbDep, IpDep, Problem, SettingsDep
from api.schemas import WebhookIn
from store import webhooks as rows
from ui.fragments import field_errors, render_block
from ui.render import PageCaller, dashboard_router

router = dashboard_router()
PAGE = "preferences.html"
# Deliveries shown in the page's log of an endpoint.
LOG_SHOWN = 20


def listing(db: DbDep, caller: PageCaller) -> dict[str, Any]:
    """What the section shows (also on the page's first render)."""
    return {"webhooks": rows.endpoints_of(db, caller[0].id), "webhook_events": rows.EVENTS}


@router.post("/ui/webhooks", response_class=HTMLResponse)
async def add_webhook(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    caller: PageCaller,
    ip: IpDep,
    url: Annotated[str, Form(max_length=2000)] = "",
    events: Annotated[list[str] | None, Form()] = None,
) -> Response:
    """A new endpoint; the answer is the only place its secret appears."""
    errors: dict[str, str] = {}
    try:
        body = await webhooks.checked(
            settings,
            WebhookIn(url=url.strip(), events=events or []),
        )
        endpoint, secret = webhooks.create(db, settings, caller[0], body, ip)
    except ValidationError as exc:
        errors = field_errors(exc)
    except Problem as exc:
        errors = {"url": exc.detail}
    if errors:
        return render_block(
            request, PAGE, "webhooks", settings, caller, 422,
            typed_url=url, typed_events=events or [], errors=errors, **listing(db, caller),
        )  # fmt: skip
    return render_block(
        request, PAGE, "webhooks", settings, caller, created=endpoint, secret=secret,
        **listing(db, caller),
    )  # fmt: skip


@router.post("/ui/webhooks/{webhook_id}/rotate", response_class=HTMLResponse)
def rotate_webhook(
    webhook_id: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    caller: PageCaller,
    ip: IpDep,
) -> Response:
    endpoint, secret = webhooks.rotate(db, settings, caller[0], webhook_id, ip)
    return render_block(
        request, PAGE, "webhooks", settings, caller, created=endpoint, secret=secret,
        rotated=True, **listing(db, caller),
    )  # fmt: skip


@router.post("/ui/webhooks/{webhook_id}/delete", response_class=HTMLResponse)
def delete_webhook(
    webhook_id: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    caller: PageCaller,
    ip: IpDep,
) -> Response:
    webhooks.delete(db, caller[0], webhook_id, ip)
    return render_block(request, PAGE, "webhooks", settings, caller, **listing(db, caller))


@router.get("/ui/webhooks/{webhook_id}/deliveries", response_class=HTMLResponse)
def webhook_log(
    webhook_id: str, request: Request, db: DbDep, settings: SettingsDep, caller: PageCaller
) -> Response:
    """An endpoint's latest deliveries, each with its attempts."""
    endpoint = webhooks.owned(db, caller[0], webhook_id)
    return render_block(
        request, PAGE, "deliveries", settings, caller, endpoint=endpoint,
        deliveries=rows.deliveries_of(db, endpoint.id, LOG_SHOWN),
    )  # fmt: skip
