"""The guest agent and the gateway, talking over a real WebSocket on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from guest_agent import protocol
from guest_agent.agent import GuestAgent, GuestConfig
from sandboxes.gateway import (
    CLOSE_IN_USE,
    CLOSE_POLICY,
    CLOSE_TRY_LATER,
    INBOX_SIZE,
    MAX_PENDING_PER_ADDRESS,
    MAX_STRAY_MESSAGES,
    GuestGateway,
    GuestUnavailable,
)
from sandboxes.models import TerminalStep
from sandboxes.tokens import guest_token
from telemetry import tracing
from tests.support.local import free_port

KEY = b"test-key"


@dataclass
class Link:
    gateway: GuestGateway
    sandbox_id: str
    agent: GuestAgent
    url: str


@contextlib.asynccontextmanager
async def guest_link(tmp_path: Path, token: str | None = None) -> AsyncIterator[Link]:
    port = free_port()
    gateway = GuestGateway(KEY, reconnect_grace_s=5)
    await gateway.start("127.0.0.1", port)
    sandbox_id = "sbx-1"
    url = f"ws://127.0.0.1:{port}/guest"
    agent = GuestAgent(
        GuestConfig(
            url=url,
            sandbox_id=sandbox_id,
            token=token or guest_token(KEY, sandbox_id),
            workdir=str(tmp_path),
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
        )
    )
    try:
        async with running(agent):
            yield Link(gateway, sandbox_id, agent, url)
    finally:
        await agent.close()
        await gateway.stop()


@contextlib.asynccontextmanager
async def running(agent: GuestAgent) -> AsyncIterator[GuestAgent]:
    """The agent dialling and serving until the block ends; then its commands killed."""
    task = asyncio.create_task(agent.run_forever())
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for execution in agent.executions.values():
            execution.kill()


class Collector:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.seqs: list[int] = []
        self.first = asyncio.Event()

    async def __call__(self, seq: int, stream: str, text: str) -> None:
        self.seqs.append(seq)
        self.lines.append((stream, text))
        self.first.set()

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.lines]


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

        async def drop_link_after_two(seq: int, stream: str, text: str) -> None:
            await out(seq, stream, text)
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
        assert out.texts == [f"{i}\n" for i in range(1, 7)]
        assert runs.read_text() == "run\n"  # re-attached, not run again


async def test_cancel_kills_the_command_and_its_run_returns(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        out = Collector()
        step = TerminalStep(command="sleep 30 & echo $!; wait")
        run = asyncio.create_task(link.gateway.run(link.sandbox_id, "e4", step, 60, out))
        await asyncio.wait_for(out.first.wait(), 5)
        sleeper = int(out.texts[0])
        await link.gateway.cancel(link.sandbox_id, "e4")
        outcome = await asyncio.wait_for(run, 5)
        assert outcome.exit_code in (-9, 137) and not outcome.timed_out
        await wait_gone(sleeper)


async def test_a_command_that_leaves_a_child_running_ends_with_its_shell(tmp_path: Path) -> None:
    """``server &``: the step ends when the shell does, though the child holds its output
    open; the child runs on (its later output dropped, never a broken pipe)."""
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        out = Collector()
        step = TerminalStep(command="(sleep 3; echo late > after.txt) & echo $!")
        outcome = await asyncio.wait_for(
            link.gateway.run(link.sandbox_id, "e9", step, 60, out), 2.5
        )
        assert outcome.exit_code == 0 and out.texts == [out.texts[0]]
        child = int(out.texts[0])
        os.kill(child, 0)  # still running
        await wait_gone(child)
        assert (tmp_path / "after.txt").read_text() == "late\n"


async def test_a_timeout_or_cancel_kills_children_left_by_a_shell_that_exited(
    tmp_path: Path,
) -> None:
    """The shell gone, its group lives on in a chatty child: a timeout kills it, and so
    does a cancel."""
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        chatty = "(while true; do echo tick; sleep 0.1; done) &"
        outcome = await asyncio.wait_for(
            link.gateway.run(link.sandbox_id, "e10", TerminalStep(command=chatty), 1, Collector()),
            10,
        )
        assert outcome.timed_out
        out = Collector()
        run = asyncio.create_task(
            link.gateway.run(link.sandbox_id, "e11", TerminalStep(command=chatty), 60, out)
        )
        await asyncio.wait_for(out.first.wait(), 5)
        await link.gateway.cancel(link.sandbox_id, "e11")
        outcome = await asyncio.wait_for(run, 10)
        assert not outcome.timed_out and "tick" in outcome.output_tail


async def test_a_cancel_right_after_the_start_still_kills(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        step = TerminalStep(command="sleep 30")
        run = asyncio.create_task(link.gateway.run(link.sandbox_id, "e5", step, 60, Collector()))
        await asyncio.sleep(0)  # the exec is out; the cancel follows it at once
        await link.gateway.cancel(link.sandbox_id, "e5")
        outcome = await asyncio.wait_for(run, 5)
        assert outcome.exit_code in (-9, 137)


async def test_a_cancel_while_the_guest_is_away_reaches_it_on_return(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        out = Collector()
        step = TerminalStep(command="echo started; sleep 30")
        run = asyncio.create_task(link.gateway.run(link.sandbox_id, "e6", step, 60, out))
        await asyncio.wait_for(out.first.wait(), 5)
        connection = link.gateway._guests[link.sandbox_id].connection
        assert connection is not None
        await connection.close()
        await link.gateway.cancel(link.sandbox_id, "e6")  # lost with the connection
        outcome = await asyncio.wait_for(run, 10)
        assert outcome.exit_code in (-9, 137)


async def wait_gone(pid: int) -> None:
    for _ in range(100):
        if not runs(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} still runs")


def runs(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (which runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def test_an_oversized_frame_is_refused_before_and_after_the_hello(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        big_id = "x" * (1 << 20)
        async with connect(link.url, max_size=None) as ws:
            hello = {"type": protocol.HELLO, "sandbox_id": big_id, "token": "t"}
            await ws.send(json.dumps(hello))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009
        # Under the limit but with a bad token: refused, and only a prefix is logged.
        async with connect(link.url) as ws:
            hello = {"type": protocol.HELLO, "sandbox_id": big_id[:10_000], "token": "t"}
            await ws.send(json.dumps(hello))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == protocol.CLOSE_UNAUTHORIZED
        # Verified: the limit is raised to 1 MiB.
        token = guest_token(KEY, "sbx-raw")
        async with connect(link.url, max_size=None) as ws:
            await ws.send(
                json.dumps({"type": protocol.HELLO, "sandbox_id": "sbx-raw", "token": token})
            )
            assert json.loads(await ws.recv())["type"] == protocol.WELCOME
            stray = {"type": protocol.OUTPUT, "exec_id": "none", "seq": 1, "stream": "stdout"}
            await ws.send(json.dumps({**stray, "text": "x" * 500_000}))
            await asyncio.wait_for(await ws.ping(), 5)  # taken, and the link stays up
            await ws.send("x" * (protocol.MAX_FRAME_SIZE + 1))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009
        assert max(len(record.getMessage()) for record in caplog.records) < 500
        # The real guest was never disturbed.
        out = Collector()
        outcome = await link.gateway.run(
            link.sandbox_id, "e7", TerminalStep(command="echo fine"), 10, out
        )
        assert outcome.exit_code == 0 and out.texts == ["fine\n"]


async def test_a_long_line_arrives_whole_in_pieces(tmp_path: Path) -> None:
    # 3-byte characters, so that pieces of the line cut through them.
    line = "\u20ac" * 100_000
    command = f"{sys.executable} -c \"print('\\u20ac' * 100_000)\""
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        out = Collector()
        outcome = await link.gateway.run(
            link.sandbox_id, "e8", TerminalStep(command=command), 20, out
        )
        assert outcome.exit_code == 0
        assert "".join(out.texts) == line + "\n"
        assert len(out.texts) >= 5
        assert max(len(text.encode()) for text in out.texts) <= protocol.MAX_OUTPUT_CHUNK + 3


async def test_a_slow_consumer_loses_and_reorders_nothing(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        out = Collector()
        inbox_sizes: list[int] = []

        async def slow(seq: int, stream: str, text: str) -> None:
            inbox_sizes.append(link.gateway._guests[link.sandbox_id].open["e9"].inbox.qsize())
            await out(seq, stream, text)
            if seq % 5 == 0:
                await asyncio.sleep(0.001)

        outcome = await link.gateway.run(
            link.sandbox_id, "e9", TerminalStep(command="seq 1 5000"), 60, slow
        )
        assert outcome.exit_code == 0
        assert out.texts == [f"{i}\n" for i in range(1, 5001)]
        assert all(a < b for a, b in zip(out.seqs, out.seqs[1:], strict=False))
        # It filled, and no further: the guest was held back.
        assert max(inbox_sizes) in (INBOX_SIZE - 1, INBOX_SIZE)


async def test_a_new_run_does_not_take_the_tail_of_a_replaced_one(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        step = TerminalStep(command="seq 1 3000; sleep 0.5")

        async def fail_after_ten(seq: int, stream: str, text: str) -> None:
            if seq == 10:
                raise RuntimeError("recorder failed")

        with pytest.raises(RuntimeError):
            await link.gateway.run(link.sandbox_id, "e10", step, 20, fail_after_ten)
        # At once, as a retry on the same worker would: the first attachment's lines are
        # still on their way, and must not be taken for the second's.
        out = Collector()
        outcome = await link.gateway.run(link.sandbox_id, "e10", step, 20, out, after_seq=10)
        assert outcome.exit_code == 0
        assert out.seqs == list(range(11, 3001))


async def hello_with(url: str, sandbox_id: str) -> ClientConnection:
    ws = await connect(url, max_size=None)
    token = guest_token(KEY, sandbox_id)
    await ws.send(json.dumps({"type": protocol.HELLO, "sandbox_id": sandbox_id, "token": token}))
    return ws


async def closed_with(ws: ClientConnection) -> int | None:
    """The close code the gateway ends ``ws`` with (whatever it sent before)."""
    with pytest.raises(ConnectionClosed):
        while True:
            await ws.recv()
    return ws.close_code


async def until(condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` comes true within a few seconds (the gateway's side of a
    connection moves on after the guest's)."""
    for _ in range(500):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


