"""A trace id for every request, on every log line written while it is served: the one of
the caller's W3C ``traceparent`` header when it sends one (a proxy, a tracing client), else a
new one. The same id is sent back in ``traceparent``, so a caller can quote it."""

from __future__ import annotations

import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from telemetry import logs

# version-traceid-parentid-flags; an all-zero trace id is invalid.
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id(header: str | None) -> str:
    found = TRACEPARENT.match(header or "")
    if found and found[1] != "0" * 32:
        return found[1]
    return secrets.token_hex(16)


class TraceIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        trace = trace_id(headers.get(b"traceparent", b"").decode("latin-1"))
        header = f"00-{trace}-{secrets.token_hex(8)}-01".encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"traceparent", header)]
            await send(message)

        with logs.about(trace=trace):
            await self.app(scope, receive, send_with_id)
