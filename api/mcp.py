"""The MCP server at ``/mcp`` (streamable HTTP): berth_client's tools (berth_client/mcp.py,
the same as ``berth mcp`` serves over stdio), each request as the owner of its bearer token.

The tools call this API back over HTTP, at the socket the request came in on, with the
caller's own token, rather than the service layer directly: an agent's command is then a
task submitted as any other (the same validation, command policy, limits, audit and event
log), and the tools are written once for both transports. A request without a live token is
refused here with the API's 401 before the MCP layer reads it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import httpx
from berth_client.aio import AsyncBerth
from berth_client.mcp import Connect, build
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from api import accounts
from api.deps import UNAUTHORIZED
from api.problems import Problem, response
from config.settings import Settings

PATH = "/mcp"


def bearer(request: Request) -> str | None:
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    return secret.strip() or None if scheme.lower() == "bearer" else None


def own_address(request: Request, settings: Settings) -> str:
    """Where this API process itself listens: the socket the request came in on, never the
    Host header (a caller's Host would point the callback, with its token, anywhere)."""
    host, port = request.scope.get("server") or ("127.0.0.1", settings.port)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls_cert_file else "http"
    return f"{scheme}://{host}:{port}"


def connector(settings: Settings) -> Connect:
    @contextlib.asynccontextmanager
    async def connect(ctx: Context) -> AsyncIterator[AsyncBerth]:
        """A client of this API as the caller: its token, this process's own address."""
        request = ctx.request_context.request
        assert isinstance(request, Request)  # streamable HTTP carries the HTTP request
        # Our own socket by its address: the certificate names the public host, not it.
        transport = httpx.AsyncHTTPTransport(verify=False) if settings.tls_cert_file else None
        url = own_address(request, settings)
        async with AsyncBerth(url, bearer(request), transport=transport) as berth:
            yield berth

    return connect


class McpEndpoint:
    """The ASGI app at /mcp; ``running()`` serves it for the app's lifespan."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.server: MCPServer = build(connector(settings))
        self.app: StreamableHTTPASGIApp | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve requests until the block ends: a session manager runs once, so each
        lifespan of the app (a test may start one app more than once) gets its own."""
        self.server.streamable_http_app(
            streamable_http_path=PATH,
            # Each request stands alone (any API replica can answer it); a tool's progress
            # still streams back on its request's own response.
            stateless_http=True,
            # Host checks guard an endpoint that trusts who reaches it; this one trusts only
            # a bearer token, which a rebinding page does not have.
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        manager = self.server.session_manager
        async with manager.run():
            self.app = StreamableHTTPASGIApp(manager)
            try:
                yield
            finally:
                self.app = None

    def live(self, secret: str) -> bool:
        with Session(self.engine) as db:
            return accounts.authenticate(db, self.settings, secret) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        secret = bearer(Request(scope))
        if secret is None or not await anyio.to_thread.run_sync(self.live, secret):
            refused = response(Problem(401, UNAUTHORIZED))
            await refused(scope, receive, send)
            return
        if self.app is None:  # outside the app's lifespan
            await response(Problem(503, "the MCP server is not running"))(scope, receive, send)
            return
        await self.app(scope, receive, send)
