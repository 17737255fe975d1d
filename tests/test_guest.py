"""The guest agent and the gateway, talking over a real WebSocket on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest_agent.agent import GuestAgent, GuestConfig
from sandboxes.gateway import GuestGateway, GuestUnavailable
from sandboxes.models import TerminalStep
from sandboxes.tokens import guest_token
from tests.conftest import free_port

KEY = b"test-key"


@dataclass
class Link:
    gateway: GuestGateway
    sandbox_id: str
    agent: GuestAgent


@contextlib.asynccontextmanager
async def guest_link(tmp_path: Path, token: str | None = None) -> AsyncIterator[Link]:
    port = free_port()
    gateway = GuestGateway(KEY, reconnect_grace_s=5)
    await gateway.start("127.0.0.1", port)
    sandbox_id = "sbx-1"
    agent = GuestAgent(
        GuestConfig(
            url=f"ws://127.0.0.1:{port}/guest",
            sandbox_id=sandbox_id,
            token=token or guest_token(KEY, sandbox_id),
            workdir=str(tmp_path),
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
        )
    )
    task = asyncio.create_task(agent.run_forever())
    try:
        yield Link(gateway, sandbox_id, agent)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for execution in agent.executions.values():
            execution.kill()
        await gateway.stop()


class Collector:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    async def __call__(self, stream: str, text: str) -> None:
        self.lines.append((stream, text))


async def test_output_streams_line_by_line_with_the_exit_code(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        out = Collector()
        step = TerminalStep(command="echo one; echo two >&2; printf 'three'; exit 3")
        outcome = await link.gateway.run(link.sandbox_id, "e1", step, 10, out)
        assert outcome.exit_code == 3 and not outcome.timed_out and not outcome.ok
        assert sorted(out.lines) == [("stderr", "two\n"), ("stdout", "one\n"), ("stdout", "three")]
        assert outcome.output_tail.count("one") == 1


async def test_a_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        outcome = await link.gateway.run(
            link.sandbox_id, "e2", TerminalStep(command="echo begin; sleep 30"), 0.5, Collector()
        )
        assert outcome.timed_out and outcome.exit_code == 124


async def test_a_token_for_another_sandbox_is_refused(tmp_path: Path) -> None:
    async with guest_link(tmp_path, token=guest_token(KEY, "another-sandbox")) as link:
        with pytest.raises(GuestUnavailable):
            await link.gateway.wait_connected(link.sandbox_id, 1.0)
        assert not link.gateway.is_connected(link.sandbox_id)


async def test_a_command_keeps_running_across_a_reconnect(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; for i in 1 2 3 4 5 6; do echo $i; sleep 0.2; done"
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        out = Collector()
        dropped = asyncio.Event()

        async def drop_link_after_two(stream: str, text: str) -> None:
            await out(stream, text)
            if text == "2\n" and not dropped.is_set():
                dropped.set()
                connection = link.gateway._guests[link.sandbox_id].connection
                assert connection is not None
                await connection.close()

        outcome = await link.gateway.run(
            link.sandbox_id, "e3", TerminalStep(command=command), 20, drop_link_after_two
        )
        assert dropped.is_set()
        assert outcome.exit_code == 0
        assert [text for _, text in out.lines] == [f"{i}\n" for i in range(1, 7)]
        assert runs.read_text() == "run\n"  # re-attached, not run again


async def test_cancel_kills_the_command(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        run = asyncio.create_task(
            link.gateway.run(
                link.sandbox_id, "e4", TerminalStep(command="sleep 30"), 60, Collector()
            )
        )
        await asyncio.sleep(0.5)
        await link.gateway.cancel(link.sandbox_id, "e4")
        outcome = await asyncio.wait_for(run, 5)
        assert outcome.exit_code != 0
