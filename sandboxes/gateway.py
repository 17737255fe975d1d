"""The guest gateway: the WebSocket server that guest agents dial out to.

It runs beside the sandbox host's Temporal worker. A command is tracked here by its
``exec_id`` until its exit arrives, across reconnects of the guest: when a guest comes back,
every command still open for it is sent again with the last output sequence seen, and the
guest replays only what was missed.

Each command's messages go through a bounded inbox: when its consumer (recording output)
falls behind, the connection stops being read and TCP holds the guest back, instead of the
backend buffering without bound.

A guest is not trusted: its frames are read with the protocol's own parser
(guest_agent/protocol.py), which refuses whatever breaks its bounds. Its token opens one
connection at a time: while its sandbox has a live link, another hello with the same token is
refused (so a stolen token could not take over a session's link; a dead link is found within
the ping timeout). A token opens a link only while its sandbox lives: the provider says
whether its machine runs (``alive``), and a sandbox being destroyed (``forget``) is refused at
once, so the token of a destroyed sandbox opens nothing, before or after a restart of the
worker. A malformed message cuts the guest off, and so do more than
MAX_STRAY_MESSAGES messages for no open command (the only ones nothing holds back); each
address may hold MAX_PENDING_PER_ADDRESS connections that have not said hello yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from guest_agent import protocol
from guest_agent.protocol import (
    Artifact,
    Cancel,
    Clock,
    Close,
    Data,
    Exec,
    Exit,
    Hello,
    Open,
    Output,
    ProtocolError,
    StepFrame,
    Welcome,
)
from sandboxes.gateway_tls import GatewayCertificate
from sandboxes.models import STEP_KINDS, CheckResult, Step, StepOutcome, StepResult
from sandboxes.tokens import check_guest_token
from telemetry import tracing

log = logging.getLogger("berth.gateway")

HELLO_TIMEOUT_S = 10.0
# Messages held per command while its consumer is behind: at most 32 MiB of frames.
INBOX_SIZE = 64
# The end of a command's output carried in its outcome (and so in Temporal's history).
OUTPUT_TAIL_CHARS = 4000
# Artifacts one step may leave (each at most one frame: see protocol.MAX_ARTIFACT_BYTES).
MAX_ARTIFACTS_PER_STEP = 8
LOGGED_ID_CHARS = 64
# Pings every 5 s; a link that answers none for this long is dead, and its sandbox free to
# connect again.
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 10.0
# A heartbeat (see probe) unanswered this long leaves its guest silent since last heard.
ANSWER_S = 2.0
# Unsent bytes a link may hold: past it the guest reads nothing (while websockets answers
# each of its pings, unbounded), and it is cut off.
MAX_UNSENT_BYTES = 8 << 20
# Messages a connection may send for commands that are not open (the tail of a run that was
# given up) before it is cut off as a flood.
MAX_STRAY_MESSAGES = 1000
MAX_PENDING_PER_ADDRESS = 8
CLOSED_REMEMBERED = 64
# Sandboxes being destroyed that are remembered (refused at once while their machines shut
# down); older ones are refused by ``alive`` alone, their machines gone.
MAX_ENDED = 4096
# Close codes: the sandbox has a live link already; the guest broke the protocol; too many
# connections waiting for their hello.
CLOSE_IN_USE = 4409
CLOSE_POLICY = 1008
CLOSE_TRY_LATER = 1013

# Called as ``on_output(seq, stream, text)``; ``seq`` is the guest's per-command line number,
# strictly increasing, so a consumer can store each line once across retries.
OutputSink = Callable[[int, str, str], Awaitable[None]]
# Called as ``on_artifact(name, media_type, data)`` for each artifact of a step, possibly
# again for the same name (a replay after a reconnect); returns the artifact's id.
ArtifactSink = Callable[[str, str, bytes], Awaitable[str]]
Model = TypeVar("Model", bound=BaseModel)

# Whether a sandbox's machine runs (its provider's word), asked at each verified hello.
Alive = Callable[[str], Awaitable[bool]]
# What a guest that predates capabilities runs.
TERMINAL_ONLY = frozenset({"terminal"})


class GuestUnavailable(RuntimeError):
    """The guest did not connect, or did not come back in time."""


class SandboxDied(GuestUnavailable):
    """The sandbox's machine died (its host saw it): nothing runs there any more."""


