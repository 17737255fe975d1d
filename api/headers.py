"""Security headers on every answer, added as the response starts (plain ASGI, so streams
pass through untouched)."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The dashboard loads only its own scripts and styles (htmx's eval and injected styles are
# switched off in base.html), talks only to its own origin, and may not be framed.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# A previewed app (api/previews.py) is not trusted: its pages get an origin of their own
# (a sandbox without allow-same-origin), so their scripts cannot read the dashboard nor act
# with its login; and its token-bearing URLs are not sent on as referrers.
PREVIEW = "/preview/"
PREVIEW_HEADERS = [
    (b"content-security-policy",
     b"sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]  # fmt: skip
# The session page runs xterm.js (its interactive shell), which sizes and colours the terminal
# with <style> elements it writes: that page alone allows inline styles (never scripts).
SESSION_PAGE = re.compile(r"/sessions/[0-9a-f]+")
SESSION_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
# FastAPI's API docs pages load their viewer from a CDN with an inline script.
DOCS_CSP = "frame-ancestors 'none'"
DOCS = ("/docs", "/redoc")
COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
# Sent over HTTPS only (a browser ignores it over http): a year of HTTPS for this host.
HSTS = (b"strict-transport-security", b"max-age=31536000")


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        policy = DOCS_CSP if path.startswith(DOCS) else CSP
        if SESSION_PAGE.fullmatch(path):
            policy = SESSION_CSP
        extra = [*COMMON, (b"content-security-policy", policy.encode())]
        if path.startswith(PREVIEW):
            extra = list(PREVIEW_HEADERS)
        if scope.get("scheme") == "https":
            extra.append(HSTS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += extra
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
