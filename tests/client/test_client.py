"""The client's own behaviour at its edge (httpx's MockTransport stands in for the server):
retries and their Idempotency-Key, problems as typed exceptions, the event stream taken up
again from the last event's id. The system tests (test_system.py) run it for real."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from berth_client import Berth, NotFound, ServerError, Unavailable, login
from berth_client.core import SSEReader

SESSION = {
    "id": "s1", "status": "ready", "template": "default", "error": None, "preserved": False,
    "created_at": "2026-01-01T00:00:00Z", "ended_at": None, "events_url": "/api/sessions/s1/events",
}  # fmt: skip
PROBLEM = "application/problem+json"


def problem(status: int, detail: str) -> httpx.Response:
    body = {"type": "about:blank", "title": "x", "status": status, "detail": detail}
    return httpx.Response(status, json=body, headers={"content-type": PROBLEM})


def event(seq: int, kind: str, **data: object) -> bytes:
    body = json.dumps({"seq": seq, "type": kind, "data": data, "at": "2026-01-01T00:00:00Z"})
    return f"id: {seq}\nevent: {kind}\ndata: {body}\n\n".encode()


def test_sse_messages_are_events_and_comments_are_not() -> None:
    reader = SSEReader()
    lines = ["retry: 2000", "", ": keepalive", "", *event(3, "step.output").decode().splitlines()]
    found = [e for e in map(reader.feed, [*lines, ""]) if e is not None]
    assert [(e.seq, e.type) for e in found] == [(3, "step.output")]


def test_a_submission_is_retried_with_the_same_idempotency_key() -> None:
    keys: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/sessions/s1":
            return httpx.Response(200, json=SESSION)
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) == 1:
            return problem(503, "session s1 is not answering")
        return httpx.Response(202, json={"id": "t1", "status": "queued"})

    with Berth("http://berth", "tok", transport=httpx.MockTransport(answer)) as berth:
        task = berth.sessions.get("s1").run("$ true")
    assert task.id == "t1" and len(keys) == 2 and keys[0] == keys[1]


def test_a_call_that_is_not_repeatable_is_not_retried_and_its_problem_is_raised() -> None:
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        if request.method == "POST":
            return problem(503, "the orchestrator is unavailable; try again (error abc)")
        if request.url.path.endswith("/gone"):
            return problem(404, "no session gone")
        return httpx.Response(500, text="<html>proxy error</html>")

    with Berth("http://berth", "tok", transport=httpx.MockTransport(answer)) as berth:
        with pytest.raises(Unavailable) as down:
            berth.sessions.create()
        assert down.value.problem.detail.startswith("the orchestrator") and sent == [
            "/api/sessions"
        ]
        with pytest.raises(NotFound) as missing:
            berth.sessions.get("gone")
        assert missing.value.status == 404 and missing.value.detail == "no session gone"
        with pytest.raises(ServerError) as broken:
            berth.usage()
        assert "proxy error" in broken.value.detail


def test_a_dropped_stream_is_taken_up_from_the_last_event() -> None:
    asked: list[str | None] = []

    async def cut_after_first() -> AsyncIterator[bytes]:
        yield event(1, "task.status", task_id="t1", status="running")
        raise httpx.ReadError("connection reset")

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("Last-Event-ID"))
        if len(asked) == 1:
            return httpx.Response(200, content=cut_after_first())
        if len(asked) == 2:  # the server's stream ends (its lifetime): the client reconnects
            return httpx.Response(200, content=event(2, "step.output", task_id="t1", text="hi"))
        if len(asked) == 3:
            return httpx.Response(
                200, content=event(3, "task.status", task_id="t1", status="succeeded")
            )
        return httpx.Response(204)

    with Berth("http://berth", "tok", transport=httpx.MockTransport(answer)) as berth:
        seen = [e.seq for e in berth.events("s1")]
    assert seen == [1, 2, 3] and asked == ["0", "1", "2", "3"]


def test_login_keeps_the_token_for_its_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTH_CONFIG_DIR", str(tmp_path / "berth"))
    monkeypatch.delenv("BERTH_TOKEN", raising=False)
    monkeypatch.delenv("BERTH_URL", raising=False)
    path = login.save("http://berth:8000", "secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert login.load() == login.Login("http://berth:8000", "secret")
    monkeypatch.setenv("BERTH_TOKEN", "other")
    assert login.load().token == "other"
