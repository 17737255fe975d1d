"""The LLM proxy over HTTP: Berth's API under uvicorn on loopback, the official ``openai``
package as its client with a Berth token as the key, scripted providers behind it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from sqlmodel import Session

from berth.web import create_app
from config.settings import LLMProvider, Settings
from store.db import get_engine
from store.models import SessionRow, TaskRow
from tests.support.local import free_port
from tests.support.scripted_llm import Reply, ScriptedLLM


@contextmanager
def serve_api(settings: Settings) -> Iterator[str]:
    """Berth's API on a free port, in a thread of this process."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def berth_with(tmp_path: Path, *servers: ScriptedLLM, **settings: Any) -> Iterator[tuple[str, str]]:
    """The API with one provider per server, in order; its URL and a new user's token."""
    providers = [
        LLMProvider(name=f"p{i}", model=f"model-{i}", base_url=f"{s.url}/v1", api_key="sk-secret")
        for i, s in enumerate(servers)
    ]
    defaults: dict[str, Any] = {"llm_backoff_s": 0.01, "llm_retries": 0}
    config = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'berth.db'}",
        secret_key="s" * 48,
        llm_providers=providers,
        **defaults | settings,
    )
    with serve_api(config) as base:
        credentials = {"email": "llm@example.com", "password": "correct horse"}
        assert httpx.post(f"{base}/api/auth/signup", json=credentials).status_code == 201
        yield base, httpx.post(f"{base}/api/auth/token", json=credentials).json()["token"]


