"""A scripted OpenAI-compatible chat server on loopback: the real HTTP path of every LLM
client, with replies the test decides."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Decides the reply (the assistant's text) to a request's body.
Script = Callable[[dict[str, Any]], str]


class ScriptedLLM(ThreadingHTTPServer):
    """Answers POST /v1/chat/completions with ``script(body)``, or else with the next of
    ``replies``; keeps every request."""

    def __init__(self, replies: list[str] | None = None, script: Script | None = None) -> None:
        self.replies = replies if replies is not None else []
        self.script = script
        self.requests: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def reply_to(self, body: dict[str, Any]) -> str:
        return self.script(body) if self.script else self.replies.pop(0)


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedLLM

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            {"path": self.path, "body": body, "auth": self.headers["Authorization"]}
        )
        reply = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.server.reply_to(body)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def scripted_llm(
    replies: list[str] | None = None, script: Script | None = None
) -> Iterator[ScriptedLLM]:
    server = ScriptedLLM(replies, script)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
