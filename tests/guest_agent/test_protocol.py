"""The guest protocol's frames: each round-trips, malformed ones are refused, and each
encodes to exactly the JSON an older guest or backend speaks (the golden frames below: a
change to them is a change of the wire, which needs a new PROTOCOL_VERSION)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from guest_agent import protocol
from guest_agent.protocol import (
    Artifact,
    Cancel,
    Clock,
    Close,
    Data,
    Exec,
    Exit,
    Frame,
    Hello,
    Open,
    Output,
    ProtocolError,
    Welcome,
)

STEP = {"kind": "terminal", "command": "echo hi", "cwd": None, "check": None}
CHECK = {"kind": "exit_code", "ok": True, "detail": "exit code 0"}
PNG = b"\x89PNG\r\n\x1a\n-a-screenshot"
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

# Each frame beside the JSON (keys in wire order) it travels as.
GOLDEN: list[tuple[Frame, dict[str, Any]]] = [
    (
        Hello(sandbox_id="sbx-1", token="t0k", capabilities=("terminal", "file")),
        {
            "type": "hello",
            "version": 2,
            "sandbox_id": "sbx-1",
            "token": "t0k",
            "capabilities": ["terminal", "file"],
        },
    ),
    (Welcome(), {"type": "welcome"}),
    (
        Exec(exec_id="e-1", step=STEP, timeout_s=30.0, after_seq=4),
        {"type": "exec", "exec_id": "e-1", "step": STEP, "timeout_s": 30.0, "after_seq": 4},
    ),
    (
        Exec(exec_id="e-1", step=STEP, timeout_s=30.0, trace=TRACE),
        {
            "type": "exec",
            "exec_id": "e-1",
            "step": STEP,
            "timeout_s": 30.0,
            "after_seq": 0,
            "trace": TRACE,
        },
    ),
    (Cancel(exec_id="e-1"), {"type": "cancel", "exec_id": "e-1"}),
    (Clock(time=1767225600.25), {"type": "clock", "time": 1767225600.25}),
    (
        Output(exec_id="e-1", seq=5, stream="stderr", text="oops\n", after_seq=4),
        {
            "type": "output",
            "exec_id": "e-1",
            "seq": 5,
            "after_seq": 4,
            "stream": "stderr",
            "text": "oops\n",
        },
    ),
    (
        Artifact(
            exec_id="e-1", name="screenshot.png", media_type="image/png", data=PNG, after_seq=5
        ),
        {
            "type": "artifact",
            "exec_id": "e-1",
            "name": "screenshot.png",
            "media_type": "image/png",
            "data": base64.b64encode(PNG).decode(),
            "after_seq": 5,
        },
    ),
    (
        Exit(
            exec_id="e-1",
            exit_code=0,
            timed_out=False,
            error=None,
            check=CHECK,
            result={"content": "hi"},
            after_seq=5,
        ),
        {
            "type": "exit",
            "exec_id": "e-1",
            "exit_code": 0,
            "timed_out": False,
            "error": None,
            "check": CHECK,
            "result": {"content": "hi"},
            "after_seq": 5,
        },
    ),
    (
        Exit(exec_id="e-1", exit_code=1, timed_out=False, started=1767225600.5, ended=1767225601.0),
        {
            "type": "exit",
            "exec_id": "e-1",
            "exit_code": 1,
            "timed_out": False,
            "error": None,
            "check": None,
            "result": None,
            "started": 1767225600.5,
            "ended": 1767225601.0,
        },
    ),
    # Channels (a person's operations): new frames, which a guest claims with "channels".
    (
        Open(channel="c1", kind="file", args={"op": "list", "path": "."}),
        {"type": "open", "channel": "c1", "kind": "file", "args": {"op": "list", "path": "."}},
    ),
    (
        Data(channel="c1", data=b"a,b\n"),
        {"type": "data", "channel": "c1", "data": base64.b64encode(b"a,b\n").decode()},
    ),
    (
        Close(channel="c1", error=None, result={"size": 4}),
        {"type": "close", "channel": "c1", "error": None, "result": {"size": 4}},
    ),
]


def test_every_frame_type_has_a_golden_frame() -> None:
    assert {type(frame) for frame, _ in GOLDEN} == set(Frame.__subclasses__())


@pytest.mark.parametrize(("frame", "wire"), GOLDEN, ids=lambda x: getattr(x, "TYPE", ""))
def test_a_frame_encodes_to_todays_json(frame: Frame, wire: dict[str, Any]) -> None:
    # The text itself, key order included: what an older peer reads.
    assert frame.encode() == json.dumps(wire)


@pytest.mark.parametrize(("frame", "wire"), GOLDEN, ids=lambda x: getattr(x, "TYPE", ""))
def test_a_frame_round_trips(frame: Frame, wire: dict[str, Any]) -> None:
    assert protocol.parse(frame.encode()) == frame
    assert protocol.parse(json.dumps(wire).encode()) == frame  # bytes as well as text


def test_an_older_guests_frames_are_taken_as_they_come() -> None:
    # Before versions and capabilities: version 1, terminal steps only (the gateway's call).
    hello = protocol.parse(json.dumps({"type": "hello", "sandbox_id": "s", "token": "t"}))
    assert hello == Hello(sandbox_id="s", token="t", version=1, capabilities=None)
    assert json.loads(hello.encode()) == {
        "type": "hello", "version": 1, "sandbox_id": "s", "token": "t",
    }  # fmt: skip
    # Before after_seq: the frame carries None, and encodes without it.
    line = {"type": "output", "exec_id": "e", "seq": 1, "stream": "stdout", "text": "x"}
    output = protocol.parse(json.dumps(line))
    assert output == Output("e", 1, "stdout", "x", after_seq=None)
    assert json.loads(output.encode()) == line
    exit_ = protocol.parse(json.dumps({"type": "exit", "exec_id": "e", "exit_code": 0,
                                       "timed_out": False}))  # fmt: skip
    assert exit_ == Exit("e", 0, False)
    # An exec without after_seq replays from the start.
    exec_ = protocol.parse(json.dumps({"type": "exec", "exec_id": "e", "step": {}, "timeout_s": 5}))
    assert exec_ == Exec("e", {}, 5, after_seq=0)


def test_a_malformed_trace_or_time_is_dropped_not_refused() -> None:
    # Both only feed a span: a frame is never refused for them, the span is left out.
    exec_ = protocol.parse(json.dumps({"type": "exec", "exec_id": "e", "step": {},
                                       "timeout_s": 5, "trace": "00-not-a-trace"}))  # fmt: skip
    assert exec_ == Exec("e", {}, 5)
    for started in ("noon", True, -1, float("nan")):
        exit_ = protocol.parse(json.dumps({"type": "exit", "exec_id": "e", "exit_code": 0,
                                           "timed_out": False, "started": started,
                                           "ended": 5.0}))  # fmt: skip
        assert isinstance(exit_, Exit) and exit_.started is None and exit_.ended == 5.0


def test_a_hello_claims_a_few_capabilities_at_most() -> None:
    claimed = ["terminal", 7, None, *(f"kind{i}" for i in range(20))]
    hello = protocol.parse(json.dumps({"type": "hello", "sandbox_id": "s", "token": "t",
                                       "capabilities": claimed, "version": "2"}))  # fmt: skip
    assert isinstance(hello, Hello) and hello.version == 1
    assert hello.capabilities == ("terminal", *(f"kind{i}" for i in range(7)))
    not_a_list = protocol.parse(json.dumps({"type": "hello", "sandbox_id": "s", "token": "t",
                                            "capabilities": "terminal"}))  # fmt: skip
    assert isinstance(not_a_list, Hello) and not_a_list.capabilities is None


def test_an_exits_error_is_cut_and_its_malformed_check_and_result_dropped() -> None:
    error = "x" * (protocol.MAX_ERROR_CHARS + 10)
    long = {"type": "exit", "exec_id": "e", "exit_code": 1, "timed_out": True, "error": error,
            "check": ["no"], "result": "no"}  # fmt: skip
    exit_ = protocol.parse(json.dumps(long))
    assert exit_ == Exit("e", 1, True, error="x" * protocol.MAX_ERROR_CHARS)


OUTPUT = {"type": "output", "exec_id": "e", "seq": 1, "after_seq": 0, "stream": "stdout",
          "text": "x"}  # fmt: skip
EXIT = {"type": "exit", "exec_id": "e", "exit_code": 0, "timed_out": False, "error": None,
        "check": None, "result": None, "after_seq": 0}  # fmt: skip
ARTIFACT = {"type": "artifact", "exec_id": "e", "name": "shot.png", "media_type": "image/png",
            "data": base64.b64encode(b"png").decode(), "after_seq": 0}  # fmt: skip
EXEC = {"type": "exec", "exec_id": "e", "step": STEP, "timeout_s": 5.0, "after_seq": 0}
HELLO = {"type": "hello", "version": 2, "sandbox_id": "s", "token": "t", "capabilities": []}

MALFORMED: list[Any] = [
    "not json",
    json.dumps(["a list"]),
    json.dumps("a string"),
    json.dumps({"exec_id": "e"}),  # no type
    json.dumps({"type": "who knows", "exec_id": "e"}),
    json.dumps({"type": ["output"], "exec_id": "e"}),
    json.dumps({**OUTPUT, "seq": "1"}),
    json.dumps({**OUTPUT, "stream": "stdin"}),
    json.dumps({**OUTPUT, "text": None}),
    json.dumps({k: v for k, v in OUTPUT.items() if k != "exec_id"}),
    json.dumps({**OUTPUT, "exec_id": 7}),
    json.dumps({**OUTPUT, "after_seq": None}),
    json.dumps({**OUTPUT, "after_seq": 1.5}),
    json.dumps({**EXIT, "exit_code": None}),
    json.dumps({**EXIT, "timed_out": 0}),
    json.dumps({**EXIT, "error": 1}),
    json.dumps({k: v for k, v in EXIT.items() if k != "exec_id"}),
    json.dumps({**ARTIFACT, "name": "../etc/passwd"}),
    json.dumps({**ARTIFACT, "name": ".hidden"}),
    json.dumps({**ARTIFACT, "name": "x" * 101}),
    json.dumps({**ARTIFACT, "name": 5}),
    json.dumps({**ARTIFACT, "media_type": "text/html"}),
    json.dumps({**ARTIFACT, "media_type": "image/svg+xml"}),
    json.dumps({**ARTIFACT, "data": "not base64!"}),
    json.dumps({**ARTIFACT, "data": 5}),
    json.dumps(
        {**ARTIFACT, "data": base64.b64encode(b"x" * (protocol.MAX_ARTIFACT_BYTES + 1)).decode()}
    ),
    json.dumps({k: v for k, v in EXEC.items() if k != "exec_id"}),
    json.dumps({**EXEC, "step": "ls"}),
    json.dumps({**EXEC, "timeout_s": "5"}),
    json.dumps({**EXEC, "timeout_s": True}),
    json.dumps({"type": "cancel"}),
    json.dumps({"type": "clock", "time": "now"}),
    json.dumps({**HELLO, "sandbox_id": None}),
    json.dumps({k: v for k, v in HELLO.items() if k != "token"}),
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_a_malformed_frame_is_refused(raw: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse(raw)


def test_the_largest_artifact_is_taken() -> None:
    data = b"x" * protocol.MAX_ARTIFACT_BYTES
    frame = protocol.parse(json.dumps({**ARTIFACT, "data": base64.b64encode(data).decode()}))
    assert isinstance(frame, Artifact) and frame.data == data
    assert len(frame.encode()) < protocol.MAX_FRAME_SIZE
