"""LLMProxy: every LLM call of Berth goes through it (the planner's, and users' own tools'
through ``POST /v1/chat/completions``).

A call first takes an in-flight reservation (counted by every process at once), then is
checked against the user's concurrency and rate limits, the task's token budget and the cap on
``max_tokens``; it is answered from
the cache when it is deterministic (temperature 0, or asked for), else sent to the
providers in order: a provider's transient errors (timeouts, 429, 5xx) are retried with a
doubling backoff, then the next provider is tried; one that failed is cooled down (tried
after the others) for a while. Every answer is recorded for accounting.

Streaming: a provider counts as answering once its first chunk came; until then failures
fall back as above. A failure after it ends the stream with an error (the client already
has part of an answer, and another model would not continue it). A streamed answer is
cached only once complete; a hit is replayed as a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from langchain_core.messages import AIMessageChunk, convert_to_messages
from sqlalchemy import Connection, Engine

from config.settings import Settings
from llm.accounting import Ledger, cost_usd
from llm.cache import RedisCache, SQLCache, cache_key, make_cache
from llm.models import (
    AllProvidersFailed,
    Caller,
    ChatRequest,
    ChatResult,
    InvalidRequest,
    LLMError,
    NoProvider,
)
from llm.providers import (
    Answer,
    Provider,
    answer_of,
    chat_model,
    describe,
    is_refusal,
    is_transient,
    model_names,
    provider_configs,
    usage_of,
)
from llm.shapes import Chunks
from llm.tokens import count_messages, prompt_budget
from telemetry.metrics import MODEL_ERRORS

T = TypeVar("T")

# The model name that means "the providers in their configured order".
DEFAULT_MODEL = "berth"
NO_PROVIDER = (
    "no LLM provider is configured: set BERTH_LLM_PROVIDERS, or BERTH_LLM_MODEL with "
    "OPENAI_API_KEY / OPENAI_BASE_URL or ANTHROPIC_API_KEY"
)


class LLMProxy:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.providers = [
            Provider(config, chat_model(config, settings.llm_timeout_s))
            for config in provider_configs(settings)
        ]
        self.cache = make_cache(settings)
        self.ledger = Ledger(settings)
        # Provider name → when its cool-down ends (time.monotonic). Per process, on purpose:
        # it is a hint about where to start, not shared state.
        self.cooling: dict[str, float] = {}

    @property
    def configured(self) -> bool:
        return bool(self.providers)

    def prompt_budget(self) -> int:
        """The most prompt tokens a call should carry: what the smallest context window
        among the providers (any may answer it) leaves besides the reply."""
        return min(prompt_budget(p.config) for p in self.providers)

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """The prompt tokens of ``messages`` as the provider that counts most counts them."""
        return max(count_messages(p.config, messages) for p in self.providers)

    def models(self) -> list[str]:
        """What a request's ``model`` may name: ``berth`` (every provider, in order), or
        one provider's model or name."""
        names = model_names([provider.config for provider in self.providers])
        return [DEFAULT_MODEL, *(n for n in names if n != DEFAULT_MODEL)] if names else []

    async def complete(
        self,
        request: ChatRequest,
        caller: Caller,
        *,
        cache: bool | None = None,
        keep: Callable[[ChatResult], bool] | None = None,
        prefer: str | None = None,
    ) -> ChatResult:
        """The answer to a request; ``cache`` None means cache it if deterministic, False
        means neither read nor write the cache, True caches it whatever its temperature.
        An answer ``keep`` refuses (one its caller cannot use) is never cached. ``prefer``
        (a provider's name or model) is tried first, the others after it; one no provider
        answers to is ignored (the configuration may have changed since it was chosen)."""
        started = time.perf_counter()
        providers, keys = self._prepare(request, caller, cache, prefer)
        hit, reservation = await self._open(caller, keys, started)
        if hit is not None:
            return hit
        try:
            provider, answer = await self._first_to_answer(providers, lambda p: p.invoke(request))
        except BaseException:
            await self._release(reservation)
            raise
        result = self._result(provider, answer)
        key = keys.get(provider.name) if keep is None or keep(result) else None
        await self._close(caller, result, key, started, reservation)
        return result

    async def stream(
        self, request: ChatRequest, caller: Caller, *, cache: bool | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The answer as OpenAI ``chat.completion.chunk`` dicts, the last one with usage."""
        started = time.perf_counter()
        providers, keys = self._prepare(request, caller, cache)
        hit, reservation = await self._open(caller, keys, started)
        if hit is not None:
            for chunk in Chunks(hit.model).replay(hit):
                yield chunk
            return
        answer = self._stream_answer(request, caller, providers, keys, started, reservation)
        try:
            # Closed with this stream: a client gone stops the provider's answer at once.
            async with contextlib.aclosing(answer):
                async for chunk in answer:
                    yield chunk
        except BaseException:
            # Failed, or the client went away: the call is no longer in flight.
            await self._release(reservation)
            raise

    async def _stream_answer(
        self,
        request: ChatRequest,
        caller: Caller,
        providers: list[Provider],
        keys: dict[str, str],
        started: float,
        reservation: int,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A provider's answer as chunks, then recorded (and its reservation released)."""

        async def opened(
            provider: Provider,
        ) -> tuple[AsyncGenerator[AIMessageChunk, None], AIMessageChunk]:
            pieces = provider.astream(request)
            try:
                return pieces, await anext(pieces)
            except BaseException:
                await pieces.aclose()
                raise

        provider, (pieces, first) = await self._first_to_answer(providers, opened)
        chunks = Chunks(provider.config.model)
        whole: AIMessageChunk | None = None
        recorded = False
        try:
            async with contextlib.aclosing(pieces):
                try:
                    piece: AIMessageChunk | None = first
                    while piece is not None:
                        whole = piece if whole is None else whole + piece
                        delta = chunks.delta(piece, first=piece is first)
                        if delta:
                            yield chunks.chunk(delta)
                        piece = await anext(pieces, None)
                    answer = answer_of(whole or AIMessageChunk(content=""))
                    if answer.finish_reason is None:
                        # A dropped connection can end an event stream early without an error.
                        raise ConnectionError("the stream ended before the answer did")
                except Exception as exc:
                    self._cool(provider)
                    raise LLMError(
                        f"{provider.name} ({provider.config.model}) failed mid-answer: "
                        f"{describe(exc)}"
                    ) from exc
            result = self._result(provider, answer)
            # Recorded before the last chunks go out: a client that leaves as soon as it has
            # the answer has still had it.
            await self._close(caller, result, keys.get(provider.name), started, reservation)
            recorded = True
            yield chunks.chunk({}, result.finish_reason)
            yield chunks.chunk({}, usage=result.usage)
        except (GeneratorExit, asyncio.CancelledError):
            if not recorded:
                # The client went away mid-answer: what it was sent is charged at the most one
                # call may cost, since the provider's count never arrived.
                dropped = self._dropped(provider, whole)
                await asyncio.shield(self._close(caller, dropped, None, started, reservation))
            raise

    # ---- the steps of a call

    def _prepare(
        self, request: ChatRequest, caller: Caller, cache: bool | None, prefer: str | None = None
    ) -> tuple[list[Provider], dict[str, str]]:
        """The providers to try, in order, and the cache key for each (none when the
        request is not to be cached)."""
        providers = self._route(request, prefer)
        if cache is False or (cache is None and request.temperature != 0):
            return providers, {}
        # Each user's answers are their own unless the operator shares them: a hit would
        # tell one user what another asked.
        scope = "" if self.settings.llm_cache_shared else caller.user_id
        return providers, {p.name: cache_key(p, request, scope) for p in providers}

    async def _open(
        self, caller: Caller, keys: dict[str, str], started: float
    ) -> tuple[ChatResult | None, int]:
        """Reserves the call's place in flight and refuses it past a limit; else the cached
        answer, if any, recorded (its reservation released at once): in one database
        transaction (after one Redis read when the cache is there). With the reservation."""
        found = None
        if keys and isinstance(self.cache, RedisCache):
            found = await self.cache.first(list(keys.values()))

        def check_and_look_up(conn: Connection) -> tuple[ChatResult | None, int]:
            reservation = self.ledger.open(conn, caller)
            entry = found
            if entry is None and keys and isinstance(self.cache, SQLCache):
                entry = self.cache.first(conn, list(keys.values()))
            if entry is None:
                return None, reservation
            hit = as_hit(entry)
            self.ledger.record(conn, caller, hit, time.perf_counter() - started)
            self.ledger.release(conn, reservation)
            return hit, reservation

        return await self._in_database(check_and_look_up)

    async def _close(
        self, caller: Caller, result: ChatResult, key: str | None, started: float, reservation: int
    ) -> None:
        """Caches a provider's answer (when it is to be), records the call and releases its
        reservation."""
        if key and isinstance(self.cache, RedisCache):
            await self.cache.put(key, result)
        latency = time.perf_counter() - started

        def store_and_record(conn: Connection) -> None:
            if key and isinstance(self.cache, SQLCache):
                self.cache.put(conn, key, result)
            self.ledger.record(conn, caller, result, latency)
            self.ledger.release(conn, reservation)

        await self._in_database(store_and_record)

    async def _release(self, reservation: int) -> None:
        """Ends a call's reservation; shielded, so a cancelled call still gives it back."""
        await asyncio.shield(self._in_database(lambda conn: self.ledger.release(conn, reservation)))

    async def _in_database(self, work: Callable[[Connection], T]) -> T:
        def transaction() -> T:
            with self.engine.begin() as conn:
                return work(conn)

        return await asyncio.to_thread(transaction)

    def _route(self, request: ChatRequest, prefer: str | None) -> list[Provider]:
        if not self.providers:
            raise NoProvider(NO_PROVIDER)
        if not request.messages:
            raise InvalidRequest("messages: at least one message is needed")
        cap = self.settings.llm_max_tokens
        asked = {
            "max_tokens": request.max_tokens,
            "max_completion_tokens": (request.model_extra or {}).get("max_completion_tokens"),
        }
        for name, value in asked.items():
            if isinstance(value, int) and value > cap:
                raise InvalidRequest(
                    f"{name}: at most {cap} tokens on this server (BERTH_LLM_MAX_TOKENS), "
                    f"not {value}"
                )
        try:
            # A malformed message is the caller's error, not every provider's failure.
            convert_to_messages(request.messages)
        except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
            raise InvalidRequest(f"messages: {str(exc)[:300]}") from None
        chosen = self.providers
        if request.model not in (None, "", DEFAULT_MODEL):
            chosen = [p for p in self.providers if request.model in (p.name, p.config.model)]
            if not chosen:
                raise InvalidRequest(
                    f"unknown model {request.model!r}; the models are {', '.join(self.models())}"
                )
        if prefer:
            chosen = sorted(chosen, key=lambda p: prefer not in (p.name, p.config.model))
        now = time.monotonic()
        # Stable: the preferred provider stays first unless it is cooling down.
        return sorted(chosen, key=lambda p: self.cooling.get(p.name, 0.0) > now)

    async def _first_to_answer(
        self, providers: list[Provider], call: Callable[[Provider], Awaitable[T]]
    ) -> tuple[Provider, T]:
        """The first provider, in order, whose call succeeds, with what it returned."""
        failures: list[str] = []
        refused = True  # every provider refused the request as malformed
        for provider in providers:
            for attempt in range(self.settings.llm_retries + 1):
                if attempt:
                    await asyncio.sleep(self.settings.llm_backoff_s * 2 ** (attempt - 1))
                try:
                    async with asyncio.timeout(self.settings.llm_timeout_s):
                        value = await call(provider)
                except Exception as exc:
                    if is_transient(exc) and attempt < self.settings.llm_retries:
                        continue
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    failures.append(
                        f"{provider.name} ({provider.config.model}){tries}: {describe(exc)}"
                    )
                    refused = refused and is_refusal(exc)
                    if not is_refusal(exc):  # the request's fault, not the provider's
                        MODEL_ERRORS.labels(provider.name).inc()
                        self._cool(provider)
                    break
                self.cooling.pop(provider.name, None)
                return provider, value
        error = InvalidRequest if refused else AllProvidersFailed
        raise error("every LLM provider failed: " + "; ".join(failures))

    def _cool(self, provider: Provider) -> None:
        self.cooling[provider.name] = time.monotonic() + self.settings.llm_cooldown_s

    def _dropped(self, provider: Provider, whole: AIMessageChunk | None) -> ChatResult:
        """A streamed answer its client left before the end, charged at the most a call
        may cost (its true usage comes only with the last chunk)."""
        answer = answer_of(whole or AIMessageChunk(content=""))
        most = self.ledger.most_per_call_usd()
        usage = usage_of(answer, max(most, self._result(provider, answer).usage.cost_usd))
        return ChatResult(
            message=answer.message,
            finish_reason="client_closed",
            provider=provider.name,
            model=provider.config.model,
            usage=usage,
        )

    def _result(self, provider: Provider, answer: Answer) -> ChatResult:
        model = provider.config.model
        cost = cost_usd(self.settings, model, answer.prompt_tokens, answer.completion_tokens)
        return ChatResult(
            message=answer.message,
            finish_reason=answer.finish_reason,
            provider=provider.name,
            model=model,
            usage=usage_of(answer, cost),
        )


def as_hit(entry: ChatResult) -> ChatResult:
    # A hit costs nothing; the tokens say how big the answer is.
    usage = entry.usage.model_copy(update={"cost_usd": 0.0})
    return entry.model_copy(update={"cached": True, "usage": usage})
