"""What keeps another site from acting through a signed-in browser (CSRF).

Every unsafe request to the dashboard must come from its own origin (``Origin``, or
``Referer`` when a browser sends no Origin) and carry a CSRF token: htmx sends it in a header
set through ``hx-headers`` on <body>, plain forms in a hidden field. A signed-in page's token
is a keyed hash of the dashboard token's id, so it needs no storage and dies with the token.
The login form, which no session protects yet, is tied to a random cookie of its own (the
token is a keyed hash of it), so a foreign site cannot log a browser into its own account.
"""

from __future__ import annotations

import hmac
import secrets

from fastapi import Request, Response

from api.problems import Problem
from config.keys import keyed_hash, user_keys
from config.settings import Settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HEADER = "X-CSRF-Token"
FIELD = "csrf"
LOGIN_COOKIE = "berth_login_csrf"


def token_for(settings: Settings, binding: str) -> str:
    return keyed_hash(user_keys(settings).current, "csrf", binding)


def _valid(settings: Settings, binding: str, offered: str) -> bool:
    return any(
        hmac.compare_digest(keyed_hash(key, "csrf", binding), offered)
        for key in user_keys(settings).keys
    )


def origin_of(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def check_origin(request: Request) -> None:
    """An unsafe request must say it comes from this very origin."""
    if request.method in SAFE_METHODS:
        return
    own = origin_of(request)
    origin = request.headers.get("origin")
    referer = request.headers.get("referer")
    if origin is not None:
        same = origin == own
    else:
        same = referer is not None and (referer == own or referer.startswith(own + "/"))
    if not same:
        raise Problem(403, "cross-site request refused: use the dashboard's own pages")


async def offered_tokens(request: Request) -> list[str]:
    """What the request offers: the header (htmx), the form field (plain forms)."""
    offered = [request.headers.get(HEADER, "")]
    if "form" in request.headers.get("content-type", ""):
        field = (await request.form()).get(FIELD)
        offered.append(field if isinstance(field, str) else "")
    return [token for token in offered if token]


async def check_token(request: Request, settings: Settings, binding: str) -> None:
    if request.method in SAFE_METHODS:
        return
    if not any(_valid(settings, binding, token) for token in await offered_tokens(request)):
        raise Problem(403, "missing or stale CSRF token: reload the page")


def login_binding(request: Request) -> str:
    """The login form's binding: the browser's login cookie, or a new one."""
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)


def set_login_cookie(request: Request, response: Response, binding: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        binding,
        path="/login",
        httponly=True,
        samesite="lax",
        secure=is_https(request),
    )


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"
