"""The guest protocol: JSON text frames over one WebSocket that the guest opens.

Guest -> backend: ``hello`` (first frame: who it is, its token, protocol ``version`` and
``capabilities``: the step kinds it runs), ``output``, ``artifact``, ``exit``.
Backend -> guest: ``welcome``, ``exec``, ``cancel``, ``clock`` (set the machine's clock to
``time``, after a suspension: the agent does it, steps cannot).

Either way, once welcomed: ``open``, ``data``, ``close``, a channel. The backend opens one
(a person's file operation, see guest_agent/hands.py; one on the services, see
guest_agent/services.py; a tunnel to a port, see guest_agent/ports.py; a shell, see
guest_agent/shells.py) with a ``kind`` and its ``args``; each side sends the bytes it has
for it as ``data`` and ends it with ``close`` (the guest's carries the operation's
``result`` or its ``error``). A guest runs channels if its hello claims the ``channels``
capability. Channels are not steps: they do not survive a reconnect.

``exec`` carries the ``step`` as a JSON object with its ``kind`` (terminal, browser, file)
and its ``check``. A step's ``artifact`` frames (a browser step's screenshot, base64) come
before its ``exit``, which carries the ``check``'s outcome and the step's ``result``.

``exec`` is idempotent per ``exec_id``: sent again for a command the guest already knows
(after a reconnect, or by a retried activity), it re-attaches and replays output after
``after_seq`` instead of starting the command twice. Each ``output`` and ``exit`` carries
the ``after_seq`` it follows (the previous line this attachment sent, or where it started),
so the backend can tell an attachment's stream from the tail of one it replaced.

Each frame is one frozen dataclass below: a side builds its frames with them and reads the
other's with ``parse``, which refuses (ProtocolError) whatever breaks the protocol's bounds.
The wire format is what both an older guest image and a newer backend speak: a frame's keys
and their order do not change without a new PROTOCOL_VERSION. Standard library only: this
module runs inside the guest, which depends on nothing of the backend.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

PROTOCOL_VERSION = 2

HELLO = "hello"
WELCOME = "welcome"
EXEC = "exec"
CANCEL = "cancel"
CLOCK = "clock"
OUTPUT = "output"
ARTIFACT = "artifact"
EXIT = "exit"
OPEN = "open"
DATA = "data"
CLOSE = "close"

# Largest incoming frame the gateway reads before the hello is verified, and after: an
# unauthenticated peer gets no room to make the backend buffer (or log) much of anything.
MAX_HELLO_SIZE = 16 * 1024
MAX_FRAME_SIZE = 512 * 1024

# Output lines longer than this many bytes are sent in pieces: even with every byte
# JSON-escaped (``\u00XX``, 6 characters), an output frame stays under MAX_FRAME_SIZE.
MAX_OUTPUT_CHUNK = 64 * 1024

# The largest artifact a guest sends, in bytes before base64 (which adds a third): one
# artifact frame stays under MAX_FRAME_SIZE.
MAX_ARTIFACT_BYTES = 360 * 1024
# Media types an artifact may have: served as they are by the API, so nothing a browser
# would run (no HTML, no SVG).
ARTIFACT_MEDIA_TYPES = ("image/jpeg", "image/png", "text/plain", "application/octet-stream")
# Artifact names: a plain file name.
ARTIFACT_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
# A W3C traceparent (version-traceid-spanid-flags), as the backend's tracing sends it.
TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

# Texts an exit's result carries (extracted page text, a file's content) are cut to this
# many characters: they travel on in workflow payloads.
MAX_RESULT_CHARS = 8000

# An exit's error text is the guest's word: kept short.
MAX_ERROR_CHARS = 4000
# The streams an output line comes from.
STREAMS = ("stdout", "stderr")
# Capabilities a hello may claim: there are only a few step kinds.
MAX_CAPABILITIES = 10

# The most bytes one data frame carries (before base64): it stays under MAX_FRAME_SIZE.
MAX_DATA_BYTES = 256 * 1024
# Channel kinds, and how long their ids and reasons may be.
CHANNEL_KINDS = ("file", "service", "port", "pty")
CHANNELS = "channels"
MAX_CHANNEL_ID = 64

# WebSocket close code for a refused hello (bad token, unknown sandbox).
CLOSE_UNAUTHORIZED = 4401

# Exit code reported for a command killed by its timeout, as coreutils' timeout(1) does.
EXIT_TIMED_OUT = 124


class ProtocolError(ValueError):
    """A frame that is not one of the protocol's, or breaks its bounds: the peer is not
    trusted, so nothing of it is taken."""


@dataclass(frozen=True)
class Frame(ABC):
    """One text frame; its ``TYPE`` is the ``type`` key it travels under."""

    TYPE: ClassVar[str]

    @abstractmethod
    def body(self) -> dict[str, Any]:
        """The frame's keys after ``type``, in the order they go on the wire."""

    def encode(self) -> str:
        return json.dumps({"type": self.TYPE, **self.body()})


