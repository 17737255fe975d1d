"""A scripted LLM server on loopback, for tests and benchmarks: OpenAI's
``/v1/chat/completions`` and Anthropic's ``/v1/messages``, streaming or not. Each request
takes the next scripted reply (or the default one) and is kept for the test to inspect."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, Self


@dataclass
class Reply:
    content: str = ""
    # OpenAI-shaped: [{"id", "name", "arguments" (a JSON string)}]
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    status: int = 200  # anything else answers with an error body of that status
    error: str = "scripted failure"  # the error body's message
    hang_s: float = 0.0  # wait this long before answering
    cut_after: int | None = None  # streaming: drop the connection after this many chunks
    prompt_tokens: int = 10
    completion_tokens: int = 5


# Decides the reply to a request from its body, instead of a list of replies.
Script = Callable[[dict[str, Any]], str | Reply]
# What the server does with structured output (OpenAI's response_format json_schema):
# "any" answers with or without it; "required" refuses a request without it (a server that
# only answers schema-constrained requests); "refused" refuses one with it (a server
# without structured output).
Structured = Literal["any", "required", "refused"]


class ScriptedLLM(ThreadingHTTPServer):
    def __init__(
        self,
        *replies: Reply | str,
        default: Reply | str | None = None,
        script: Script | None = None,
        structured: Structured = "any",
        port: int = 0,
    ) -> None:
        self.structured = structured
        self.replies = [Reply(r) if isinstance(r, str) else r for r in replies]
        self.default = Reply(default) if isinstance(default, str) else default
        self.script = script
        self.requests: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def settings(self) -> dict[str, str]:
        """The environment that makes a system's planner this server."""
        return {
            "BERTH_LLM_MODEL": "openai:scripted",
            "OPENAI_BASE_URL": f"{self.url}/v1",
            "OPENAI_API_KEY": "sk-scripted",
        }

    def next_reply(self, body: dict[str, Any]) -> Reply:
        schema = (body.get("response_format") or {}).get("type") == "json_schema"
        if self.structured == "required" and not schema:
            return Reply(status=400, error="this server requires response_format json_schema")
        if self.structured == "refused" and schema:
            return Reply(status=400, error="response_format json_schema is not supported")
        if self.script is not None:
            reply = self.script(body)
            return Reply(reply) if isinstance(reply, str) else reply
        if self.replies:
            return self.replies.pop(0)
        if self.default is None:
            raise AssertionError("the scripted server got a request it has no reply for")
        return self.default

    def __enter__(self) -> Self:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedLLM
    protocol_version = "HTTP/1.1"  # keep-alive, as real providers
    # Headers and body are separate writes: with Nagle's algorithm the body waits for the
    # client's delayed ACK of the headers (40 ms).
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("x-api-key") or self.headers.get("Authorization")
        self.server.requests.append({"path": self.path, "body": body, "auth": auth})
        reply = self.server.next_reply(body)
        if reply.hang_s:
            time.sleep(reply.hang_s)
        if reply.status != 200:
            return self.send_json({"error": {"message": reply.error}}, reply.status)
        anthropic = self.path.endswith("/messages")
        if not body.get("stream"):
            shape = anthropic_message if anthropic else openai_completion
            return self.send_json(shape(body["model"], reply))
        events = anthropic_events(body["model"], reply) if anthropic else openai_chunks(body, reply)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for sent, (name, data) in enumerate(events):
            if reply.cut_after is not None and sent >= reply.cut_after:
                self.close_connection = True
                return  # the connection drops mid-answer
            head = f"event: {name}\n" if name else ""
            self.wfile.write(f"{head}data: {json.dumps(data) if data else '[DONE]'}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True

    def send_json(self, data: dict[str, Any], status: int = 200) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def _usage(reply: Reply) -> dict[str, int]:
    total = reply.prompt_tokens + reply.completion_tokens
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": total,
    }


def _pieces(text: str) -> list[str]:
    """The text in word-sized pieces that join back into it."""
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]] if text else []


def _calls(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]},
        }
        for c in reply.tool_calls
    ]


def openai_completion(model: str, reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
    if reply.tool_calls:
        message["tool_calls"] = _calls(reply)
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
            }
        ],
        "usage": _usage(reply),
    }


def openai_chunks(body: dict[str, Any], reply: Reply) -> list[tuple[str, dict[str, Any] | None]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[str, dict[str, Any]]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        data = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0,
                "model": body["model"], "choices": [choice]}  # fmt: skip
        return "", data

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in _pieces(reply.content)]
    for index, call in enumerate(reply.tool_calls):
        head = {"index": index, "id": call["id"], "type": "function",
                "function": {"name": call["name"], "arguments": ""}}  # fmt: skip
        chunks.append(chunk({"tool_calls": [head]}))
        half = len(call["arguments"]) // 2
        for part in (call["arguments"][:half], call["arguments"][half:]):
            chunks.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
            )
    chunks.append(chunk({}, "tool_calls" if reply.tool_calls else "stop"))
    if body.get("stream_options", {}).get("include_usage"):
        usage = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0,
                 "model": body["model"], "choices": [], "usage": _usage(reply)}  # fmt: skip
        chunks.append(("", usage))
    return [*chunks, ("", None)]


def anthropic_message(model: str, reply: Reply) -> dict[str, Any]:
    content: list[dict[str, Any]] = (
        [{"type": "text", "text": reply.content}] if reply.content else []
    )
    content += [
        {"type": "tool_use", "id": c["id"], "name": c["name"], "input": json.loads(c["arguments"])}
        for c in reply.tool_calls
    ]
    return {
        "id": "msg_scripted",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "tool_use" if reply.tool_calls else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens},
    }


def anthropic_events(model: str, reply: Reply) -> list[tuple[str, dict[str, Any] | None]]:
    """Text only: what the tests stream through Anthropic."""
    start = {**anthropic_message(model, Reply()), "content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": reply.prompt_tokens, "output_tokens": 0}
    events: list[tuple[str, dict[str, Any] | None]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
    ]  # fmt: skip
    for piece in _pieces(reply.content):
        delta = {"type": "text_delta", "text": piece}
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"input_tokens": reply.prompt_tokens,
                                     "output_tokens": reply.completion_tokens}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    return events


def main() -> None:
    """``python -m tests.support.scripted_llm PORT REPLY``: serve REPLY to every request (benchmarks
    run it in a process of its own, so it does not share a CPU's time with its clients)."""
    import sys

    ScriptedLLM(default=sys.argv[2], port=int(sys.argv[1])).serve_forever()


if __name__ == "__main__":
    main()
