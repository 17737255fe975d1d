"""The web application, assembled on the top floor: the JSON API, the codec endpoint, the
dashboard's pages and live stream, health, and one error renderer for all of them (the
dashboard's routes answer errors as pages, every other path as problem documents)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from starlette.routing import Route

from api import problems
from api.admin import router as admin_router
from api.codec import router as codec_router
from api.deps import EngineDep, Problem, Streams, TemporalLink
from api.headers import SecurityHeaders
from api.limits import BodyLimit
from api.mcp import PATH as MCP_PATH
from api.mcp import McpEndpoint
from api.metrics import router as metrics_router
from api.openai_compat import router as llm_router
from api.preferences import router as preferences_router
from api.previews import router as previews_router
from api.routes import router
from api.security import Passwords
from api.trace import TraceIds
from api.webhooks import router as webhooks_router
from config.keys import payload_keys
from config.settings import Settings, get_settings
from store.db import get_engine, migrate
from store.notify import Hub
from ui.admin_pages import router as admin_page_router
from ui.checkpoints import router as checkpoint_page_router
from ui.files import router as files_page_router
from ui.live import router as live_router
from ui.pages import router as ui_router
from ui.preferences import router as preferences_page_router
from ui.previews import router as previews_page_router
from ui.render import STATIC_DIR, is_dashboard, problem_page
from ui.services import router as services_page_router
from ui.terminal import router as terminal_page_router
from ui.terminal import sockets as terminal_sockets
from ui.tokens import router as tokens_page_router
from ui.webhooks import router as webhooks_page_router
from workflows.codec import EncryptionCodec

log = logging.getLogger("berth.api")


def render_problem(request: Request, problem: Problem) -> Response:
    """The dashboard's errors as HTML, everyone else's as problem documents."""
    if is_dashboard(request):
        return problem_page(request, problem)
    return problems.response(problem)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app, with ``settings`` (by default the environment's)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(migrate, settings.db_url)
        await app.state.hub.start()
        async with mcp.running():
            yield
        await app.state.hub.stop()

    app = FastAPI(
        title="Berth",
        summary="Autonomous agents, each in its own sandbox, orchestrated by Temporal.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = get_engine(settings.db_url)
    app.state.temporal = TemporalLink(settings)
    app.state.hub = Hub(app.state.engine)
    app.state.streams = Streams(
        app.state.engine, settings.max_streams_per_user, settings.stream_lifetime_s
    )
    app.state.passwords = Passwords(settings)
    # An operator's Web UI shows every payload of a history, the plaintext ones of a migration
    # window too: shown to an admin, never acted upon, so nothing is refused here.
    app.state.codec = EncryptionCodec(payload_keys(settings), accept_plaintext=True)
    problems.install(app, render_problem)
    mcp = McpEndpoint(settings, app.state.engine)

    @app.get("/healthz", tags=["health"], responses={503: {"description": "Something is down"}})
    async def healthz(request: Request, engine: EngineDep) -> JSONResponse:
        checks: dict[str, Any] = {}
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception:
            # The reason goes to the log, not to whoever asks: it names internal addresses.
            log.exception("health check: the database does not answer")
            checks["database"] = "unavailable"
        try:
            link: TemporalLink = request.app.state.temporal
            await (await link.client()).service_client.check_health()
            checks["temporal"] = "ok"
        except Exception:
            log.exception("health check: Temporal does not answer")
            checks["temporal"] = "unavailable"
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", **checks},
            status_code=200 if healthy else 503,
        )

    app.include_router(router)
    app.include_router(llm_router)
    app.include_router(codec_router)
    app.include_router(metrics_router)
    app.include_router(admin_router)
    app.include_router(preferences_router)
    app.include_router(webhooks_router)
    app.include_router(ui_router)
    app.include_router(checkpoint_page_router)
    app.include_router(live_router)
    app.include_router(preferences_page_router)
    app.include_router(webhooks_page_router)
    app.include_router(tokens_page_router)
    app.include_router(admin_page_router)
    app.include_router(files_page_router)
    app.include_router(services_page_router)
    app.include_router(previews_router)
    app.include_router(previews_page_router)
    app.include_router(terminal_page_router)
    app.include_router(terminal_sockets)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # The MCP server (api/mcp.py): the JSON API's tools for agents, by bearer token.
    # Stateless: no stream to GET and no session to DELETE, so POST only.
    app.router.routes.append(Route(MCP_PATH, mcp, methods=["POST"]))
    app.add_middleware(
        BodyLimit,
        authenticated=settings.max_body_bytes,
        anonymous=settings.max_body_bytes_anonymous,
        uploads=settings.files_max_upload_bytes,
    )
    app.add_middleware(SecurityHeaders)  # a refused body's answer gets them too
    app.add_middleware(TraceIds)  # outermost: every line logged for a request names it
    return app
