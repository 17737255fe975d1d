"""The client, the `berth` command and the MCP server against the whole system (Temporal,
worker, API, Docker sandboxes), as `make run` starts it."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from berth_client import AsyncBerth, Berth, InvalidRequest, NotFound, Unauthorized, steps
from berth_client.cli import app
from berth_client.models import TaskStatus
from typer.testing import CliRunner

from tests.support.local import LocalSystem

EMAIL, PASSWORD = "client@example.com", "correct horse battery"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Streams last 3 s, so a task's events cross reconnects (from the last event's id).
    env = {"BERTH_STREAM_LIFETIME_S": "3", "BERTH_MAX_LIVE_SESSIONS": "20"}
    running = LocalSystem.start(tmp_path_factory.mktemp("berth"), "client", env)
    credentials = {"email": EMAIL, "password": PASSWORD}
    assert httpx.post(f"{running.base}/api/auth/signup", json=credentials).status_code == 201
    yield running.base
    # Sessions a failed test left live: their containers go with them.
    with Berth(running.base) as berth:
        berth.log_in(EMAIL, PASSWORD, "teardown")
        for session in berth.sessions.list():
            if session.info.ended_at is None:
                session.end()
                list(session.events(timeout=120))
    assert running.stop() == 0


@pytest.fixture(scope="module")
def token(system: str) -> str:
    with Berth(system) as berth:
        return berth.log_in(EMAIL, PASSWORD, "tests").token


@pytest.fixture
def berth(system: str, token: str) -> Iterator[Berth]:
    with Berth(system, token) as client:
        yield client


def test_sessions_and_tasks_from_python(berth: Berth) -> None:
    session = berth.sessions.create()
    assert session.info.template and session.id in [s.id for s in berth.sessions.list()]
    task = session.run("$ echo one\n$ sleep 4\n$ echo two")
    seen = list(task.events(timeout=120))
    # The stream was cut every 3 s and taken up again where it stopped: nothing lost or twice.
    seqs = [event.seq for event in seen]
    assert seqs == sorted(set(seqs))
    output = "".join(e.data["text"] for e in seen if e.type == "step.output")
    assert output.startswith("one\n") and output.endswith("two\n")
    assert seen[-1].type == "task.status" and seen[-1].data["status"] == "succeeded"
    done = task.wait(timeout=60, check=True)
    assert [step.exit_code for step in done.steps] == [0, 0, 0] and done.result == "two\n"
    assert [t.id for t in session.tasks()] == [task.id]
    assert session.task(task.id).status == TaskStatus.succeeded

    # A submission sent again with its key is the same task, queued once.
    first = session.run("$ echo once", idempotency_key="key-1")
    again = session.run("$ echo once", idempotency_key="key-1")
    assert again.id == first.id and first.wait(timeout=60).status == "succeeded"

    # Pause, resume, modify and cancel a running task.
    slow = session.run("$ sleep 3\n$ echo planned\n$ sleep 60")
    assert slow.pause().status == "paused" or slow.get().status == "paused"
    assert slow.resume().status == "running"
    assert slow.modify("$ echo modified\n$ sleep 60").id == slow.id
    assert slow.cancel().status == "cancelled"
    assert slow.wait(timeout=120).status == "cancelled"

    # Files, through step plans.
    assert session.run(steps.plan(steps.write_file("notes/a.txt", "hello\n"))).wait(
        timeout=60, check=True
    )
    read = session.run(steps.plan(steps.read_file("notes/a.txt"))).wait(timeout=60)
    assert steps.content(read.steps[-1]) == "hello\n"
    listing = session.run(steps.plan(steps.list_files("notes"))).wait(timeout=60)
    assert steps.content(listing.steps[-1]) == "a.txt  6"

    # A browser's screenshot is an artifact the client downloads.
    shot = session.run(steps.plan(steps.browser("screenshot"))).wait(timeout=120, check=True)
    assert session.artifact(shot.steps[-1].artifacts[0]).startswith(b"\xff\xd8")

    # Ended with its disk kept, it comes back with its files.
    assert session.end(preserve=True).status in ("ended", "busy", "ready")
    assert list(berth.events(session.id, timeout=120))[-1].data["status"] == "ended"
    assert berth.sessions.get(session.id).info.preserved
    session.resume()
    back = session.run("$ cat notes/a.txt").wait(timeout=180, check=True)
    assert back.result == "hello\n"
    session.end()
    assert berth.usage().user_id


def test_refusals_are_typed_exceptions_carrying_the_problem(berth: Berth, system: str) -> None:
    with pytest.raises(NotFound) as missing:
        berth.sessions.get("no-such-session")
    assert missing.value.status == 404 and "no-such-session" in missing.value.problem.detail
    session = berth.sessions.create()
    with pytest.raises(InvalidRequest) as invalid:
        session.run('{"steps": [{"kind": "browser", "action": "click"}]}')
    assert invalid.value.problem.errors and "needs selector" in invalid.value.problem.detail + str(
        invalid.value.problem.errors
    )
    session.end()
    with Berth(system, "not-a-token") as stranger, pytest.raises(Unauthorized):
        stranger.sessions.get(session.id)


async def test_the_async_client(system: str, token: str) -> None:
    async with AsyncBerth(system, token) as berth:
        session = await berth.sessions.create()
        task = await session.run("$ echo async")
        async with asyncio.timeout(120):
            kinds = [event.type async for event in task.events()]
            done = await task.wait(check=True)
        assert kinds[-1] == "task.status" and done.result == "async\n"
        listed = [s.id async for s in berth.sessions.list()]
        assert listed[0] == session.id
        await session.end()


@pytest.fixture
def cli_env(
    system: str, token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    monkeypatch.setenv("BERTH_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("BERTH_TOKEN", raising=False)
    monkeypatch.delenv("BERTH_URL", raising=False)
    return {"BERTH_CONFIG_DIR": str(tmp_path / "config")}


def test_the_command_line(system: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["sessions"])
    assert out.exit_code == 2 and "berth login" in out.output
    login = ["login", "--url", system, "--email", EMAIL, "--password", PASSWORD]
    assert runner.invoke(app, login).exit_code == 0
    saved = Path(cli_env["BERTH_CONFIG_DIR"]) / "credentials.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600

    new = runner.invoke(app, ["new", "--json"])
    assert new.exit_code == 0, new.output
    sid = json.loads(new.output)["id"]
    ran = runner.invoke(app, ["run", "$ echo hi", "--session", sid, "--follow"])
    assert ran.exit_code == 0, ran.output
    assert "▶ step 1: $ echo hi" in ran.output and "hi\n" in ran.output
    assert "✓ step 1 succeeded" in ran.output and "task succeeded" in ran.output
    failed = runner.invoke(app, ["run", "$ false", "--session", sid])
    assert failed.exit_code == 1 and "exited with 1" in failed.output

    local = tmp_path / "up.txt"
    local.write_text("uploaded\n")
    assert runner.invoke(app, ["files", "put", sid, str(local), "up.txt"]).exit_code == 0
    got = runner.invoke(app, ["files", "get", sid, "up.txt"])
    assert got.exit_code == 0 and got.output == "uploaded\n"
    listed = runner.invoke(app, ["files", "ls", sid, "--json"])
    assert {"name": "up.txt", "kind": "file", "size": 9} in json.loads(listed.output)["entries"]
    assert runner.invoke(app, ["files", "rm", sid, "up.txt"]).exit_code == 0
    assert "up.txt" not in runner.invoke(app, ["files", "ls", sid]).output

    listing = json.loads(runner.invoke(app, ["sessions", "--json"]).output)
    assert sid in [s["id"] for s in listing]
    logs = runner.invoke(app, ["logs", sid, "--json"])
    events = [json.loads(line) for line in logs.output.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert json.loads(runner.invoke(app, ["usage", "--json"]).output)["user_id"]
    ended = runner.invoke(app, ["end", sid, "--json"])
    assert ended.exit_code == 0 and json.loads(ended.output)["id"] == sid


def test_berth_run_as_a_real_process_prints_the_live_output(system: str, token: str) -> None:
    env = {**os.environ, "BERTH_URL": system, "BERTH_TOKEN": token, "NO_COLOR": "1"}
    ran = subprocess.run(
        [BIN / "berth", "run", "$ echo hi", "--follow"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "hi\n" in ran.stdout and "task succeeded" in ran.stdout
    session = ran.stderr.split()[1].rstrip(",")
    with Berth(system, token) as berth:
        berth.sessions.end(session)


async def use_tools(session: Any) -> None:
    """What both transports are checked for: the tools, a command, files, a screenshot."""
    await session.initialize()
    tools = {tool.name for tool in (await session.list_tools()).tools}
    assert {"create_session", "run_task", "run_command", "read_file", "write_file",
            "list_files", "browser_navigate", "browser_click", "browser_type",
            "browser_extract", "screenshot", "end_session"} <= tools  # fmt: skip
    made = await session.call_tool("create_session", {})
    sid = json.loads(made.content[0].text)["id"]
    progress: list[tuple[float, float | None, str | None]] = []

    async def heard(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    ran = await session.call_tool(
        "run_task", {"session_id": sid, "prompt": "$ echo a\n$ echo b"}, progress_callback=heard
    )
    assert not ran.is_error and "task succeeded" in ran.content[0].text
    assert [p[:2] for p in progress] == [(1, 2), (2, 2)]
    command = await session.call_tool("run_command", {"session_id": sid, "command": "uname"})
    assert command.content[0].text.startswith("exit code 0\nLinux")
    refused = await session.call_tool("run_command", {"session_id": sid, "command": "bash -c x"})
    assert refused.is_error and "refused" in refused.content[0].text
    wrote = await session.call_tool(
        "write_file", {"session_id": sid, "path": "m.txt", "content": "from mcp"}
    )
    assert not wrote.is_error
    read = await session.call_tool("read_file", {"session_id": sid, "path": "m.txt"})
    assert read.content[0].text == "from mcp"
    shot = await session.call_tool("screenshot", {"session_id": sid})
    assert shot.content[0].type == "image" and shot.content[0].mime_type == "image/jpeg"
    log = await session.read_resource(f"berth://sessions/{sid}/events")
    lines = log.contents[0].text.splitlines()
    assert json.loads(lines[0])["seq"] == 1 and any("uname" in line for line in lines)
    ended = await session.call_tool("end_session", {"session_id": sid})
    assert not ended.is_error


async def test_mcp_over_stdio(system: str, token: str) -> None:
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    server = StdioServerParameters(
        command=str(BIN / "berth"), args=["mcp"],
        env={**os.environ, "BERTH_URL": system, "BERTH_TOKEN": token},
    )  # fmt: skip
    async with (
        asyncio.timeout(600),
        stdio_client(server) as (read, write),
        ClientSession(read, write) as session,
    ):
        await use_tools(session)


def test_mcp_over_http_needs_a_live_token(system: str) -> None:
    refused = httpx.post(f"{system}/mcp", json={})
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    wrong = httpx.post(f"{system}/mcp", json={}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["content-type"] == "application/problem+json"


async def test_mcp_over_http_at_the_api(system: str, token: str) -> None:
    import httpx2
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {token}"}
    async with (
        asyncio.timeout(600),
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http,
        streamable_http_client(f"{system}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await use_tools(session)
