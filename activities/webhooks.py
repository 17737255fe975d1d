"""Delivering a webhook: one signed POST per attempt, each logged on the delivery's row.

An attempt signs ``"{timestamp}.{body}"`` with HMAC-SHA256 under the endpoint's secret and
sends it in ``Berth-Signature: t={timestamp},v1={hex}``: a receiver recomputes it, compares
in constant time and refuses old timestamps (a replayed delivery). A 2xx answer delivers
it; anything else is an error the delivery workflow retries with a growing backoff. Where
an endpoint points is checked again at every attempt, on the addresses its name resolves to
then: a URL that passed when it was saved may since resolve to the server's own network.
The attempt then connects to the address checked, not to the name again: a name whose
answers change between the check and the connection (DNS rebinding) cannot slip past it.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    """The host of a URL an endpoint may have (http or https, a host, no credentials, a
    port if any that is one)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (read to be checked: it raises for one out of range)
    except ValueError as exc:
        raise Refused(f"the URL is not one: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("the URL must be http:// or https://")
    if not parts.hostname:
        raise Refused("the URL names no host")
    if parts.username or parts.password:
        raise Refused("the URL may not carry credentials")
    return parts.hostname


# IPv6 prefixes that carry an IPv4 address in their last 32 bits, which a host or network
# may translate to it (NAT64, the deprecated IPv4-compatible form): judged by that address.
EMBEDS_IPV4 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::/96"))


def public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` reaches the public internet only: not the server's own networks
    (loopback, private, link-local, ...), not multicast, nor an IPv6 form of such an IPv4
    address (mapped, 6to4, Teredo, NAT64, IPv4-compatible)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and any(ip in prefix for prefix in EMBEDS_IPV4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not public(embedded):
            return False
        if ip.is_site_local:
            return False
    return ip.is_global and not ip.is_multicast


async def check_address(url: str, allow_private: bool) -> list[str]:
    """The addresses the URL's host resolves to, refused unless every one is public (or the
    setting allows any), so an endpoint cannot make the server reach its own network (SSRF);
    empty when any is allowed (nothing to pin: see ``pinned``)."""
    host = check_url(url)
    if allow_private:
        return []
    port = urlsplit(url).port or 443
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port)
    except OSError as exc:
        raise Refused(f"{host} does not resolve: {exc}") from None
    addresses: list[str] = []
    for *_, address in found:
        ip = ipaddress.ip_address(address[0])
        if not public(ip):
            # Which address is not said: users would learn the server's internal names.
            raise Refused(f"{host} resolves to a non-public address (BERTH_WEBHOOK_ALLOW_PRIVATE)")
        if str(ip) not in addresses:  # one per socket type: each address once
            addresses.append(str(ip))
    if not addresses:  # nothing to pin the connection to
        raise Refused(f"{host} resolves to no address")
    return addresses


def pinned(url: str, address: str | None) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """The URL to connect to, with the headers and httpx extensions that keep it the named
    host's: a checked address in place of the name (resolving the name again could give
    another, DNS rebinding), the name in ``Host`` and, over TLS, in the SNI and the
    certificate's check. The URL as it is without an address (any is allowed)."""
    target = httpx.URL(url)
    if address is None:
        return target, {}, {}
    host = target.netloc.decode("ascii")
    sni = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return target.copy_with(host=address), {"Host": host}, sni


async def post(
    web: httpx.AsyncClient, url: str, addresses: list[str], body: str, headers: dict[str, str]
) -> httpx.Response:
    """POST ``body`` to the first of the checked addresses that takes the connection: one
    refused or unreachable at once (an IPv6 address on a server without an IPv6 route) gives
    way to the next; a timeout does not (the attempt's time is spent)."""
    candidates: list[str | None] = [*addresses] or [None]
    *others, final = candidates
    for address in others:
        with contextlib.suppress(httpx.ConnectError):
            return await _post_to(web, url, address, body, headers)
    return await _post_to(web, url, final, body, headers)


async def _post_to(
    web: httpx.AsyncClient, url: str, address: str | None, body: str, headers: dict[str, str]
) -> httpx.Response:
    target, host, extensions = pinned(url, address)
    return await web.post(target, content=body, headers={**host, **headers}, extensions=extensions)


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
            addresses = await check_address(due.url, self.allow_private)
            stamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "Berth-Webhooks",
                "Berth-Event": due.event,
                "Berth-Delivery": request.delivery_id,
                SIGNATURE_HEADER: sign(due.secret, stamp, due.body),
            }
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as web:
                answer = await post(web, due.url, addresses, due.body, headers)
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