class _Died:
    """An inbox message of the gateway's own: the machine died (see fail())."""


DIED = _Died()


class StepKindUnsupported(ValueError):
    """The guest does not run this kind of step (no browser in its machine, say)."""


class Channel:
    """One channel to a guest (see protocol.py): what the backend sends on it, and what the
    guest sent back, held in a bounded inbox so a slow reader holds back the guest's link."""

    def __init__(self, guest: _Guest, channel: str, send: Callable[[str], Awaitable[None]]):
        self.id, self._guest, self._send = channel, guest, send
        self.inbox: asyncio.Queue[Data | Close] = asyncio.Queue(INBOX_SIZE)

    async def send(self, data: bytes) -> None:
        for start in range(0, len(data), protocol.MAX_DATA_BYTES):
            await self._send(Data(self.id, data[start : start + protocol.MAX_DATA_BYTES]).encode())

    async def finish(self, error: str | None = None) -> None:
        """No more data from the backend (``error``: it was cut, what came is not whole)."""
        await self._send(Close(self.id, error=error).encode())

    async def receive(self) -> Data | Close:
        """The guest's next frame on this channel; GuestUnavailable once its link is gone."""
        while True:
            try:
                return await asyncio.wait_for(self.inbox.get(), PING_INTERVAL_S)
            except TimeoutError:
                if not self._guest.connected.is_set():
                    raise GuestUnavailable("the guest's link was lost") from None
                if self._guest.paused:
                    raise GuestUnavailable("the machine was suspended") from None


@dataclass
class _Open:
    """A command sent to a guest whose exit has not arrived yet."""

    exec_id: str
    step: Step
    timeout_s: float
    last_seq: int = 0
    cancelled: bool = False
    # The step's span (a traceparent) when traces are on, for a guest that traces itself.
    trace: str | None = None
    inbox: asyncio.Queue[StepFrame | _Died] = field(
        default_factory=lambda: asyncio.Queue(INBOX_SIZE)
    )

    def exec_message(self) -> str:
        step = self.step.model_dump()
        return Exec(
            self.exec_id, step, self.timeout_s, after_seq=self.last_seq, trace=self.trace
        ).encode()


@dataclass
class _Guest:
    connection: ServerConnection | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    open: dict[str, _Open] = field(default_factory=dict)
    # The step kinds its latest connection said it runs (None before the first hello).
    capabilities: frozenset[str] | None = None
    version: int = 1
    # Open channels, by id: their inbox (they end with the link that carries them).
    channels: dict[str, Channel] = field(default_factory=dict)
    runs_channels: bool = False
    # Channels closed lately: what the guest sent on them before it saw the close is no
    # flood (a shell's output in flight), and is dropped without counting.
    closed: deque[str] = field(default_factory=lambda: deque(maxlen=CLOSED_REMEMBERED))
    # Why its machine died, once the host has seen it die.
    dead: str | None = None
    # Its machine is suspended (seen by the host): a command waits for it, however long.
    paused: bool = False
    # When it was last heard from (a message, a pong; monotonic); when it was asked the
    # oldest heartbeat it has not answered; whether the gateway itself holds back its
    # messages (an inbox full), so that its silence is the host's doing.
    heard_at: float = field(default_factory=time.monotonic)
    asked_at: float | None = None
    held: bool = False
    heartbeat: asyncio.Task[None] | None = None

    def heard(self) -> None:
        self.heard_at, self.asked_at = time.monotonic(), None


def _guest_span(sandbox_id: str, step: Step, frame: Exit) -> None:
    """The guest's execution of the step as a span of the step's (a guest that predates
    the times in its exit gets none); its end no later than now, should its clock run ahead."""
    if frame.started is None or frame.ended is None:
        return
    tracing.completed(
        "guest.exec",
        frame.started,
        min(frame.ended, time.time()),
        {"berth.sandbox": sandbox_id, "berth.step.kind": step.kind,
         "berth.step.exit_code": frame.exit_code, "berth.step.timed_out": frame.timed_out},
    )  # fmt: skip


