"""Latency of the LLM proxy: a scripted OpenAI-compatible server called directly, through
the proxy on a cache miss, and answered from the cache; in process and over HTTP.

``make bench-llm`` (``python -m berth bench llm``) runs the scripted server and Berth's API
(``python -m berth api``, SQLite in a fresh data dir) as processes of their own on free ports,
prints a markdown table and writes JSON to ``--out`` (default ``.berth/bench/llm.json``).
"Overhead" rows are the proxy's figure less the direct one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import redis
from langchain_core.messages import HumanMessage

from bench.spine import Metric, machine, table, timed, write_report
from config.settings import LLMProvider, Settings
from llm.models import Caller, ChatRequest
from llm.proxy import LLMProxy
from store.db import get_engine, migrate
from tests.support.local import free_port

N = 300
WARMUP = 30
REPLY = "Sure: ls -la / lists the root directory."
REDIS = "redis://127.0.0.1:6379/0"
# A fresh prompt for every call, so that each is a miss; a fixed one for hits.
Call = Callable[[str], Awaitable[Any]]


async def series(call: Call, fresh: bool) -> list[float]:
    seconds = []
    stamp = time.time_ns()
    for i in range(-WARMUP, N):
        prompt = f"list the root directory ({stamp}-{i})" if fresh else "list the root directory"
        began = time.perf_counter()
        await call(prompt)
        if i >= 0:
            seconds.append(time.perf_counter() - began)
    return seconds


def overhead(name: str, via: Metric, direct: Metric, target_ms: float | None) -> Metric:
    assert via.p50 is not None and via.p95 is not None and direct.p50 is not None
    assert direct.p95 is not None
    p50, p95 = round(via.p50 - direct.p50, 2), round(via.p95 - direct.p95, 2)
    return Metric(name, p50, p95, "ms", target_ms, "p50", via.n)


def ask(prompt: str) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": prompt}], temperature=0)


async def in_process(settings: Settings, data: Path) -> list[Metric]:
    url = f"sqlite:///{data / 'inproc.db'}"
    migrate(url)
    proxy = LLMProxy(settings.model_copy(update={"database_url": url}), get_engine(url))
    caller = Caller(user_id="bench", session_id="s", task_id="t")
    chat = proxy.providers[0].chat

    async def direct(prompt: str) -> Any:
        return await chat.ainvoke([HumanMessage(prompt)], temperature=0)

    async def proxied(prompt: str) -> Any:
        return await proxy.complete(ask(prompt), caller)

    d = timed("in process: LangChain model called directly", await series(direct, True))
    miss = timed("in process: proxy, cache miss", await series(proxied, True))
    hit = timed("in process: proxy, cache hit (database)", await series(proxied, False), 2)
    metrics = [d, miss, overhead("in process: proxy overhead on a miss", miss, d, 3), hit]
    with contextlib.suppress(redis.RedisError):
        redis.Redis.from_url(REDIS).ping()
        cached = LLMProxy(settings.model_copy(update={"redis_url": REDIS}), get_engine(url))

        async def from_redis(prompt: str) -> Any:
            return await cached.complete(ask(prompt), caller)

        metrics.append(
            timed("in process: proxy, cache hit (Redis)", await series(from_redis, False), 2)
        )
    return metrics


async def over_http(llm_url: str, berth_url: str, token: str) -> list[Metric]:
    direct_client = openai.AsyncOpenAI(base_url=f"{llm_url}/v1", api_key="k", max_retries=0)
    berth = openai.AsyncOpenAI(base_url=f"{berth_url}/v1", api_key=token, max_retries=0)

    def caller(client: openai.AsyncOpenAI, model: str) -> Call:
        async def call(prompt: str) -> Any:
            messages: Any = [{"role": "user", "content": prompt}]
            return await client.chat.completions.create(
                model=model, messages=messages, temperature=0
            )

        return call

    d = timed("HTTP: openai client → server", await series(caller(direct_client, "bench"), True))
    miss = timed("HTTP: openai client → Berth, miss", await series(caller(berth, "berth"), True))
    hit = timed("HTTP: openai client → Berth, hit", await series(caller(berth, "berth"), False), 5)
    return [d, miss, overhead("HTTP: Berth's overhead on a miss", miss, d, None), hit]


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        child = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=out)
    try:
        yield child
    finally:
        child.terminate()
        child.wait(30)


def wait_for(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {seconds:.0f} s")


def run(data: Path) -> list[Metric]:
    llm_port, api_port = free_port(), free_port()
    llm_url = f"http://127.0.0.1:{llm_port}"
    provider = LLMProvider(name="local", model="bench", base_url=f"{llm_url}/v1", api_key="k")
    settings = Settings(
        data_dir=data, llm_providers=[provider], llm_rate_limit_per_minute=1_000_000
    )
    env = {
        "BERTH_DATA_DIR": str(data),
        "BERTH_PORT": str(api_port),
        "BERTH_LLM_PROVIDERS": json.dumps([provider.model_dump()]),
        "BERTH_LLM_RATE_LIMIT_PER_MINUTE": "1000000",
        "BERTH_TEMPORAL_ADDRESS": "127.0.0.1:1",  # not needed here, never reached
    }
    server = [sys.executable, "-m", "tests.support.scripted_llm", str(llm_port), REPLY]
    with (
        process(server, {}, data / "scripted.log"),
        process([sys.executable, "-m", "berth", "api"], env, data / "api.log"),
    ):
        wait_for(lambda: httpx.get(llm_url).status_code > 0, "the scripted server")
        berth = f"http://127.0.0.1:{api_port}"
        credentials = {"email": "bench@example.com", "password": "a long password"}
        wait_for(
            lambda: httpx.post(f"{berth}/api/auth/signup", json=credentials).status_code == 201,
            "Berth's API",
        )
        token = httpx.post(f"{berth}/api/auth/token", json=credentials).json()["token"]
        metrics = asyncio.run(in_process(settings, data))
        metrics += asyncio.run(over_http(llm_url, berth, token))
    return metrics


def bench(out: Path) -> int:
    """Measure, print the table, write the results to ``out``; 1 if the set-up failed."""
    began, started = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
    info = machine()
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu']}, load {info['load']}; date: {started}",
        flush=True,
    )
    data = Path(tempfile.mkdtemp(prefix="berth-bench-llm-"))
    try:
        metrics = run(data)
    except Exception as exc:
        print(f"bench-llm failed: {exc!r}; logs in {data}", file=sys.stderr)
        return 1
    shutil.rmtree(data, ignore_errors=True)
    duration = time.monotonic() - began
    print(table(metrics))
    write_report(out, metrics, info, started, duration)
    return 0
