"""Request body limits, on every route: a smaller cap before login (the auth routes, the
dashboard's login form, any request that carries no token or session cookie) and a larger
one for requests that do.

A declared ``Content-Length`` over the cap is refused before the app runs; otherwise the body
is counted as it arrives (a chunked body declares nothing, and a declared length may lie), and
the read that passes the cap fails with the same 413 problem document.

A request that merely carries some ``Authorization`` header gets the larger cap before it is
known whether its token is good: the larger cap still bounds what it can send.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import COOKIE
from api.problems import Problem, response

# Reached before login, whatever the request carries.
BEFORE_LOGIN = frozenset({"/api/auth/signup", "/api/auth/token", "/login"})
# Uploads into a workspace (api/files.py, ui/files.py): capped by their own setting.
UPLOADS = re.compile(r"/(api|ui)/sessions/[^/]+/files(/content)?")


def too_large(limit: int, before_login: bool) -> str:
    where = "before login" if before_login else "per request"
    return f"the request body is over the limit of {limit} bytes {where}"


class BodyLimit:
    def __init__(self, app: ASGIApp, authenticated: int, anonymous: int, uploads: int) -> None:
        self.app = app
        self.authenticated = authenticated
        self.anonymous = anonymous
        self.uploads = max(uploads, authenticated)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        before_login = scope["path"] in BEFORE_LOGIN or not _carries_credentials(headers)
        limit = self.anonymous if before_login else self.authenticated
        if not before_login and UPLOADS.fullmatch(scope["path"]):
            limit = self.uploads + 64 * 1024  # a form's own parts around the file
        detail = too_large(limit, before_login)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await response(Problem(413, detail))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised into whoever reads the body: the app renders it as its errors.
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, counted, send)


def _carries_credentials(headers: dict[bytes, bytes]) -> bool:
    if headers.get(b"authorization", b"").lower().startswith(b"bearer "):
        return True
    cookies = headers.get(b"cookie", b"").decode("latin-1")
    return any(part.strip().startswith(f"{COOKIE}=") for part in cookies.split(";"))
