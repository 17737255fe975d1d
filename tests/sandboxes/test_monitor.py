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

from guest_agent import protocol
from guest_agent.agent import GuestAgent, GuestConfig
from sandboxes import gateway as gateway_module
from sandboxes import monitor
from sandboxes.gateway import INBOX_SIZE, GuestGateway, SandboxDied
from sandboxes.models import Machine, MachineUsage, TerminalStep
from sandboxes.provider import SandboxProvider
from sandboxes.tokens import guest_token
from tests.guest_agent.test_agent import running
from tests.support.local import free_port

KEY = b"monitor-test"
SANDBOX = "sbx-watched"
SILENCE_S = 1.0
POLL_S = 0.2


@pytest.fixture(autouse=True)
def quick_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat is given 0.4 s to be answered (2 s in production), within SILENCE_S."""
    monkeypatch.setattr(gateway_module, "ANSWER_S", 2 * POLL_S)


class Host:
    """The edge: a host with running machines (SANDBOX's, and ``others``), the first in
    whatever state the test sets."""

    def __init__(self, gateway: GuestGateway, others: tuple[str, ...] = ()) -> None:
        self.gateway = gateway
        self.state = "running"
        self.others = others

    async def machines(self) -> list[Machine]:
        states = [(SANDBOX, self.state)] + [(other, "running") for other in self.others]
        return [
            Machine(
                sandbox_id=sandbox_id,
                session_id=f"session-of-{sandbox_id}",
                handle=f"berth-{sandbox_id}",
                state=state,
                created_at=datetime.now(UTC),
            )
            for sandbox_id, state in states
        ]


@contextlib.asynccontextmanager
async def gateway(grace_s: float = 60) -> AsyncIterator[tuple[GuestGateway, str]]:
    port = free_port()
    served = GuestGateway(KEY, reconnect_grace_s=grace_s)
    await served.start("127.0.0.1", port)
    try:
        yield served, f"ws://127.0.0.1:{port}/guest"
    finally:
        await served.stop()


@contextlib.asynccontextmanager
async def frozen_guest(url: str, sandbox_id: str = SANDBOX) -> AsyncIterator[ClientConnection]:
    """A guest that says hello, then reads nothing (as if hung): no pong ever comes."""
    token = guest_token(KEY, sandbox_id)
    hello = {"type": protocol.HELLO, "sandbox_id": sandbox_id, "token": token}
    async with connect(url, ping_interval=None) as ws:
        await ws.send(json.dumps(hello))
        assert json.loads(await ws.recv())["type"] == protocol.WELCOME
        ws.transport.pause_reading()
        yield ws
        ws.transport.abort()  # no closing handshake: it would wait for the frozen reader


@contextlib.asynccontextmanager
async def live_guest(
    url: str, workdir: Path, sandbox_id: str = SANDBOX
) -> AsyncIterator[GuestAgent]:
    token = guest_token(KEY, sandbox_id)
    config = GuestConfig(url=url, sandbox_id=sandbox_id, token=token, workdir=str(workdir))
    async with running(GuestAgent(config)) as agent:
        yield agent


async def watch_for(host: Host, seconds: float) -> list[str]:
    """Check as the worker does, every POLL_S for ``seconds`` or until a death is reported;
    the reasons reported (of SANDBOX's machine; another's: after its id). A pass never
    waits on a guest."""
    deaths: list[str] = []

    async def died(machine: Machine, reason: str) -> None:
        mine = machine.sandbox_id == SANDBOX
        deaths.append(reason if mine else f"{machine.sandbox_id}: {reason}")

    reported: set[str] = set()
    deadline = time.monotonic() + seconds
    while not deaths and time.monotonic() < deadline:
        async with asyncio.timeout(POLL_S):
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


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame, as a guest's WebSocket sends it (payload under 126 bytes)."""
    mask = b"mask"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def test_a_guest_gone_from_its_link_has_the_reconnect_grace() -> None:
    """Redialling with its backoff (after a wake, a blip), a guest is not silent until it
    has been gone the reconnect grace."""
    async with gateway(grace_s=3 * SILENCE_S) as (served, url):
        async with connect(url) as ws:  # says hello, then leaves
            token = guest_token(KEY, SANDBOX)
            await ws.send(
                json.dumps({"type": protocol.HELLO, "sandbox_id": SANDBOX, "token": token})
            )
            await ws.recv()
        gone = time.monotonic()
        deaths = await watch_for(Host(served), 10 * SILENCE_S)
        assert len(deaths) == 1 and "answered nothing for 3 s" in deaths[0]
        assert time.monotonic() - gone >= 3 * SILENCE_S


async def test_a_guest_stuck_closing_its_link_delays_no_other_guests_heartbeat(
    tmp_path: Path,
) -> None:
    """A guest that broke the protocol and reads nothing holds its link in the closing
    handshake (10 s): pinging it would wait that long, so it is not pinged, and a quiet,
    healthy neighbour is not taken for silent meanwhile."""
    async with gateway() as (served, url), live_guest(url, tmp_path, "sbx-healthy"):
        await served.wait_connected("sbx-healthy", 5)
        async with frozen_guest(url) as stuck:
            await served.wait_connected(SANDBOX, 5)
            stuck.transport.write(client_frame(0x1, b"not json"))  # cut off: closing
            deaths = await watch_for(Host(served, others=("sbx-healthy",)), 4 * SILENCE_S)
        assert not [d for d in deaths if d.startswith("sbx-healthy")], deaths


async def test_a_guest_that_reads_nothing_and_floods_pings_is_cut_off() -> None:
    """websockets answers every ping with a pong, buffered without bound while the guest
    reads none: past MAX_UNSENT_BYTES its link is cut."""
    async with gateway() as (served, url), frozen_guest(url) as flooder:
        await served.wait_connected(SANDBOX, 5)
        pings = client_frame(0x9, b"p" * 125) * 10_000  # 1.3 MB, answered by as many pongs
        for _ in range(20):
            flooder.transport.write(pings)
            await asyncio.sleep(POLL_S)
            served.probe()  # as each pass does (long before the guest would be silent)
            if not served.is_connected(SANDBOX):
                break
        assert not served.is_connected(SANDBOX)


class Listing:
    """The edge: a host whose listing holds the machines of ``states`` (by sandbox id), and
    none of their guests ever said hello to this process (a worker just restarted)."""

    def __init__(self, gateway: GuestGateway, states: dict[str, str]) -> None:
        self.gateway = gateway
        self.states = states

    async def machines(self) -> list[Machine]:
        return [
            Machine(sandbox_id=sandbox_id, session_id=f"session-of-{sandbox_id}",
                    handle=f"berth-{sandbox_id}", state=state, created_at=datetime.now(UTC))
            for sandbox_id, state in self.states.items()
        ]  # fmt: skip


def placed(*sandbox_ids: str) -> list[monitor.Placed]:
    return [
        monitor.Placed(sandbox_id=s, session_id=f"session-of-{s}", handle=f"berth-{s}")
        for s in sandbox_ids
    ]


async def test_placed_machines_are_judged_by_their_state_without_their_guests() -> None:
    """The machines of the host's live sessions are watched though no guest ever talked
    to this worker: a stopped one is dead at once, a missing one (removed behind Berth's
    back, hibernated or not) on the second pass that misses it, and a step waiting for its
    guest fails then; a running, a hibernated machine are left be. Each is told once."""
    gateway = GuestGateway(KEY)
    host = Listing(gateway, {"up": "running", "asleep": "paused", "stopped": "exited"})
    here = placed("up", "asleep", "stopped", "removed", "removed-asleep")
    told: list[tuple[str, str, str]] = []

    async def died(machine: Machine, reason: str) -> None:
        told.append((machine.sandbox_id, machine.session_id, reason))

    waiting = asyncio.create_task(
        gateway.run("removed", "e1", TerminalStep(command="true"), 60, discard)
    )
    reported: set[str] = set()
    unseen: set[str] = set()
    provider = cast(SandboxProvider, host)
    await monitor.check(provider, died, reported, SILENCE_S, here, unseen)
    assert [t[0] for t in told] == ["stopped"]
    assert "its machine is exited" in told[0][2] and told[0][1] == "session-of-stopped"
    assert not waiting.done()
    # A moment later the rows still place them here: the missing ones are gone.
    await monitor.check(provider, died, reported, SILENCE_S, here, unseen)
    assert sorted(t[0] for t in told) == ["removed", "removed-asleep", "stopped"]
    assert all("gone" in t[2] for t in told if t[0].startswith("removed"))
    with pytest.raises(SandboxDied, match="gone"):
        await asyncio.wait_for(waiting, 5)
    # Told once: later passes say nothing more.
    for _ in range(3):
        await monitor.check(provider, died, reported, SILENCE_S, here, unseen)
    assert len(told) == 3


async def test_a_machine_missed_once_is_not_taken_for_gone() -> None:
    """A session destroying its machine removes it a moment before its row says so: one
    listing that misses a placed machine is no death."""
    gateway = GuestGateway(KEY)
    host = Listing(gateway, {})
    told: list[str] = []

    async def died(machine: Machine, reason: str) -> None:
        told.append(machine.sandbox_id)

    reported: set[str] = set()
    unseen: set[str] = set()
    provider = cast(SandboxProvider, host)
    await monitor.check(provider, died, reported, SILENCE_S, placed("ending"), unseen)
    await monitor.check(provider, died, reported, SILENCE_S, [], unseen)  # its row now says so
    await monitor.check(provider, died, reported, SILENCE_S, [], unseen)
    assert told == [] and reported == set()


async def test_a_session_not_told_is_told_on_the_next_pass_and_the_others_at_once() -> None:
    gateway = GuestGateway(KEY)
    host = Listing(gateway, {"a": "exited", "b": "dead"})
    told: list[str] = []
    failing = {"a"}

    async def died(machine: Machine, reason: str) -> None:
        if machine.sandbox_id in failing:
            failing.discard(machine.sandbox_id)
            raise ConnectionError("Temporal is down")
        told.append(machine.sandbox_id)

    reported: set[str] = set()
    provider = cast(SandboxProvider, host)
    await monitor.check(provider, died, reported, SILENCE_S, placed("a", "b"))
    assert told == ["b"]
    await monitor.check(provider, died, reported, SILENCE_S, placed("a", "b"))
    assert told == ["b", "a"]


async def test_the_watch_reads_what_the_database_places_on_the_host() -> None:
    gateway = GuestGateway(KEY)
    host = Listing(gateway, {})
    told: list[str] = []
    stop = asyncio.Event()

    async def died(machine: Machine, reason: str) -> None:
        told.append(machine.sandbox_id)
        stop.set()

    async def sampled(usage: dict[str, MachineUsage], machines: list[Machine]) -> None:
        pass

    async def placement() -> list[monitor.Placed]:
        return placed("removed")

    watching = monitor.watch(
        cast(SandboxProvider, host), died, sampled, stop, poll_s=POLL_S, placement=placement
    )
    await asyncio.wait_for(watching, 5)
    assert told == ["removed"]
