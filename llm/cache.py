"""The response cache: shared by every API and worker process, in the app's database by
default or in Redis when ``BERTH_REDIS_URL`` is set. Entries expire after a TTL.

A key is a hash of everything that shapes an answer: the provider (kind, URL, model), every
generation parameter, the tools and tool choice, and the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine, delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from berth.settings import Settings
from llm.models import ChatRequest, ChatResult
from llm.providers import Provider
from store.models import LLMCacheEntry

# Expired rows are deleted by a writer at most this often (per process).
PURGE_EVERY_S = 60.0
REDIS_PREFIX = "berth:llm:"


def cache_key(provider: Provider, request: ChatRequest) -> str:
    shape: dict[str, Any] = {
        "provider": provider.identity(),
        "params": provider.params(request),
        "tools": request.tools,
        "tool_choice": request.tool_choice,
        "messages": request.messages,
    }
    text = json.dumps(shape, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache(Protocol):
    async def first(self, keys: list[str]) -> ChatResult | None:
        """The entry of the first key that has one, in the keys' order."""

    async def put(self, key: str, result: ChatResult) -> None: ...


class SQLCache:
    def __init__(self, engine: Engine, ttl_s: float) -> None:
        self.engine = engine
        self.ttl = timedelta(seconds=ttl_s)
        self.purged = 0.0

    async def first(self, keys: list[str]) -> ChatResult | None:
        return await asyncio.to_thread(self._first, keys)

    def _first(self, keys: list[str]) -> ChatResult | None:
        now = datetime.now(UTC)
        with Session(self.engine) as db:
            rows = db.exec(
                select(LLMCacheEntry).where(
                    col(LLMCacheEntry.key).in_(keys), col(LLMCacheEntry.expires_at) > now
                )
            ).all()
        found = {row.key: row.result for row in rows}
        hit = next((found[k] for k in keys if k in found), None)
        return None if hit is None else ChatResult.model_validate_json(hit)

    async def put(self, key: str, result: ChatResult) -> None:
        await asyncio.to_thread(self._put, key, result)

    def _put(self, key: str, result: ChatResult) -> None:
        now = datetime.now(UTC)
        with Session(self.engine) as db:
            if time.monotonic() - self.purged > PURGE_EVERY_S:
                self.purged = time.monotonic()
                db.exec(delete(LLMCacheEntry).where(col(LLMCacheEntry.expires_at) <= now))
            db.merge(
                LLMCacheEntry(key=key, result=result.model_dump_json(), expires_at=now + self.ttl)
            )
            # Two processes storing the same answer at once: either copy will do.
            with contextlib.suppress(IntegrityError):
                db.commit()


class RedisCache:
    def __init__(self, url: str, ttl_s: float) -> None:
        from redis.asyncio import Redis

        self.redis = Redis.from_url(url)
        self.ttl_ms = max(1, int(ttl_s * 1000))

    async def first(self, keys: list[str]) -> ChatResult | None:
        values = await self.redis.mget([REDIS_PREFIX + k for k in keys])
        hit = next((v for v in values if v is not None), None)
        return None if hit is None else ChatResult.model_validate_json(hit)

    async def put(self, key: str, result: ChatResult) -> None:
        await self.redis.set(REDIS_PREFIX + key, result.model_dump_json(), px=self.ttl_ms)


def make_cache(settings: Settings, engine: Engine) -> ResponseCache:
    if settings.redis_url:
        return RedisCache(settings.redis_url, settings.llm_cache_ttl_s)
    return SQLCache(engine, settings.llm_cache_ttl_s)
