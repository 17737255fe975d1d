"""``GET /metrics``: this API process's metrics in Prometheus's text format, with the sessions
by status and template counted from the database as it is scraped.

Prometheus scrapes without cookies: with BERTH_METRICS_TOKEN set, the caller must send it as
a bearer token; unset, only a caller on the loopback address may scrape (a Prometheus beside
the API, or a TLS proxy there that adds the token). The answer names templates, providers and
counts, never a user.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from api.deps import EngineDep, Problem, SettingsDep
from config.settings import Settings
from store.models import SessionRow
from telemetry.metrics import SESSIONS

router = APIRouter(tags=["health"])


def may_scrape(request: Request, settings: Settings) -> bool:
    if settings.metrics_token:
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(secret, settings.metrics_token)
    try:
        return request.client is not None and ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def count_sessions(engine: Engine) -> None:
    """The sessions gauge as the database has it now (a status no session has any more drops
    out)."""
    with Session(engine) as db:
        rows = db.exec(
            select(SessionRow.status, SessionRow.template, func.count(col(SessionRow.id))).group_by(
                col(SessionRow.status), col(SessionRow.template)
            )
        ).all()
    SESSIONS.clear()
    for status, template, count in rows:
        SESSIONS.labels(str(status), template).set(count)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"description": "Not allowed"}},
)
async def metrics(request: Request, settings: SettingsDep, engine: EngineDep) -> Response:
    if not may_scrape(request, settings):
        raise Problem(
            401, "the metrics token is needed (BERTH_METRICS_TOKEN), or a loopback caller"
        )
    await asyncio.to_thread(count_sessions, engine)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
