"""The LLM proxy over HTTP: OpenAI's chat-completions API (so any OpenAI client library
works with a Berth token as its key), and each user's usage.

The caller is found by its token (one database read, so a revoked token is refused at
once); the proxy's own database work is one or two more thread hops.

A call may name the session and task it is for (headers ``X-Berth-Session`` and
``X-Berth-Task``), which must be the caller's own; its tokens are then counted there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import Session

from api.deps import DbDep, Problem, UserDep
from api.problems import LimitOut, problems
from llm.accounting import user_usage
from llm.models import (
    AllProvidersFailed,
    BudgetExceeded,
    Caller,
    ChatRequest,
    InvalidRequest,
    LLMError,
    NoProvider,
    RateLimited,
    SpendLimited,
    UserUsage,
)
from llm.proxy import LLMProxy
from llm.shapes import completion
from store.models import SessionRow, TaskRow

router = APIRouter(responses=problems(401, 422))

STATUS: dict[type[LLMError], int] = {
    InvalidRequest: 400,
    RateLimited: 429,
    BudgetExceeded: 429,
    NoProvider: 503,
    AllProvidersFailed: 503,
}


async def get_proxy(request: Request) -> LLMProxy:
    """One proxy per API process, made on first use (its cool-downs are per process)."""
    state = request.app.state
    if getattr(state, "llm", None) is None:
        state.llm = LLMProxy(state.settings, state.engine)
    proxy: LLMProxy = state.llm
    return proxy


ProxyDep = Annotated[LLMProxy, Depends(get_proxy)]


async def get_caller(
    request: Request,
    user: UserDep,
    x_berth_session: Annotated[str | None, Header()] = None,
    x_berth_task: Annotated[str | None, Header()] = None,
) -> Caller:
    """The user of the token (a live one: revoked tokens are refused), and the session and
    task they name, which must be theirs."""
    if x_berth_session or x_berth_task:
        engine: Engine = request.app.state.engine
        await asyncio.to_thread(check_owner, engine, user.id, x_berth_session, x_berth_task)
    return Caller(user_id=user.id, session_id=x_berth_session, task_id=x_berth_task)


def check_owner(engine: Engine, user_id: str, sid: str | None, tid: str | None) -> None:
    with Session(engine) as db:
        session = db.get(SessionRow, sid) if sid else None
        if session is None or session.user_id != user_id:
            raise Problem(404, f"no session {sid}")
        task = db.get(TaskRow, tid) if tid else None
        if tid and (task is None or task.session_id != sid):
            raise Problem(404, f"no task {tid} in session {sid}")


def problem(exc: LLMError) -> Problem:
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 502)
    if isinstance(exc, SpendLimited):
        used = LimitOut(
            name=exc.limit, value=exc.value, unit="USD", used=exc.spent, resets_at=exc.resets_at
        )
        return Problem(status, str(exc), limit=used)  # Retry-After: when it resets
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited) else None
    return Problem(status, str(exc), headers=headers)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@router.post(
    "/v1/chat/completions",
    tags=["llm"],
    response_model=None,
    responses=problems(400, 404, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ChatRequest.model_json_schema()}},
        }
    },
)
async def chat_completions(
    request: Request,
    proxy: ProxyDep,
    caller: Annotated[Caller, Depends(get_caller)],
    cache_control: Annotated[str | None, Header()] = None,
) -> Response:
    """OpenAI's chat completions, streaming (`"stream": true`) or not. The cache answers
    deterministic requests (temperature 0); `"cache": false` in the body or
    `Cache-Control: no-cache` bypasses it, `"cache": true` caches at any temperature."""
    # Read here, not by FastAPI: a malformed request is a 400, as OpenAI answers it.
    try:
        chat = ChatRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the body"
        raise Problem(400, f"not a chat completions request: {where}: {error['msg']}") from exc
    extras = chat.model_extra or {}
    cache = extras.pop("cache", None)
    if cache_control and ("no-cache" in cache_control or "no-store" in cache_control):
        cache = False
    if cache is not None and not isinstance(cache, bool):
        raise Problem(400, '"cache" is true or false')
    if extras.get("n", 1) != 1:
        raise Problem(400, "n: only one choice per request")

    if not chat.stream:
        try:
            result = await proxy.complete(chat, caller, cache=cache)
        except LLMError as exc:
            raise problem(exc) from exc
        headers = {
            "X-Berth-Provider": result.provider,
            "X-Berth-Cache": "hit" if result.cached else "miss",
            "X-Berth-Cost-USD": f"{result.usage.cost_usd:.6f}",
        }
        return JSONResponse(completion(result), headers=headers)

    chunks = proxy.stream(chat, caller, cache=cache)
    try:
        # The first chunk comes once a provider answers: until then, errors are HTTP errors.
        first = await anext(chunks)
    except LLMError as exc:
        raise problem(exc) from exc

    async def events() -> AsyncIterator[str]:
        yield sse(first)
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except LLMError as exc:
            # Too late for an HTTP status: OpenAI's clients raise on an error event.
            yield sse({"error": {"message": str(exc), "type": "upstream_error"}})
            return
        finally:
            await chunks.aclose()  # the client may have gone: stop asking the provider
        yield sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/v1/models", tags=["llm"])
def list_models(proxy: ProxyDep, user: UserDep) -> dict[str, Any]:
    """The names a request's `model` may take: `berth` means every provider in order."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "berth"}
            for name in proxy.models()
        ],
    }


@router.get("/api/usage", tags=["llm"])
def usage(db: DbDep, user: UserDep) -> UserUsage:
    """Your LLM usage: in all, by session and by task (tokens and cost of calls that
    reached a provider; cache hits are counted as calls and cost nothing)."""
    return user_usage(db, user.id)