class GuestGateway:
    def __init__(
        self, key: bytes, reconnect_grace_s: float = 30.0, previous_keys: tuple[bytes, ...] = ()
    ) -> None:
        # Previous keys: tokens of sandboxes made before a rotation still open their link.
        self._keys = (key, *previous_keys)
        self._grace = reconnect_grace_s
        self._guests: dict[str, _Guest] = {}
        self._server: Server | None = None
        # Set by start(): with one, the gateway speaks wss and guests pin its fingerprint.
        self.certificate: GatewayCertificate | None = None
        self.pin: str | None = None
        self._pending: dict[str, int] = {}  # connections without a hello yet, by address
        # Set by the provider (SandboxProvider.__init__); None: every valid token is let in
        # (a gateway with no machines behind it, as in tests of the link alone).
        self.alive: Alive | None = None
        self._ended: OrderedDict[str, None] = OrderedDict()

    async def start(
        self, host: str, port: int, certificate: GatewayCertificate | None = None
    ) -> None:
        """Listen on ``host:port``: TLS (wss) with ``certificate``, plain WebSocket without."""
        self.certificate = certificate
        self.pin = certificate.fingerprint if certificate else None
        self._server = await serve(
            self._serve,
            host,
            port,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
            max_size=protocol.MAX_HELLO_SIZE,
            ssl=certificate.server_context() if certificate else None,
        )
        log.info("guest gateway listening on %s:%d (%s)", host, port, self.scheme)

    @property
    def scheme(self) -> str:
        return "wss" if self.certificate else "ws"

    def url(self, address: str, port: int) -> str:
        """Where a guest that reaches this host at ``address`` dials."""
        return f"{self.scheme}://{address}:{port}/guest"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def is_connected(self, sandbox_id: str) -> bool:
        """Whether the sandbox's guest has a live link (and is not taken for dead)."""
        guest = self._guests.get(sandbox_id)
        return guest is not None and guest.connected.is_set() and guest.dead is None

    async def wait_connected(self, sandbox_id: str, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._guest(sandbox_id).connected.wait(), timeout_s)
        except TimeoutError:
            raise GuestUnavailable(
                f"guest agent of sandbox {sandbox_id} did not connect within {timeout_s:.0f} s"
            ) from None

    def known(self) -> set[str]:
        """Sandboxes whose guest has said hello (to this process), alive or not."""
        return {i for i, guest in self._guests.items() if guest.capabilities is not None}

    def set_paused(self, sandbox_id: str, paused: bool) -> None:
        """The host saw the sandbox's machine suspended (or running again): while it is, a
        running command waits for its guest instead of failing after the grace period."""
        guest = self._guests.get(sandbox_id)
        if guest is not None:
            if guest.paused and not paused:
                guest.heard()  # its silence counts from the resume
            guest.paused = paused

    def probe(self) -> None:
        """Send each live guest a heartbeat (a ping; at most one in flight each), which its
        pong answers. Never waits: a link that cannot take a ping delays only its own."""
        for sandbox_id, guest in list(self._guests.items()):
            ws = guest.connection
            if ws is None or ws.state is not State.OPEN or guest.dead is not None:
                continue
            if ws.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
                log.warning("sandbox %s reads nothing sent to it: cut off", sandbox_id)
                ws.transport.abort()
                continue
            if guest.asked_at is None:
                guest.asked_at = time.monotonic()
            if guest.heartbeat is None or guest.heartbeat.done():
                guest.heartbeat = asyncio.create_task(_heartbeat(guest, ws))

    def silence(self, sandbox_id: str) -> float:
        """How long the sandbox's guest has been silent: seconds since it was last heard
        from (a message, a pong) once it has left a heartbeat unanswered for ANSWER_S, or,
        without a link, once it has been gone the reconnect grace (it may be redialling
        with its backoff); else 0, as while its machine is suspended or the gateway itself
        holds its messages back."""
        guest = self._guests.get(sandbox_id)
        if guest is None or guest.paused or guest.held:
            return 0.0
        now = time.monotonic()
        quiet = now - guest.heard_at
        if guest.connection is None:
            return quiet if quiet >= self._grace else 0.0
        if guest.asked_at is None or now - guest.asked_at < ANSWER_S:
            return 0.0
        return quiet

    def fail(self, sandbox_id: str, reason: str) -> None:
        """The sandbox's machine died: its commands end now with SandboxDied, and no new
        one waits for a guest that will not come back."""
        guest = self._guest(sandbox_id)
        guest.dead = reason
        if guest.connection is not None:
            guest.connection.transport.abort()  # whatever it says now is not listened to
        for command in guest.open.values():
            if command.inbox.full():
                command.inbox.get_nowait()  # nothing after the death matters
            command.inbox.put_nowait(DIED)

    def forget(self, sandbox_id: str) -> None:
        """Drop a sandbox that is being destroyed: its link is cut, and its token opens no
        other until a machine is made again under its id (admit)."""
        guest = self._guests.pop(sandbox_id, None)
        if guest is not None and guest.connection is not None:
            guest.connection.transport.abort()
        self._ended[sandbox_id] = None
        self._ended.move_to_end(sandbox_id)
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)

    def admit(self, sandbox_id: str) -> None:
        """A machine is being made under ``sandbox_id`` (again: a retried provisioning starts
        afresh under the same id after destroying the first attempt's): its guest may dial."""
        self._ended.pop(sandbox_id, None)

    async def _lives(self, sandbox_id: str) -> bool:
        """Whether a verified guest's sandbox lives: not being destroyed, its machine running.
        A provider that cannot say refuses it (the guest dials again)."""
        if sandbox_id in self._ended:
            return False
        if self.alive is None:
            return True
        try:
            return await self.alive(sandbox_id)
        except Exception:
            log.exception("could not tell whether sandbox %s lives: its guest refused", sandbox_id)
            return False

    async def run(
        self,
        sandbox_id: str,
        exec_id: str,
        step: Step,
        timeout_s: float,
        on_output: OutputSink,
        after_seq: int = 0,
        on_artifact: ArtifactSink | None = None,
    ) -> StepOutcome:
        """Run ``step`` in the guest (or re-attach to it), feeding output to ``on_output``
        and artifacts to ``on_artifact`` (dropped without one). StepKindUnsupported if the
        guest said it does not run this kind of step."""
        guest = self._guest(sandbox_id)
        if guest.dead is not None:
            raise SandboxDied(guest.dead)
        if guest.capabilities is not None and step.kind not in guest.capabilities:
            raise StepKindUnsupported(
                f"the sandbox's guest does not run {step.kind} steps; it runs "
                f"{', '.join(sorted(guest.capabilities))}"
            )
        # A new attempt replaces an older one's attachment (that one is being cancelled),
        # so the two never share an inbox.
        older = guest.open.get(exec_id)
        command = _Open(exec_id, step, timeout_s, last_seq=after_seq, trace=tracing.traceparent())
        command.cancelled = older is not None and older.cancelled
        guest.open[exec_id] = command
        tail = ""
        artifacts: dict[str, str] = {}  # name -> id, each stored once per run
        try:
            await self._send(guest, command.exec_message())
            while True:
                frame = await self._next(guest, command)
                # Only what follows the last line taken: a line seen twice (replayed across a
                # reconnect) or from an attachment since replaced (it would skip lines) is not.
                # A guest that predates ``after_seq`` is taken at its word.
                follows = frame.after_seq is None or frame.after_seq <= command.last_seq
                if isinstance(frame, Output):
                    if not follows or frame.seq <= command.last_seq:
                        continue
                    command.last_seq = frame.seq
                    tail = (tail + frame.text)[-OUTPUT_TAIL_CHARS:]
                    await on_output(frame.seq, frame.stream, frame.text)
                elif isinstance(frame, Artifact):
                    # A step makes a few (its screenshot); a guest that sends more is
                    # ignored past the cap, so it cannot fill the host's disk.
                    if on_artifact is not None and frame.name not in artifacts:
                        if len(artifacts) >= MAX_ARTIFACTS_PER_STEP:
                            log.warning(
                                "sandbox %s: artifact %s past the cap", sandbox_id, frame.name
                            )
                            continue
                        artifacts[frame.name] = await on_artifact(
                            frame.name, frame.media_type, frame.data
                        )
                elif isinstance(frame, Exit) and follows:
                    _guest_span(sandbox_id, step, frame)
                    return StepOutcome(
                        exit_code=frame.exit_code,
                        timed_out=frame.timed_out,
                        error=frame.error,
                        output_tail=tail,
                        # The check's outcome and the result are optional; malformed, they
                        # are dropped.
                        check=_valid(CheckResult, frame.check),
                        result=_valid(StepResult, frame.result),
                        artifacts=list(artifacts.values()),
                    )
        finally:
            if guest.open.get(exec_id) is command:
                del guest.open[exec_id]
            while not command.inbox.empty():
                command.inbox.get_nowait()  # frees a read loop blocked on this full inbox

    @contextlib.asynccontextmanager
    async def channel(
        self, sandbox_id: str, kind: str, args: dict[str, Any]
    ) -> AsyncIterator[Channel]:
        """A channel open to the guest for an operation of ``kind``; GuestUnavailable if its
        guest has no live link or runs no channels."""
        guest = self._guests.get(sandbox_id)
        ws = guest.connection if guest is not None else None
        if guest is None or ws is None or guest.dead is not None:
            raise GuestUnavailable(f"the guest of sandbox {sandbox_id} is not connected")
        if not guest.runs_channels:
            raise GuestUnavailable("the sandbox's guest predates file operations")
        if guest.paused:
            raise GuestUnavailable("the machine is suspended while idle: a task wakes it")
        opened = Channel(guest, secrets.token_hex(8), ws.send)
        guest.channels[opened.id] = opened
        try:
            await ws.send(Open(opened.id, kind, args).encode())
            yield opened
        except ConnectionClosed:
            raise GuestUnavailable("the guest's link was lost") from None
        finally:
            guest.channels.pop(opened.id, None)
            guest.closed.append(opened.id)
            while not opened.inbox.empty():
                opened.inbox.get_nowait()  # frees a read loop blocked on this full inbox

    async def cancel(self, sandbox_id: str, exec_id: str) -> None:
        """Kill a command in the guest. Its exit still arrives, as for any command: a
        ``run()`` in progress for it returns the killed process's exit code."""
        guest = self._guest(sandbox_id)
        if guest.dead is not None:
            return  # nothing runs there any more
        command = guest.open.get(exec_id)
        if command is not None:
            command.cancelled = True  # sent again on re-attach, should this one be lost
        await self._send(guest, Cancel(exec_id).encode())

    async def set_clock(self, sandbox_id: str, now: float) -> None:
        """Set the guest's clock (it stood still while its machine was suspended)."""
        await self._send(self._guest(sandbox_id), Clock(now).encode())

    def last_seq(self, sandbox_id: str, exec_id: str) -> int:
        command = self._guest(sandbox_id).open.get(exec_id)
        return command.last_seq if command else 0

    def _guest(self, sandbox_id: str) -> _Guest:
        return self._guests.setdefault(sandbox_id, _Guest())

    async def _send(self, guest: _Guest, message: str) -> None:
        if guest.connection is not None:
            with contextlib.suppress(ConnectionClosed):
                await guest.connection.send(message)
        # If not connected, the message goes out when the guest comes back (see _serve).

    async def _next(self, guest: _Guest, command: _Open) -> StepFrame:
        while True:
            try:
                message = await asyncio.wait_for(command.inbox.get(), timeout=self._grace)
            except TimeoutError:
                if not (guest.connected.is_set() or guest.paused):
                    raise GuestUnavailable(
                        f"guest lost for more than {self._grace:.0f} s"
                    ) from None
                continue  # connected and quiet: a long command with no output
            if isinstance(message, _Died):
                raise SandboxDied(guest.dead or "the sandbox's machine died")
            return message

    async def _hello(self, ws: ServerConnection) -> Hello | None:
        """The connection's hello, if one comes in time and is one; counted against its
        address while it is awaited."""
        address = str(ws.remote_address[0]) if ws.remote_address else ""
        if self._pending.get(address, 0) >= MAX_PENDING_PER_ADDRESS:
            await ws.close(CLOSE_TRY_LATER, "too many connections")
            return None
        self._pending[address] = self._pending.get(address, 0) + 1
        try:
            # An oversized hello never gets here: the connection closes with 1009 first.
            hello = protocol.parse(await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT_S))
        except (TimeoutError, ConnectionClosed, ProtocolError):
            hello = None
        finally:
            self._pending[address] -= 1
            if not self._pending[address]:
                del self._pending[address]
        if not isinstance(hello, Hello):
            await ws.close(protocol.CLOSE_UNAUTHORIZED, "expected hello")
            return None
        return hello

    async def _serve(self, ws: ServerConnection) -> None:
        hello = await self._hello(ws)
        if hello is None:
            return
        sandbox_id = hello.sandbox_id
        if not any(check_guest_token(key, sandbox_id, hello.token) for key in self._keys):
            log.warning("refused guest claiming sandbox %r", sandbox_id[:LOGGED_ID_CHARS])
            await ws.close(protocol.CLOSE_UNAUTHORIZED, "bad token")
            return
        if not await self._lives(sandbox_id):
            log.warning("refused the guest of sandbox %s: it has ended", sandbox_id)
            await ws.close(protocol.CLOSE_UNAUTHORIZED, "sandbox ended")
            return
        guest = self._guest(sandbox_id)
        if guest.connection is not None:
            log.warning("refused a second link for sandbox %s", sandbox_id)
            await ws.close(CLOSE_IN_USE, "sandbox connected already")
            return
        # Before the welcome, after which the guest may send output.
        ws.protocol.max_message_size = protocol.MAX_FRAME_SIZE
        guest.connection = ws
        guest.capabilities, guest.version = _announced(hello)
        guest.runs_channels = protocol.CHANNELS in (hello.capabilities or ())
        guest.heard()
        guest.connected.set()
        log.info(
            "guest of sandbox %s connected (protocol %d, runs %s)",
            sandbox_id, guest.version, ", ".join(sorted(guest.capabilities)),
        )  # fmt: skip
        try:
            await ws.send(Welcome().encode())
            for command in list(guest.open.values()):
                await ws.send(command.exec_message())  # re-attach after a reconnect
                if command.cancelled:
                    await ws.send(Cancel(command.exec_id).encode())
            strays = 0
            async for raw in ws:
                guest.heard()
                frame = _step_frame(raw)
                if frame is None:
                    log.warning("sandbox %s sent a malformed message: cut off", sandbox_id)
                    await ws.close(CLOSE_POLICY, "malformed message")
                    break
                if isinstance(frame, Data | Close):
                    channel = guest.channels.get(frame.channel)
                    if channel is not None:
                        guest.held = channel.inbox.full()
                        await channel.inbox.put(frame)  # held back as a step's inbox is
                        guest.held = False
                        continue
                    if frame.channel in guest.closed:
                        continue
                elif (target := guest.open.get(frame.exec_id)) is not None:
                    guest.held = target.inbox.full()
                    await target.inbox.put(frame)  # blocks reading while the inbox is full
                    guest.held = False
                    guest.heard()
                    continue
                strays += 1
                if strays > MAX_STRAY_MESSAGES:
                    log.warning("sandbox %s floods messages for no command: cut off", sandbox_id)
                    await ws.close(CLOSE_POLICY, "too many messages for no command")
                    break
        except ConnectionClosed:
            pass
        finally:
            if guest.connection is ws:
                guest.connection = None
                guest.connected.clear()
                for channel in guest.channels.values():
                    if channel.inbox.full():
                        channel.inbox.get_nowait()
                    channel.inbox.put_nowait(Close(channel.id, error="the guest's link was lost"))
                log.info("guest of sandbox %s disconnected", sandbox_id)


async def _heartbeat(guest: _Guest, ws: ServerConnection) -> None:
    """One ping and its pong, which counts as hearing from the guest; a link closed first is
    no news of it."""
    with contextlib.suppress(ConnectionClosed):
        await (await ws.ping())
        guest.heard()


def _announced(hello: Hello) -> tuple[frozenset[str], int]:
    """The step kinds and protocol version a verified hello claims (those it knows)."""
    if hello.capabilities is None:
        return TERMINAL_ONLY, hello.version
    return frozenset(kind for kind in hello.capabilities if kind in STEP_KINDS), hello.version


def _step_frame(raw: str | bytes) -> StepFrame | Data | Close | None:
    """A guest's frame about a step or a channel if it is well-formed, else None: the guest
    is not trusted."""
    try:
        frame = protocol.parse(raw)
    except ProtocolError:
        return None
    return frame if isinstance(frame, Output | Artifact | Exit | Data | Close) else None


def _valid(model: type[Model], value: dict[str, Any] | None) -> Model | None:
    """``value`` as a ``model``, or None if it is not one."""
    try:
        return model.model_validate(value)
    except ValidationError:
        return None
