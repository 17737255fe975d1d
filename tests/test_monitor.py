"""The host's watch over its guests' heartbeats, with a real gateway and real WebSocket
guests on loopback; only the machine listing is the test's (the edge): a running machine
whose guest answers nothing is reported and its command fails at once, while a quiet guest
that answers pings, a suspended machine and a guest the gateway itself holds back are not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from websockets.asyncio.client import ClientConnection, connect

from berth.local import free_port
from guest_agent import protocol
from guest_agent.agent import GuestAgent, GuestConfig
from sandboxes import monitor
from sandboxes.gateway import INBOX_SIZE, GuestGateway, SandboxDied
from sandboxes.models import Machine, TerminalStep
from sandboxes.provider import SandboxProvider
from sandboxes.tokens import guest_token

KEY = b"monitor-test"
SANDBOX = "sbx-watched"
SILENCE_S = 1.0
POLL_S = 0.2


class Host:
    """The edge: a host with one machine, in whatever state the test sets."""

    def __init__(self, gateway: GuestGateway) -> None:
        self.gateway = gateway
        self.state = "running"

    async def machines(self) -> list[Machine]:
        return [
            Machine(
                sandbox_id=SANDBOX,
                session_id="a-session",
                handle="berth-watched",
                state=self.state,
                created_at=datetime.now(UTC),
            )
        ]


@contextlib.asynccontextmanager
async def gateway() -> AsyncIterator[tuple[GuestGateway, str]]:
    port = free_port()
    served = GuestGateway(KEY, reconnect_grace_s=60)
    await served.start("127.0.0.1", port)
    try:
        yield served, f"ws://127.0.0.1:{port}/guest"
    finally:
        await served.stop()


@contextlib.asynccontextmanager
async def frozen_guest(url: str) -> AsyncIterator[ClientConnection]:
    """A guest that says hello, then reads nothing (as if hung): no pong ever comes."""
    hello = {"type": protocol.HELLO, "sandbox_id": SANDBOX, "token": guest_token(KEY, SANDBOX)}
    async with connect(url, ping_interval=None) as ws:
        await ws.send(json.dumps(hello))
        assert json.loads(await ws.recv())["type"] == protocol.WELCOME
        ws.transport.pause_reading()
        yield ws
        ws.transport.abort()  # no closing handshake: it would wait for the frozen reader


@contextlib.asynccontextmanager
async def live_guest(url: str, workdir: Path) -> AsyncIterator[GuestAgent]:
    agent = GuestAgent(
        GuestConfig(
            url=url, sandbox_id=SANDBOX, token=guest_token(KEY, SANDBOX), workdir=str(workdir)
        )
    )
    task = asyncio.create_task(agent.run_forever())
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for execution in agent.executions.values():
            execution.kill()


async def watch_for(host: Host, seconds: float) -> list[str]:
    """Check as the worker does, every POLL_S for ``seconds`` or until a death is reported;
    the reasons reported."""
    deaths: list[str] = []

    async def died(machine: Machine, reason: str) -> None:
        deaths.append(reason)

    reported: set[str] = set()
    deadline = time.monotonic() + seconds
    while not deaths and time.monotonic() < deadline:
        await monitor.check(cast(SandboxProvider, host), died, reported, SILENCE_S)
        await asyncio.sleep(POLL_S)
    return deaths


async def discard(seq: int, stream: str, text: str) -> None:
    pass


async def test_a_running_machine_whose_guest_answers_nothing_fails_its_command() -> None:
    async with gateway() as (served, url), frozen_guest(url):
        await served.wait_connected(SANDBOX, 5)
        host = Host(served)
        step = asyncio.create_task(
            served.run(SANDBOX, "e1", TerminalStep(command="sleep 60"), 60, discard)
        )
        started = time.monotonic()
        deaths = await watch_for(host, 10 * SILENCE_S)
        assert len(deaths) == 1 and "guest agent answered nothing for 1 s" in deaths[0]
        assert time.monotonic() - started < SILENCE_S + 5 * POLL_S + 1
        with pytest.raises(SandboxDied, match="answered nothing"):
            await asyncio.wait_for(step, 5)
        # Its health says so too: a claim would not hand it out.
        assert not served.is_connected(SANDBOX)


async def test_a_quiet_guest_that_answers_its_heartbeats_is_not_reported(tmp_path: Path) -> None:
    async with gateway() as (served, url), live_guest(url, tmp_path):
        await served.wait_connected(SANDBOX, 5)
        # Nothing is said for 4 silences but the pongs to the heartbeats.
        assert await watch_for(Host(served), 4 * SILENCE_S) == []
        assert served.silence(SANDBOX) < SILENCE_S


async def test_a_suspended_machine_is_not_silent_until_it_runs_again() -> None:
    async with gateway() as (served, url), frozen_guest(url):
        await served.wait_connected(SANDBOX, 5)
        host = Host(served)
        host.state = "paused"
        assert await watch_for(host, 3 * SILENCE_S) == []
        host.state = "running"
        resumed = time.monotonic()
        deaths = await watch_for(host, 10 * SILENCE_S)
        assert len(deaths) == 1 and "answered nothing" in deaths[0]
        # Counted from the resume, not from the guest's last word before the pause.
        assert time.monotonic() - resumed >= SILENCE_S


async def test_a_guest_held_back_by_the_gateway_is_not_silent(tmp_path: Path) -> None:
    """A slow consumer fills the command's inbox and the gateway stops reading the link
    (pongs included): the silence is the host's, not the guest's."""
    async with gateway() as (served, url), live_guest(url, tmp_path):
        await served.wait_connected(SANDBOX, 5)
        started, release = asyncio.Event(), asyncio.Event()

        async def slow(seq: int, stream: str, text: str) -> None:
            started.set()
            await release.wait()

        command = TerminalStep(command=f"seq 1 {INBOX_SIZE * 200}")
        step = asyncio.create_task(served.run(SANDBOX, "e1", command, 60, slow))
        await asyncio.wait_for(started.wait(), 10)
        deaths = await watch_for(Host(served), 4 * SILENCE_S)
        release.set()
        assert deaths == []
        outcome = await asyncio.wait_for(step, 30)
        assert outcome.exit_code == 0
