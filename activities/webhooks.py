"""Delivering a webhook: one signed POST per attempt, each logged on the delivery's row.

An attempt signs ``"{timestamp}.{body}"`` with HMAC-SHA256 under the endpoint's secret and
sends it in ``Berth-Signature: t={timestamp},v1={hex}``: a receiver recomputes it, compares
in constant time and refuses old timestamps (a replayed delivery). A 2xx answer delivers
it; anything else is an error the delivery workflow retries with a growing backoff. Where
an endpoint points is checked again at every attempt, on the addresses its name resolves to
then: a URL that passed when it was saved may since resolve to the server's own network.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.models import WebhookRequest
from config.keys import Keyring, unseal
from store import webhooks
from store.models import WebhookDelivery, WebhookEndpoint

SIGNATURE_HEADER = "Berth-Signature"
# Of an error's text, what the log keeps.
MAX_ERROR_CHARS = 300


class Refused(ValueError):
    """A URL an endpoint may not have: not http(s), or resolving to a non-public address."""


def sign(secret: str, timestamp: int, body: str) -> str:
    """The ``Berth-Signature`` header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def check_url(url: str) -> str:
    """The host of a URL an endpoint may have (http or https, a host, no credentials)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused("the URL must be http:// or https://")
    if not parts.hostname:
        raise Refused("the URL names no host")
    if parts.username or parts.password:
        raise Refused("the URL may not carry credentials")
    return parts.hostname


async def check_address(url: str, allow_private: bool) -> None:
    """Refused unless every address the URL's host resolves to is public (or the setting
    allows any), so an endpoint cannot make the server reach its own network (SSRF)."""
    host = check_url(url)
    if allow_private:
        return
    port = urlsplit(url).port or 443
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port)
    except OSError as exc:
        raise Refused(f"{host} does not resolve: {exc}") from None
    for *_, address in found:
        ip = ipaddress.ip_address(address[0])
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        if not (mapped or ip).is_global:
            raise Refused(
                f"{host} resolves to {ip}, a non-public address (BERTH_WEBHOOK_ALLOW_PRIVATE)"
            )


@dataclass(frozen=True)
class _Due:
    url: str
    secret: str
    event: str
    body: str


class WebhookActivities:
    def __init__(
        self, engine: Engine, keys: Keyring, allow_private: bool, timeout_s: float
    ) -> None:
        self.engine, self.keys = engine, keys
        self.allow_private, self.timeout_s = allow_private, timeout_s

    def _due(self, delivery_id: str) -> _Due | None:
        """What to send, or None: the delivery is done, or its endpoint gone or paused."""
        with Session(self.engine) as db:
            delivery = db.get(WebhookDelivery, delivery_id)
            if delivery is None or delivery.state != webhooks.PENDING:
                return None
            endpoint = db.get(WebhookEndpoint, delivery.endpoint_id)
            if endpoint is None or not endpoint.active:
                return None
            secret = unseal(self.keys, endpoint.secret)
            return _Due(endpoint.url, secret, delivery.event, delivery.body)

    def _log(
        self, delivery_id: str, status: int | None, error: str | None, ms: int, state: str
    ) -> None:
        with Session(self.engine) as db:
            webhooks.attempted(db, delivery_id, status, error, ms, state)

    @activity.defn(name="DeliverWebhook")
    async def deliver(self, request: WebhookRequest) -> None:
        due = await asyncio.to_thread(self._due, request.delivery_id)
        if due is None:
            return
        last = activity.info().attempt >= request.max_attempts
        began = time.monotonic()
        status: int | None = None
        error: str | None = None
        final = False
        try:
            await check_address(due.url, self.allow_private)
            stamp = int(time.time())
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as web:
                answer = await web.post(
                    due.url,
                    content=due.body,
                    headers={
                        "Content-Type": "application/json",
                        "User-Agent": "Berth-Webhooks",
                        "Berth-Event": due.event,
                        "Berth-Delivery": request.delivery_id,
                        SIGNATURE_HEADER: sign(due.secret, stamp, due.body),
                    },
                )
            status = answer.status_code
            if not answer.is_success:
                error = f"answered {status}"
        except Refused as exc:
            error, final = str(exc), True  # tried again, it would be refused again
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        ms = int((time.monotonic() - began) * 1000)
        state = webhooks.DELIVERED if error is None else webhooks.PENDING
        if error is not None and (final or last):
            state = webhooks.FAILED
        await asyncio.to_thread(self._log, request.delivery_id, status, error, ms, state)
        if error is not None:
            raise ApplicationError(error, type="WebhookNotDelivered", non_retryable=final)