async def gone(gateway: GuestGateway, sandbox_id: str) -> bool:
    return await until(lambda: not gateway.is_connected(sandbox_id))


async def test_a_token_opens_one_link_at_a_time(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        # The real token, while the guest is connected: refused, the guest's link kept.
        second = await hello_with(link.url, link.sandbox_id)
        assert await closed_with(second) == CLOSE_IN_USE
        out = Collector()
        outcome = await link.gateway.run(
            link.sandbox_id, "one", TerminalStep(command="echo still mine"), 10, out
        )
        assert outcome.exit_code == 0 and out.texts == ["still mine\n"]
        # Once the link is gone, the token opens the next one (the agent's reconnect).
        connection = link.gateway._guests[link.sandbox_id].connection
        assert connection is not None
        await connection.close()
        await link.gateway.wait_connected(link.sandbox_id, 10)
        assert link.gateway._guests[link.sandbox_id].connection is not connection


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        json.dumps(["a list"]),
        json.dumps({"type": protocol.OUTPUT, "exec_id": "e", "seq": "1", "stream": "stdout"}),
        json.dumps({"type": protocol.EXIT, "exec_id": "e", "exit_code": None}),
        json.dumps({"type": "who knows", "exec_id": "e"}),
    ],
)
async def test_a_malformed_message_cuts_the_guest_off(tmp_path: Path, message: str) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        ws = await hello_with(link.url, "sbx-hostile")
        assert json.loads(await ws.recv())["type"] == protocol.WELCOME
        await ws.send(message)
        assert await closed_with(ws) == CLOSE_POLICY
        assert await gone(link.gateway, "sbx-hostile")
        out = Collector()  # the other guest carries on
        outcome = await link.gateway.run(
            link.sandbox_id, "e", TerminalStep(command="echo fine"), 10, out
        )
        assert outcome.exit_code == 0 and out.texts == ["fine\n"]