def client(base: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0)


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_the_openai_client_works_with_a_berth_token(tmp_path: Path) -> None:
    with (
        ScriptedLLM(default=Reply(status=500)) as down,
        ScriptedLLM(default="hello from the backup") as backup,
        berth_with(tmp_path, down, backup) as (base, token),
    ):
        llm = client(base, token)
        assert [m.id for m in llm.models.list()] == ["berth", "model-0", "p0", "model-1", "p1"]

        raw = llm.chat.completions.with_raw_response.create(
            model="berth", messages=ask("hi"), temperature=0
        )
        reply = raw.parse()
        assert reply.choices[0].message.content == "hello from the backup"
        assert reply.model == "model-1" and reply.usage and reply.usage.total_tokens == 15
        assert raw.headers["x-berth-provider"] == "p1" and raw.headers["x-berth-cache"] == "miss"
        # The provider's key stays in Berth: the provider sees it, the client never does.
        assert backup.requests[0]["auth"] == "Bearer sk-secret"
        assert "sk-secret" not in raw.http_response.text

        again = llm.chat.completions.with_raw_response.create(
            model="berth", messages=ask("hi"), temperature=0
        )
        assert again.headers["x-berth-cache"] == "hit"
        assert again.parse().choices[0].message.content == "hello from the backup"

        stream = llm.chat.completions.create(
            model="berth", messages=ask("stream it"), temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "hello from the backup"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15
        served = len(backup.requests)
        replay = llm.chat.completions.create(
            model="berth", messages=ask("stream it"), temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in replay if c.choices)
        assert text == "hello from the backup" and len(backup.requests) == served

        # Bypassing the cache on request, by header or in the body.
        llm.chat.completions.create(
            model="berth", messages=ask("hi"), temperature=0, extra_body={"cache": False}
        )
        bypassed = llm.chat.completions.with_raw_response.create(
            model="berth", messages=ask("hi"), temperature=0,
            extra_headers={"Cache-Control": "no-cache"},
        )  # fmt: skip
        assert bypassed.headers["x-berth-cache"] == "miss" and len(backup.requests) == served + 2

        with pytest.raises(openai.AuthenticationError):
            client(base, "not-a-token").chat.completions.create(model="berth", messages=ask("x"))


def test_tool_calls_round_trip_through_the_endpoint(tmp_path: Path) -> None:
    call = {"id": "call_9", "name": "run", "arguments": '{"command": "uname -a"}'}
    tools: Any = [{"type": "function", "function": {
        "name": "run", "parameters": {"type": "object",
                                      "properties": {"command": {"type": "string"}}}}}]  # fmt: skip
    with (
        ScriptedLLM(default=Reply(tool_calls=[call])) as server,
        berth_with(tmp_path, server) as (base, token),
    ):
        llm = client(base, token)
        reply = llm.chat.completions.create(model="model-0", messages=ask("os?"), tools=tools)
        (made,) = reply.choices[0].message.tool_calls or []
        assert reply.choices[0].finish_reason == "tool_calls"
        assert made.id == "call_9" and made.function.name == "run"  # type: ignore[union-attr]
        assert json.loads(made.function.arguments) == {"command": "uname -a"}  # type: ignore[union-attr]
        assert server.requests[0]["body"]["tools"][0]["function"]["name"] == "run"

        arguments, names = "", []
        for chunk in llm.chat.completions.create(
            model="model-0", messages=ask("os?"), tools=tools, stream=True
        ):
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                names += [delta.function.name] if delta.function and delta.function.name else []
                arguments += (delta.function.arguments or "") if delta.function else ""
        assert names == ["run"] and json.loads(arguments) == {"command": "uname -a"}


def test_refusals_are_http_errors_that_say_why(tmp_path: Path) -> None:
    with (
        ScriptedLLM(default=Reply(status=503)) as first,
        ScriptedLLM(default=Reply(status=500)) as second,
        berth_with(tmp_path, first, second, llm_rate_limit_per_minute=3) as (base, token),
    ):
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{base}/v1/chat/completions"
        bodies: list[dict[str, Any]] = [{"model": "berth"}, {"messages": "hi"}, {"messages": []}]
        for body in bodies:
            bad = httpx.post(url, json=body, headers=headers)
            assert bad.status_code == 400, bad.text
        for raw in (b"not json", b"[1, 2]"):
            assert httpx.post(url, content=raw, headers=headers).status_code == 400
        unknown = httpx.post(url, json={"model": "gpt-9", "messages": ask("x")}, headers=headers)
        assert unknown.status_code == 400 and "unknown model 'gpt-9'" in unknown.text
        assert httpx.post(url, json={"messages": ask("x")}).status_code == 401

        failed = httpx.post(url, json={"messages": ask("x")}, headers=headers)
        assert failed.status_code == 503
        assert "p0 (model-0)" in failed.text and "p1 (model-1)" in failed.text
        streamed = httpx.post(url, json={"messages": ask("x"), "stream": True}, headers=headers)
        assert streamed.status_code == 503 and "p1 (model-1)" in streamed.text

        # Failed calls are not counted; this user's three fit, the fourth is refused.
        first.default = second.default = Reply("ok")
        for i in range(3):
            fine = httpx.post(url, json={"messages": ask(f"{i}")}, headers=headers)
            assert fine.status_code == 200, fine.text
        limited = httpx.post(url, json={"messages": ask("4")}, headers=headers)
        assert limited.status_code == 429 and "3 LLM requests a minute" in limited.text
        assert limited.headers["retry-after"] == "60"
        with pytest.raises(openai.RateLimitError):
            client(base, token).chat.completions.create(model="berth", messages=ask("5"))


def test_a_stream_cut_mid_answer_ends_with_an_error_event(tmp_path: Path) -> None:
    with (
        ScriptedLLM(Reply("one two three four five", cut_after=3), default="whole") as server,
        berth_with(tmp_path, server) as (base, token),
    ):
        llm = client(base, token)
        with pytest.raises(openai.APIError, match="failed mid-answer"):
            for _ in llm.chat.completions.create(
                model="berth", messages=ask("count"), temperature=0, stream=True
            ):
                pass
        again = llm.chat.completions.create(model="berth", messages=ask("count"), temperature=0)
        assert again.choices[0].message.content == "whole" and len(server.requests) == 2


def test_usage_is_visible_per_user_session_and_task(tmp_path: Path) -> None:
    with (
        ScriptedLLM(default=Reply("ok", prompt_tokens=1000, completion_tokens=100)) as server,
        berth_with(
            tmp_path, server, llm_prices={"model-0": (3.0, 15.0)}, llm_task_token_budget=2000
        ) as (base, token),
    ):
        headers = {"Authorization": f"Bearer {token}"}
        me = httpx.get(f"{base}/api/usage", headers=headers).json()
        assert me["total"]["calls"] == 0
        with Session(get_engine(f"sqlite:///{tmp_path / 'berth.db'}")) as db:
            session = SessionRow(user_id=me["user_id"])
            db.add(session)
            db.flush()
            db.add(TaskRow(id="task-1", session_id=session.id, prompt="p"))
            db.commit()
            sid = session.id
        on_task = {**headers, "X-Berth-Session": sid, "X-Berth-Task": "task-1"}
        url = f"{base}/v1/chat/completions"
        for text in ("a", "b"):
            assert httpx.post(url, json={"messages": ask(text)}, headers=on_task).status_code == 200
        over = httpx.post(url, json={"messages": ask("c")}, headers=on_task)
        assert over.status_code == 429 and "budget is 2000" in over.text
        assert httpx.post(url, json={"messages": ask("d")}, headers=headers).status_code == 200
        stranger = {**headers, "X-Berth-Session": "nope"}
        assert httpx.post(url, json={"messages": ask("e")}, headers=stranger).status_code == 404

        usage = httpx.get(f"{base}/api/usage", headers=headers).json()
        assert usage["total"]["calls"] == 3 and usage["total"]["total_tokens"] == 3300
        assert usage["total"]["cost_usd"] == pytest.approx(3 * (1000 * 3 + 100 * 15) / 1e6)
        assert [s["session_id"] for s in usage["sessions"]] == [sid]
        (task,) = usage["tasks"]
        assert task["task_id"] == "task-1" and task["total_tokens"] == 2200
        detail = httpx.get(f"{base}/api/sessions/{sid}/tasks/task-1", headers=headers).json()
        assert detail["llm"]["total_tokens"] == 2200
        assert detail["llm"]["cost_usd"] == pytest.approx(2 * 0.0045)


def test_max_tokens_is_capped_and_concurrent_calls_refused_with_retry_after(
    tmp_path: Path,
) -> None:
    with (
        ScriptedLLM(default=Reply("ok", hang_s=1.0)) as slow,
        berth_with(tmp_path, slow, llm_max_tokens=100, llm_max_concurrent_per_user=2) as (
            base,
            token,
        ),
    ):
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{base}/v1/chat/completions"
        for field in ("max_tokens", "max_completion_tokens"):
            over = httpx.post(url, json={"messages": ask("x"), field: 101}, headers=headers)
            assert over.status_code == 400 and f"{field}: at most 100 tokens" in over.text

        def call(i: int) -> httpx.Response:
            body = {"messages": ask(f"{i}"), "max_tokens": 100, "temperature": 1}
            return httpx.post(url, json=body, headers=headers, timeout=30)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(call, range(6)))
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200, 200, 429, 429, 429, 429], [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 429)
        assert "2 LLM calls in flight" in refused.text
        assert refused.headers["retry-after"] == "2"
        assert call(7).status_code == 200  # the two ended: their places are free again