@dataclass(frozen=True)
class Hello(Frame):
    """The guest's first frame: which sandbox it serves, its token, and what it runs.

    ``capabilities`` None: a guest that predates them (it runs terminal steps only)."""

    TYPE: ClassVar[str] = HELLO
    sandbox_id: str
    token: str
    version: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] | None = None

    def body(self) -> dict[str, Any]:
        head = {"version": self.version, "sandbox_id": self.sandbox_id, "token": self.token}
        return head if self.capabilities is None else {**head, "capabilities": [*self.capabilities]}


@dataclass(frozen=True)
class Welcome(Frame):
    """The gateway took the hello: the guest may send its steps' frames."""

    TYPE: ClassVar[str] = WELCOME

    def body(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Exec(Frame):
    """Run ``step`` (a step's JSON object, checked by the backend) as ``exec_id``, or
    re-attach to it, replaying output after ``after_seq``."""

    TYPE: ClassVar[str] = EXEC
    exec_id: str
    step: dict[str, Any]
    timeout_s: float
    after_seq: int = 0
    # The step's span (a W3C traceparent) when the backend traces; a guest may ignore it:
    # the span of its execution is recorded by the host from the exit's times.
    trace: str | None = None

    def body(self) -> dict[str, Any]:
        return {
            "exec_id": self.exec_id,
            "step": self.step,
            "timeout_s": self.timeout_s,
            "after_seq": self.after_seq,
            **({"trace": self.trace} if self.trace else {}),
        }


@dataclass(frozen=True)
class Cancel(Frame):
    """Kill the step ``exec_id``; its exit still comes."""

    TYPE: ClassVar[str] = CANCEL
    exec_id: str

    def body(self) -> dict[str, Any]:
        return {"exec_id": self.exec_id}


@dataclass(frozen=True)
class Clock(Frame):
    """Set the machine's clock to ``time`` (seconds since the epoch)."""

    TYPE: ClassVar[str] = CLOCK
    time: float

    def body(self) -> dict[str, Any]:
        return {"time": self.time}


# The frames about a step that a guest sends (after its hello) carry the ``after_seq`` they
# follow; None: a guest that predates it (the key is absent), taken at its word.


@dataclass(frozen=True)
class Output(Frame):
    """Line ``seq`` of a step's output (or a piece of one: see MAX_OUTPUT_CHUNK)."""

    TYPE: ClassVar[str] = OUTPUT
    exec_id: str
    seq: int
    stream: str
    text: str
    after_seq: int | None = None

    def body(self) -> dict[str, Any]:
        head = {"exec_id": self.exec_id, "seq": self.seq}
        return {**head, **_after(self.after_seq), "stream": self.stream, "text": self.text}


@dataclass(frozen=True)
class Artifact(Frame):
    """A file a step left (a screenshot); ``data`` travels in base64."""

    TYPE: ClassVar[str] = ARTIFACT
    exec_id: str
    name: str
    media_type: str
    data: bytes
    after_seq: int | None = None

    def body(self) -> dict[str, Any]:
        return {
            "exec_id": self.exec_id,
            "name": self.name,
            "media_type": self.media_type,
            "data": base64.b64encode(self.data).decode(),
            **_after(self.after_seq),
        }


@dataclass(frozen=True)
class Exit(Frame):
    """A step's end. ``check`` (the check's outcome) and ``result`` are JSON objects the
    backend validates with its own models; anything else in their place is dropped."""

    TYPE: ClassVar[str] = EXIT
    exec_id: str
    exit_code: int
    timed_out: bool
    error: str | None = None
    check: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    after_seq: int | None = None
    # When the guest began and finished running it (its wall clock, seconds since the
    # epoch; kept in step by the host's Clock frames): the host's span of the execution.
    started: float | None = None
    ended: float | None = None

    def body(self) -> dict[str, Any]:
        times = {} if self.started is None or self.ended is None else {
            "started": self.started, "ended": self.ended
        }  # fmt: skip
        return {
            "exec_id": self.exec_id,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "error": self.error,
            "check": self.check,
            "result": self.result,
            **_after(self.after_seq),
            **times,
        }


@dataclass(frozen=True)
class Open(Frame):
    """Open channel ``channel`` for an operation of ``kind`` with ``args`` (JSON)."""

    TYPE: ClassVar[str] = OPEN
    channel: str
    kind: str
    args: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {"channel": self.channel, "kind": self.kind, "args": self.args}


@dataclass(frozen=True)
class Data(Frame):
    """Bytes of a channel, in order."""

    TYPE: ClassVar[str] = DATA
    channel: str
    data: bytes

    def body(self) -> dict[str, Any]:
        return {"channel": self.channel, "data": base64.b64encode(self.data).decode()}


@dataclass(frozen=True)
class Close(Frame):
    """The end of a channel: no more data from this side; the guest's says how its
    operation went (``error`` None: done, with its ``result``)."""

    TYPE: ClassVar[str] = CLOSE
    channel: str
    error: str | None = None
    result: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        return {"channel": self.channel, "error": self.error, "result": self.result}


ChannelFrame = Open | Data | Close
# What a guest may send once welcomed: its steps' frames, and its channels'.
StepFrame = Output | Artifact | Exit


def parse(raw: str | bytes) -> Frame:
    """The frame ``raw`` holds, within the protocol's bounds; else ProtocolError."""
    try:
        message = json.loads(raw)
    except ValueError:
        raise ProtocolError("not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    kind = message.get("type")
    reader = _READERS.get(kind) if isinstance(kind, str) else None
    if reader is None:
        raise ProtocolError(f"unknown frame type {str(kind)[:40]!r}")
    return reader(message)


def _hello(message: dict[str, Any]) -> Hello:
    version, claimed = message.get("version"), message.get("capabilities")
    return Hello(
        sandbox_id=_str(message, "sandbox_id"),
        token=_str(message, "token"),
        # A guest that predates versions speaks the first.
        version=version if isinstance(version, int) else 1,
        # A few names at most: the gateway keeps those it knows.
        capabilities=(
            tuple(kind for kind in claimed[:MAX_CAPABILITIES] if isinstance(kind, str))
            if isinstance(claimed, list)
            else None
        ),
    )


def _exec(message: dict[str, Any]) -> Exec:
    step = message.get("step")
    if not isinstance(step, dict):
        raise ProtocolError("exec without a step")
    after = _after_seq(message)
    return Exec(
        exec_id=_str(message, "exec_id"),
        step=step,
        timeout_s=_number(message, "timeout_s"),
        after_seq=0 if after is None else after,
        trace=_traceparent(message.get("trace")),
    )


def _output(message: dict[str, Any]) -> Output:
    if message.get("stream") not in STREAMS:
        raise ProtocolError("output on no known stream")
    return Output(
        exec_id=_str(message, "exec_id"),
        seq=_int(message, "seq"),
        stream=message["stream"],
        text=_str(message, "text"),
        after_seq=_after_seq(message),
    )


def _artifact(message: dict[str, Any]) -> Artifact:
    name, media_type = _str(message, "name"), message.get("media_type")
    if not re.fullmatch(ARTIFACT_NAME, name):
        raise ProtocolError("artifact name is not a plain file name")
    if media_type not in ARTIFACT_MEDIA_TYPES:
        raise ProtocolError("artifact of a media type not served")
    try:
        data = base64.b64decode(_str(message, "data"), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("artifact data is not base64") from None
    if len(data) > MAX_ARTIFACT_BYTES:
        raise ProtocolError("artifact too large")
    return Artifact(
        exec_id=_str(message, "exec_id"),
        name=name,
        media_type=media_type,
        data=data,
        after_seq=_after_seq(message),
    )


def _exit(message: dict[str, Any]) -> Exit:
    timed_out, error = message.get("timed_out"), message.get("error")
    if not isinstance(timed_out, bool):
        raise ProtocolError("exit without timed_out")
    if error is not None and not isinstance(error, str):
        raise ProtocolError("exit error is not text")
    check, result = message.get("check"), message.get("result")
    return Exit(
        exec_id=_str(message, "exec_id"),
        exit_code=_int(message, "exit_code"),
        timed_out=timed_out,
        error=None if error is None else error[:MAX_ERROR_CHARS],
        check=check if isinstance(check, dict) else None,
        result=result if isinstance(result, dict) else None,
        after_seq=_after_seq(message),
        started=_time(message.get("started")),
        ended=_time(message.get("ended")),
    )


def _open(message: dict[str, Any]) -> Open:
    kind, args = message.get("kind"), message.get("args")
    if kind not in CHANNEL_KINDS:
        raise ProtocolError("open of no known kind")
    if not isinstance(args, dict):
        raise ProtocolError("open without args")
    return Open(channel=_channel(message), kind=kind, args=args)


def _data(message: dict[str, Any]) -> Data:
    try:
        data = base64.b64decode(_str(message, "data"), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("data is not base64") from None
    if len(data) > MAX_DATA_BYTES:
        raise ProtocolError("data frame too large")
    return Data(channel=_channel(message), data=data)


def _close(message: dict[str, Any]) -> Close:
    error, result = message.get("error"), message.get("result")
    if error is not None and not isinstance(error, str):
        raise ProtocolError("close error is not text")
    return Close(
        channel=_channel(message),
        error=None if error is None else error[:MAX_ERROR_CHARS],
        result=result if isinstance(result, dict) else None,
    )


def _channel(message: dict[str, Any]) -> str:
    channel = _str(message, "channel")
    if not 0 < len(channel) <= MAX_CHANNEL_ID:
        raise ProtocolError("channel id of a bad length")
    return channel


_READERS: dict[str, Callable[[dict[str, Any]], Frame]] = {
    HELLO: _hello,
    WELCOME: lambda message: Welcome(),
    EXEC: _exec,
    CANCEL: lambda message: Cancel(exec_id=_str(message, "exec_id")),
    CLOCK: lambda message: Clock(time=_number(message, "time")),
    OUTPUT: _output,
    ARTIFACT: _artifact,
    EXIT: _exit,
    OPEN: _open,
    DATA: _data,
    CLOSE: _close,
}


def _str(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{key} is not text")
    return value


def _int(message: dict[str, Any], key: str) -> int:
    value = message.get(key)
    if not isinstance(value, int):
        raise ProtocolError(f"{key} is not an integer")
    return value


def _number(message: dict[str, Any], key: str) -> float:
    value = message.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"{key} is not a number")
    return value


def _after_seq(message: dict[str, Any]) -> int | None:
    return None if "after_seq" not in message else _int(message, "after_seq")


def _traceparent(value: Any) -> str | None:
    """A W3C traceparent, or None for anything else (it is only ever passed on)."""
    return value if isinstance(value, str) and TRACEPARENT.fullmatch(value) else None


def _time(value: Any) -> float | None:
    """A time in seconds since the epoch, or None for anything else (a span is left out)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _after(after_seq: int | None) -> dict[str, int]:
    return {} if after_seq is None else {"after_seq": after_seq}
