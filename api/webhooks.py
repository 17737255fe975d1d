"""A user's webhook endpoints (JSON API under /api/webhooks; the preferences page uses the
same functions): made with a URL and the events it is told of, each with a signing secret
shown once (when made, or rotated), and a log of its deliveries.

A URL is http(s) only; one whose host resolves to a loopback, link-local, private or other
non-public address is refused unless BERTH_WEBHOOK_ALLOW_PRIVATE says otherwise (and is
checked again at every delivery: activities/webhooks.py)."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Query
from sqlmodel import Session

from activities.webhooks import Refused, check_address
from api.deps import DbDep, IpDep, Problem, SettingsDep, UserDep
from api.problems import problems
from api.schemas import WebhookAttempt, WebhookDeliveryOut, WebhookIn, WebhookOut
from config.keys import payload_keys, seal
from config.settings import Settings
from store import audit, webhooks
from store.models import User, WebhookDelivery, WebhookEndpoint

router = APIRouter(prefix="/api", tags=["webhooks"], responses=problems(401, 422))
SECRET_PREFIX = "whsec_"
# A delivery log page at most.
MOST_DELIVERIES = 200


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def out(endpoint: WebhookEndpoint, secret: str | None = None) -> WebhookOut:
    return WebhookOut(
        id=endpoint.id,
        url=endpoint.url,
        events=endpoint.events,
        active=endpoint.active,
        created_at=endpoint.created_at,
        secret=secret,
    )


def delivery_out(delivery: WebhookDelivery) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(
        id=delivery.id,
        event=delivery.event,
        session_id=delivery.session_id,
        state=delivery.state,
        created_at=delivery.created_at,
        finished_at=delivery.finished_at,
        attempts=[WebhookAttempt.model_validate(a) for a in delivery.attempts],
    )


async def checked(settings: Settings, body: WebhookIn) -> WebhookIn:
    """``body`` if its URL may be an endpoint's, else 422 saying why."""
    try:
        await check_address(body.url, settings.webhook_allow_private)
    except Refused as exc:
        raise Problem(
            422,
            f"the webhook URL is refused: {exc}",
            errors=[{"loc": ["body", "url"], "msg": str(exc), "type": "value_error"}],
        ) from None
    return body


def owned(db: Session, user: User, endpoint_id: str) -> WebhookEndpoint:
    endpoint = db.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.user_id != user.id:
        raise Problem(404, f"no webhook {endpoint_id}")
    return endpoint


def create(
    db: Session, settings: Settings, user: User, body: WebhookIn, ip: str | None
) -> tuple[WebhookEndpoint, str]:
    """A new endpoint (its URL checked by the caller: checked()), and its secret."""
    if len(webhooks.endpoints_of(db, user.id)) >= settings.webhook_max_endpoints:
        raise Problem(
            409,
            f"you have {settings.webhook_max_endpoints} webhooks, the most allowed "
            "(BERTH_WEBHOOK_MAX_ENDPOINTS); remove one first",
        )
    secret = new_secret()
    endpoint = WebhookEndpoint(
        user_id=user.id,
        url=body.url,
        events=sorted(set(body.events)),
        active=body.active,
        secret=seal(payload_keys(settings), secret),
    )
    db.add(endpoint)
    db.commit()
    db.refresh(endpoint)
    audit.record(db, user.id, "webhook.create", endpoint.id, {"url": body.url}, ip=ip)
    return endpoint, secret


def rotate(
    db: Session, settings: Settings, user: User, endpoint_id: str, ip: str | None
) -> tuple[WebhookEndpoint, str]:
    endpoint = owned(db, user, endpoint_id)
    secret = new_secret()
    endpoint.secret = seal(payload_keys(settings), secret)
    db.add(endpoint)
    db.commit()
    db.refresh(endpoint)
    audit.record(db, user.id, "webhook.rotate", endpoint.id, {}, ip=ip)
    return endpoint, secret


def delete(db: Session, user: User, endpoint_id: str, ip: str | None) -> None:
    endpoint = owned(db, user, endpoint_id)
    webhooks.remove(db, endpoint)
    audit.record(db, user.id, "webhook.delete", endpoint_id, {}, ip=ip)


@router.get("/webhooks")
def list_webhooks(db: DbDep, user: UserDep) -> list[WebhookOut]:
    """The caller's endpoints (without their secrets)."""
    return [out(e) for e in webhooks.endpoints_of(db, user.id)]


@router.post("/webhooks", status_code=201, responses=problems(409))
async def create_webhook(
    body: WebhookIn, db: DbDep, settings: SettingsDep, user: UserDep, ip: IpDep
) -> WebhookOut:
    """A new endpoint. The answer carries its signing secret, this once."""
    endpoint, secret = create(db, settings, user, await checked(settings, body), ip)
    return out(endpoint, secret)


@router.get("/webhooks/{webhook_id}", responses=problems(404))
def get_webhook(webhook_id: str, db: DbDep, user: UserDep) -> WebhookOut:
    return out(owned(db, user, webhook_id))


@router.put("/webhooks/{webhook_id}", responses=problems(404))
async def put_webhook(
    webhook_id: str, body: WebhookIn, db: DbDep, settings: SettingsDep, user: UserDep, ip: IpDep
) -> WebhookOut:
    """Replaces its URL, events and whether it is active; its secret stays."""
    endpoint = owned(db, user, webhook_id)
    body = await checked(settings, body)
    endpoint.url, endpoint.events = body.url, sorted(set(body.events))
    endpoint.active = body.active
    db.add(endpoint)
    db.commit()
    db.refresh(endpoint)
    audit.record(db, user.id, "webhook.update", endpoint.id, {"url": body.url}, ip=ip)
    return out(endpoint)


@router.post("/webhooks/{webhook_id}/rotate", responses=problems(404))
def rotate_webhook(
    webhook_id: str, db: DbDep, settings: SettingsDep, user: UserDep, ip: IpDep
) -> WebhookOut:
    """A new signing secret, in this answer only; the old one signs nothing from now on."""
    endpoint, secret = rotate(db, settings, user, webhook_id, ip)
    return out(endpoint, secret)


@router.delete("/webhooks/{webhook_id}", status_code=204, responses=problems(404))
def delete_webhook(webhook_id: str, db: DbDep, user: UserDep, ip: IpDep) -> None:
    """Removes it and its delivery log; deliveries in flight stop."""
    delete(db, user, webhook_id, ip)


@router.get("/webhooks/{webhook_id}/deliveries", responses=problems(404))
def list_deliveries(
    webhook_id: str,
    db: DbDep,
    user: UserDep,
    limit: int = Query(default=50, ge=1, le=MOST_DELIVERIES),
) -> list[WebhookDeliveryOut]:
    """Its delivery log, newest first: each delivery's state and every attempt."""
    endpoint = owned(db, user, webhook_id)
    return [delivery_out(d) for d in webhooks.deliveries_of(db, endpoint.id, limit)]