async def test_a_flood_of_messages_for_no_command_cuts_the_guest_off(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        ws = await hello_with(link.url, "sbx-flood")
        assert json.loads(await ws.recv())["type"] == protocol.WELCOME
        line = {"type": protocol.OUTPUT, "exec_id": "gone", "stream": "stdout", "text": "x"}
        with contextlib.suppress(ConnectionClosed):  # cut off while it still sends
            for seq in range(1, MAX_STRAY_MESSAGES + 2):
                await ws.send(json.dumps({**line, "seq": seq}))
        assert await closed_with(ws) == CLOSE_POLICY
        assert await gone(link.gateway, "sbx-flood")


async def test_connections_that_say_no_hello_are_capped_per_address(tmp_path: Path) -> None:
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        silent = [await connect(link.url) for _ in range(MAX_PENDING_PER_ADDRESS)]
        # Each is counted once its handler runs: the next one after that is turned away.
        assert await until(lambda: sum(link.gateway._pending.values()) == len(silent))
        one_more = await connect(link.url)
        assert await closed_with(one_more) == CLOSE_TRY_LATER
        for ws in silent:
            await ws.close()
        assert await until(lambda: not link.gateway._pending)
        late = await hello_with(link.url, "sbx-late")  # room again
        assert json.loads(await late.recv())["type"] == protocol.WELCOME
        await late.close()


async def test_a_guest_whose_link_was_up_redials_at_once_however_it_was_lost(
    tmp_path: Path,
) -> None:
    """A link lost without a close (a machine resumed from hibernation finds its link dead;
    the host's network blipped) resets the backoff: the fifth loss in a row is redialled as
    fast as the first, not after 2^4 times as long."""
    port = free_port()
    gateway = GuestGateway(KEY)
    await gateway.start("127.0.0.1", port)
    config = GuestConfig(
        url=f"ws://127.0.0.1:{port}/guest",
        sandbox_id="sbx-blips",
        token=guest_token(KEY, "sbx-blips"),
        workdir=str(tmp_path),
        backoff_initial_s=0.25,
        backoff_max_s=10,
    )
    async with running(GuestAgent(config)):
        redials = []
        for _ in range(5):
            await gateway.wait_connected("sbx-blips", 10)
            link = gateway._guests["sbx-blips"].connection  # the gateway's end, cut as a blip
            assert link is not None
            link.transport.abort()
            lost = time.monotonic()
            assert await gone(gateway, "sbx-blips")
            await gateway.wait_connected("sbx-blips", 10)
            redials.append(time.monotonic() - lost)
        # Without the reset: 0.25, 0.5, 1, 2, 4 s (each ±20%).
        assert max(redials) < 1.5, redials
    await gateway.stop()


async def test_the_guests_run_of_a_step_is_a_span_of_the_steps(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        async with guest_link(tmp_path) as link:
            await link.gateway.wait_connected(link.sandbox_id, 10)
            with tracing.tracer().start_as_current_span("RunActivity:RunStep") as step:
                began = time.time()
                await link.gateway.run(
                    link.sandbox_id, "e1", TerminalStep(command="sleep 0.3"), 10, Collector()
                )
                done = time.time()
    finally:
        tracing.install(None)
    (guest,) = [s for s in exporter.get_finished_spans() if s.name == "guest.exec"]
    assert guest.parent is not None and guest.parent.span_id == step.get_span_context().span_id
    assert guest.start_time is not None and guest.end_time is not None
    # Timed by the guest (here on the same clock): the command's run, within the step's.
    assert began * 1e9 <= guest.start_time and guest.end_time <= done * 1e9
    assert guest.end_time - guest.start_time >= 0.3e9
    assert guest.attributes is not None and guest.attributes["berth.step.exit_code"] == 0
