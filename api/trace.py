"""A trace id for every request, on every log line written while it is served: the one of
the caller's W3C ``traceparent`` header when it sends one (a proxy, a tracing client), else a
new one. The same id is sent back in ``traceparent``, so a caller can quote it.

With traces on (telemetry/tracing.py), each request is a server span too, a child of the
caller's traceparent, and the ids are that span's: what the request asks of the workflows
(a task) carries its context on."""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from telemetry import logs, tracing

# version-traceid-parentid-flags; an all-zero trace id is invalid.
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id(header: str | None) -> str:
    found = TRACEPARENT.match(header or "")
    if found and found[1] != "0" * 32:
        return found[1]
    return secrets.token_hex(16)


def _answering(send: Send, header: bytes) -> Callable[[Message], Awaitable[None]]:
    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"traceparent", header)]
        await send(message)

    return send_with_id


class TraceIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller = dict(scope["headers"]).get(b"traceparent", b"").decode("latin-1")
        if tracing.enabled():
            await self._traced(scope, receive, send, caller)
            return
        trace_hex = trace_id(caller)
        header = f"00-{trace_hex}-{secrets.token_hex(8)}-01".encode()
        with logs.about(trace=trace_hex):
            await self.app(scope, receive, _answering(send, header))

    async def _traced(self, scope: Scope, receive: Receive, send: Send, caller: str) -> None:
        method = scope.get("method", "")
        with tracing.tracer().start_as_current_span(
            method,
            context=tracing.extract(caller),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope.get("path", "")},
        ) as span:
            header = (tracing.traceparent() or "").encode()
            status: list[int] = []

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status.append(int(message["status"]))
                await _answering(send, header)(message)

            with logs.about(trace=tracing.current_trace_id()):
                await self.app(scope, receive, send_traced)
            # Named by its route (bounded), known only once the router has matched it.
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.update_name(f"{method} {route}")
            if status:
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(trace.StatusCode.ERROR)
