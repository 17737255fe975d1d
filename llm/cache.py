"""The response cache: shared by every API and worker process, in the app's database by
default or in Redis when ``BERTH_REDIS_URL`` is set. Entries expire after a TTL.

A key is a hash of everything that shapes an answer: the provider (kind, URL, model), every
generation parameter, the tools and tool choice, and the messages.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from config.settings import Settings
from llm.models import ChatRequest, ChatResult
from llm.providers import Provider
from store.models import LLMCacheEntry

# Expired rows are deleted by a writer at most this often (per process).
PURGE_EVERY_S = 60.0
REDIS_PREFIX = "berth:llm:"
ENTRIES: Table = LLMCacheEntry.__table__  # type: ignore[attr-defined]


def cache_key(provider: Provider, request: ChatRequest, scope: str) -> str:
    """The key of an answer: the provider, every parameter, the messages, and whose it is
    (``scope``: a user's id, or empty when answers are shared by every user)."""
    shape: dict[str, Any] = {
        "scope": scope,
        "provider": provider.identity(),
        "params": provider.params(request),
        "tools": request.tools,
        "tool_choice": request.tool_choice,
        "messages": request.messages,
    }
    text = json.dumps(shape, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class SQLCache:
    """Entries in the app's database, read and written on the proxy's connection."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl = timedelta(seconds=ttl_s)
        self.purged = 0.0

    def first(self, conn: Connection, keys: list[str]) -> ChatResult | None:
        """The entry of the first key that has one, in the keys' order."""
        rows = conn.execute(
            select(ENTRIES.c.key, ENTRIES.c.result).where(
                ENTRIES.c.key.in_(keys), ENTRIES.c.expires_at > datetime.now(UTC)
            )
        ).all()
        found = {key: result for key, result in rows}
        hit = next((found[k] for k in keys if k in found), None)
        return None if hit is None else ChatResult.model_validate_json(hit)

    def put(self, conn: Connection, key: str, result: ChatResult) -> None:
        now = datetime.now(UTC)
        if time.monotonic() - self.purged > PURGE_EVERY_S:
            self.purged = time.monotonic()
            conn.execute(delete(ENTRIES).where(ENTRIES.c.expires_at <= now))
        values = {"result": result.model_dump_json(), "expires_at": now + self.ttl}
        # An upsert: two processes may store the same answer at once.
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        upsert = dialect.insert(ENTRIES).values(key=key, **values)
        conn.execute(upsert.on_conflict_do_update(index_elements=["key"], set_=values))


class RedisCache:
    """Entries in Redis, which expires them itself."""

    def __init__(self, url: str, ttl_s: float) -> None:
        from redis.asyncio import Redis

        self.redis = Redis.from_url(url)
        self.ttl_ms = max(1, int(ttl_s * 1000))

    async def first(self, keys: list[str]) -> ChatResult | None:
        """The entry of the first key that has one, in the keys' order."""
        values = await self.redis.mget([REDIS_PREFIX + k for k in keys])
        hit = next((v for v in values if v is not None), None)
        return None if hit is None else ChatResult.model_validate_json(hit)

    async def put(self, key: str, result: ChatResult) -> None:
        await self.redis.set(REDIS_PREFIX + key, result.model_dump_json(), px=self.ttl_ms)


def make_cache(settings: Settings) -> SQLCache | RedisCache:
    if settings.redis_url:
        return RedisCache(settings.redis_url, settings.llm_cache_ttl_s)
    return SQLCache(settings.llm_cache_ttl_s)
