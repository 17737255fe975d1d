"""The LLM proxy in process, against scripted OpenAI- and Anthropic-shaped servers on
loopback: fallback, cool-down, the cache (streaming too), tool calls, accounting, limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Engine
from sqlmodel import Session, select

from config.settings import LLMProvider, Settings
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
)
from llm.proxy import LLMProxy
from store.models import LLMCall, LLMReservation
from tests.support.scripted_llm import Reply, ScriptedLLM

USER = Caller(user_id="u1", session_id="s1", task_id="t1")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "run",
            "description": "Run a shell command",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
            },
        },
    }
]


def provider(server: ScriptedLLM, name: str, kind: str = "openai") -> LLMProvider:
    base = f"{server.url}/v1" if kind == "openai" else server.url
    return LLMProvider(name=name, kind=kind, model=f"{name}-model", base_url=base, api_key="k")


def proxy_for(engine: Engine, *providers: LLMProvider, **settings: Any) -> LLMProxy:
    defaults: dict[str, Any] = {"llm_backoff_s": 0.01, "llm_retries": 1}
    return LLMProxy(Settings(llm_providers=list(providers), **defaults | settings), engine)


def ask(text: str, **fields: Any) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **{"temperature": 0} | fields)


@pytest.fixture
def up() -> Iterator[ScriptedLLM]:
    with ScriptedLLM(default="fine, thanks") as server:
        yield server


async def test_a_failing_provider_falls_back_and_is_cooled_down(engine: Engine) -> None:
    with ScriptedLLM(default=Reply(status=500)) as down, ScriptedLLM(default="ok") as backup:
        proxy = proxy_for(engine, provider(down, "main"), provider(backup, "backup"))
        result = await proxy.complete(ask("hi", temperature=0.5), USER)
        assert (result.provider, result.model, result.message["content"]) == (
            "backup",
            "backup-model",
            "ok",
        )
        assert len(down.requests) == 2  # a try and a retry
        # Cooling down: the next request goes to the backup first and never reaches main.
        await proxy.complete(ask("again", temperature=0.5), USER)
        assert len(down.requests) == 2 and len(backup.requests) == 2


async def test_a_provider_that_hangs_is_timed_out_and_the_next_answers(engine: Engine) -> None:
    with ScriptedLLM(default=Reply(hang_s=5)) as stuck, ScriptedLLM(default="ok") as backup:
        proxy = proxy_for(
            engine, provider(stuck, "main"), provider(backup, "backup"), llm_timeout_s=0.3
        )
        result = await proxy.complete(ask("hi"), USER)
        assert result.provider == "backup" and len(stuck.requests) == 2


async def test_when_all_fail_the_error_names_every_provider_and_why(engine: Engine) -> None:
    with (
        ScriptedLLM(default=Reply(status=429)) as busy,
        ScriptedLLM(default=Reply(status=502)) as bad,
    ):
        proxy = proxy_for(engine, provider(busy, "a"), provider(bad, "b"), llm_retries=2)
        with pytest.raises(AllProvidersFailed) as caught:
            await proxy.complete(ask("hi"), USER)
    text = str(caught.value)
    assert "a (a-model) after 3 tries" in text and "429" in text
    assert "b (b-model) after 3 tries" in text and "502" in text
    assert len(busy.requests) == len(bad.requests) == 3


async def test_a_request_every_provider_refuses_is_a_bad_request(engine: Engine) -> None:
    with ScriptedLLM(default=Reply(status=400)) as strict:
        proxy = proxy_for(engine, provider(strict, "a"))
        with pytest.raises(InvalidRequest, match="400"):
            await proxy.complete(ask("hi"), USER)
        assert len(strict.requests) == 1  # a refusal is not retried
        with pytest.raises(InvalidRequest, match="unknown model 'gpt-9'"):
            await proxy.complete(ask("hi", model="gpt-9"), USER)
    with pytest.raises(NoProvider):
        await proxy_for(engine).complete(ask("hi"), USER)


async def test_deterministic_requests_are_cached_and_others_are_not(
    engine: Engine, up: ScriptedLLM
) -> None:
    proxy = proxy_for(engine, provider(up, "main"))
    first = await proxy.complete(ask("what time is it?"), USER)
    second = await proxy.complete(ask("what time is it?"), USER)
    assert not first.cached and second.cached and len(up.requests) == 1
    assert second.message == first.message and second.usage.total_tokens == 15
    # Any difference in the request is another entry: a parameter, the tools, a message.
    for other in (
        ask("what time is it?", max_tokens=5),
        ask("what time is it?", tools=TOOLS),
        ask("what time is it?", top_p=0.5),
        ask("what time is it now?"),
    ):
        assert not (await proxy.complete(other, USER)).cached
    assert len(up.requests) == 5
    # Bypassed on request; a warm request is not cached unless asked.
    assert not (await proxy.complete(ask("what time is it?"), USER, cache=False)).cached
    warm = ask("a poem", temperature=0.9)
    assert not (await proxy.complete(warm, USER)).cached
    assert not (await proxy.complete(warm, USER)).cached
    assert not (await proxy.complete(warm, USER, cache=True)).cached
    assert (await proxy.complete(warm, USER, cache=True)).cached
    assert len(up.requests) == 9


async def test_each_users_answers_are_their_own_unless_shared(
    engine: Engine, up: ScriptedLLM
) -> None:
    request, other = ask("is my password hunter2?"), Caller(user_id="another user")
    own = proxy_for(engine, provider(up, "own"))
    assert not (await own.complete(request, USER)).cached
    # Another user's identical request is not answered from the first one's cache: a hit
    # would tell them what the first asked.
    assert not (await own.complete(request, other)).cached
    assert (await own.complete(request, other)).cached and len(up.requests) == 2
    shared = proxy_for(engine, provider(up, "shared"), llm_cache_shared=True)
    await shared.complete(request, USER)
    assert (await shared.complete(request, other)).cached and len(up.requests) == 3


async def collect(proxy: LLMProxy, request: ChatRequest) -> tuple[str, list[dict[str, Any]]]:
    chunks = [c async for c in proxy.stream(request, USER)]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


async def test_a_stream_is_cached_once_complete_and_replayed_as_a_stream(engine: Engine) -> None:
    with ScriptedLLM(default="the quick brown fox") as server:
        proxy = proxy_for(engine, provider(server, "main"))
        text, chunks = await collect(proxy, ask("a fox?", stream=True))
        assert text == "the quick brown fox" and len(chunks) > 4
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["total_tokens"] == 15
        assert len({c["id"] for c in chunks}) == 1
        assert server.requests[0]["body"]["stream_options"] == {"include_usage": True}

        again, replayed = await collect(proxy, ask("a fox?", stream=True))
        assert again == text and replayed[-1]["usage"]["total_tokens"] == 15
        assert (await proxy.complete(ask("a fox?"), USER)).cached  # one entry for both
        assert len(server.requests) == 1


async def test_a_stream_cut_mid_answer_is_an_error_and_never_cached(engine: Engine) -> None:
    with ScriptedLLM(Reply("one two three four", cut_after=3), default="whole") as server:
        proxy = proxy_for(engine, provider(server, "main"))
        with pytest.raises(LLMError, match="failed mid-answer"):
            await collect(proxy, ask("count", stream=True))
        text, _ = await collect(proxy, ask("count", stream=True))
        assert text == "whole" and len(server.requests) == 2


async def test_a_stream_falls_back_before_its_first_chunk(engine: Engine) -> None:
    with ScriptedLLM(default=Reply(status=503)) as down, ScriptedLLM(default="here") as backup:
        proxy = proxy_for(engine, provider(down, "main"), provider(backup, "backup"))
        text, chunks = await collect(proxy, ask("hi", stream=True))
        assert text == "here" and chunks[0]["model"] == "backup-model"


async def test_tool_calls_round_trip_in_the_openai_shape(engine: Engine) -> None:
    call = {"id": "call_1", "name": "run", "arguments": json.dumps({"command": "ls -la"})}
    with ScriptedLLM(default=Reply(tool_calls=[call])) as server:
        proxy = proxy_for(engine, provider(server, "main"))
        history = [
            {"role": "user", "content": "list files"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": "run", "arguments": '{"command": "pwd"}'}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "/root"},
        ]  # fmt: skip
        request = ChatRequest(messages=history, tools=TOOLS, tool_choice="required")
        result = await proxy.complete(request, USER)
        assert result.finish_reason == "tool_calls"
        (made,) = result.message["tool_calls"]
        assert made["id"] == "call_1" and made["function"]["name"] == "run"
        assert json.loads(made["function"]["arguments"]) == {"command": "ls -la"}
        sent = server.requests[0]["body"]
        assert sent["tools"][0]["function"]["name"] == "run" and sent["tool_choice"] == "required"
        assert sent["messages"][1]["tool_calls"][0]["id"] == "call_0"
        assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_0", "content": "/root"}

        chunks = [c async for c in proxy.stream(request.model_copy(update={"stream": True}), USER)]
        pieces = [
            d
            for c in chunks
            if c["choices"]
            for d in c["choices"][0]["delta"].get("tool_calls", [])
        ]
        assert pieces[0]["id"] == "call_1" and pieces[0]["function"]["name"] == "run"
        arguments = "".join(p["function"].get("arguments", "") for p in pieces)
        assert json.loads(arguments) == {"command": "ls -la"}


async def test_the_anthropic_path(engine: Engine) -> None:
    call = {"id": "toolu_1", "name": "run", "arguments": json.dumps({"command": "df -h"})}
    replies = [Reply("hello from claude"), Reply(tool_calls=[call]), Reply("streamed words here")]
    with ScriptedLLM(*replies) as server:
        proxy = proxy_for(engine, provider(server, "claude", kind="anthropic"))
        result = await proxy.complete(ask("hi", max_tokens=100), USER)
        assert result.message == {"role": "assistant", "content": "hello from claude"}
        assert result.finish_reason == "stop" and result.usage.total_tokens == 15
        sent = server.requests[0]
        assert sent["path"] == "/v1/messages" and sent["auth"].removeprefix("Bearer ") == "k"
        assert sent["body"]["max_tokens"] == 100 and sent["body"]["model"] == "claude-model"

        tooled = await proxy.complete(ask("disk?", tools=TOOLS, tool_choice="required"), USER)
        assert tooled.finish_reason == "tool_calls"
        assert tooled.message["tool_calls"][0]["function"]["name"] == "run"
        body = server.requests[1]["body"]
        assert body["tools"][0]["name"] == "run" and body["tool_choice"]["type"] == "any"

        text, chunks = await collect(proxy, ask("stream", stream=True))
        assert text == "streamed words here" and chunks[-1]["usage"]["total_tokens"] == 15


@pytest.fixture(params=["database", "redis"])
def cache_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "database":
        return {}
    try:
        redis.Redis(host="127.0.0.1", port=6379).ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return {"redis_url": "redis://127.0.0.1:6379/0"}


async def test_the_cache_is_shared_by_every_process(
    engine: Engine, cache_settings: dict[str, Any]
) -> None:
    unique = uuid.uuid4().hex  # the Redis may hold other runs' entries
    with ScriptedLLM(default="shared") as server:
        one = proxy_for(engine, provider(server, "main"), **cache_settings)
        other = proxy_for(engine, provider(server, "main"), **cache_settings)
        assert not (await one.complete(ask(unique), USER)).cached
        assert (await other.complete(ask(unique), USER)).cached
        assert len(server.requests) == 1
        expired = proxy_for(
            engine, provider(server, "main"), llm_cache_ttl_s=0.05, **cache_settings
        )
        await expired.complete(ask(unique + "!"), USER)
        await asyncio.sleep(0.1)  # past the TTL
        assert not (await expired.complete(ask(unique + "!"), USER)).cached


async def test_accounting_adds_up_per_user_session_and_task(engine: Engine) -> None:
    replies = [Reply("a", prompt_tokens=100, completion_tokens=20),
               Reply("b", prompt_tokens=1000, completion_tokens=300)]  # fmt: skip
    with ScriptedLLM(*replies) as server:
        prices = {"main-model": (2.0, 10.0)}  # USD per million tokens in, out
        proxy = proxy_for(engine, provider(server, "main"), llm_prices=prices)
        me = Caller(user_id="acct", session_id="s1", task_id="t1")
        first = await proxy.complete(ask("one"), me)
        assert first.usage.cost_usd == pytest.approx((100 * 2 + 20 * 10) / 1e6)
        await proxy.complete(ask("two"), me.model_copy(update={"task_id": "t2"}))
        hit = await proxy.complete(ask("one"), me)
        assert hit.cached and hit.usage.cost_usd == 0
    with Session(engine) as db:
        usage = user_usage(db, "acct")
    assert (usage.total.calls, usage.total.cached_calls) == (3, 1)
    assert (usage.total.prompt_tokens, usage.total.completion_tokens) == (1100, 320)
    assert usage.total.cost_usd == pytest.approx((1100 * 2 + 320 * 10) / 1e6)
    (session,) = usage.sessions
    assert session.session_id == "s1" and session.total_tokens == 1420
    by_task = {t.task_id: t for t in usage.tasks}
    assert by_task["t1"].total_tokens == 120 and by_task["t1"].calls == 2
    assert by_task["t2"].total_tokens == 1300


async def test_the_rate_limit_and_the_task_budget_refuse(engine: Engine, up: ScriptedLLM) -> None:
    proxy = proxy_for(engine, provider(up, "main"), llm_rate_limit_per_minute=2)
    limited = Caller(user_id="busy")
    await proxy.complete(ask("1"), limited)
    await proxy.complete(ask("2"), limited)
    with pytest.raises(RateLimited, match="2 LLM requests a minute"):
        await proxy.complete(ask("3"), limited)
    await proxy.complete(ask("3"), Caller(user_id="someone else"))

    proxy = proxy_for(engine, provider(up, "main"), llm_task_token_budget=20)
    task = Caller(user_id="thrifty", task_id="budget-task")
    await proxy.complete(ask("x"), task)  # 15 tokens
    await proxy.complete(ask("y"), task)  # 30: over budget from now on
    with pytest.raises(BudgetExceeded, match="spent 30 tokens, its budget is 20"):
        await proxy.complete(ask("z"), task)
    assert len(up.requests) == 5


async def test_each_call_reserves_its_place_before_it_runs(engine: Engine) -> None:
    """Counted once answered, 500 concurrent calls all passed the limits."""
    with ScriptedLLM(default=Reply("ok", hang_s=0.5)) as slow:
        proxy = proxy_for(
            engine, provider(slow, "main"), llm_max_concurrent_per_user=3,
            llm_rate_limit_per_minute=0,
        )  # fmt: skip
        crowd = Caller(user_id="crowd")
        calls = [proxy.complete(ask(f"{i}", temperature=1), crowd) for i in range(40)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, RateLimited)]
        assert len(refused) == 37 and refused[0].retry_after_s > 0
        assert "3 LLM calls in flight at once per user" in str(refused[0])
        await proxy.complete(ask("after", temperature=1), crowd)  # every place given back
        # The rate limit counts calls in flight too.
        proxy = proxy_for(engine, provider(slow, "main"), llm_rate_limit_per_minute=5)
        burst = Caller(user_id="burst")
        outcomes = await asyncio.gather(
            *(proxy.complete(ask(f"{i}", temperature=1), burst) for i in range(20)),
            return_exceptions=True,
        )
        assert sum(not isinstance(o, BaseException) for o in outcomes) == 5
    with ScriptedLLM(default=Reply(status=400)) as refusing:
        # A failed call gives its place back too.
        proxy = proxy_for(engine, provider(refusing, "main"), llm_max_concurrent_per_user=1)
        for _ in range(3):
            with pytest.raises(InvalidRequest):
                await proxy.complete(ask("x", temperature=1), Caller(user_id="unlucky"))
    with Session(engine) as db:
        assert db.exec(select(LLMReservation)).all() == []


async def test_max_tokens_is_capped(engine: Engine, up: ScriptedLLM) -> None:
    proxy = proxy_for(engine, provider(up, "main"), llm_max_tokens=100)
    await proxy.complete(ask("fits", max_tokens=100), USER)
    with pytest.raises(InvalidRequest, match="max_tokens: at most 100 tokens"):
        await proxy.complete(ask("over", max_tokens=101), USER)
    with pytest.raises(InvalidRequest, match="max_completion_tokens: at most 100 tokens"):
        await proxy.complete(ask("over", max_completion_tokens=5000), USER)
    with pytest.raises(InvalidRequest):
        async for _ in proxy.stream(ask("over", max_tokens=101, stream=True), USER):
            pass


@pytest.mark.parametrize("leave_after", ["finish", "first"])
async def test_a_stream_its_client_leaves_is_still_charged(
    engine: Engine, leave_after: str
) -> None:
    # Found by the security review: a client that left before the last chunk was never
    # recorded, so spend budgets and the rate limit could be skipped by closing each stream.
    with ScriptedLLM(default="the quick brown fox jumps over") as server:
        proxy = proxy_for(
            engine,
            provider(server, "main"),
            llm_prices={"main-model": [1_000_000.0, 1_000_000.0]},
            spend_day_usd=1.0,
            llm_rate_limit_per_minute=3,
        )
        answered = 0
        for i in range(5):
            stream = proxy.stream(ask(f"q{i}", stream=True, temperature=0.5), USER)
            try:
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        choices = chunk["choices"]
                        if leave_after == "first" and choices and choices[0]["delta"]:
                            answered += 1
                            break
                        if choices and choices[0].get("finish_reason"):
                            answered += 1
                            break
            except SpendLimited:
                break
        with Session(engine) as db:
            calls = db.exec(select(LLMCall)).all()
            in_flight = db.exec(select(LLMReservation)).all()
    assert answered == 1, "the second call is over the day's budget"
    assert len(calls) == 1 and calls[0].cost_usd >= 1.0
    assert not in_flight
