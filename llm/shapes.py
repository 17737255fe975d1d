"""The OpenAI chat-completions wire shapes: a whole completion, and stream chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from langchain_core.messages import AIMessageChunk

from llm.models import ChatResult, TokenUsage


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_dict(usage: TokenUsage) -> dict[str, int]:
    return usage.model_dump(exclude={"cost_usd"})


def completion(result: ChatResult) -> dict[str, Any]:
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": result.message,
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_dict(result.usage),
    }


class Chunks:
    """Stream chunks of one completion: same id, creation time and model in each."""

    def __init__(self, model: str) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model = model
        # Tool calls are numbered in the order they come; providers number content blocks.
        self.tool_index: dict[Any, int] = {}

    def chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        usage: TokenUsage | None = None,
    ) -> dict[str, Any]:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage:
            chunk["usage"] = usage_dict(usage)
        return chunk

    def delta(self, piece: AIMessageChunk, first: bool) -> dict[str, Any] | None:
        """The delta of a provider's chunk; None when it carries nothing to pass on."""
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if piece.text:
            delta["content"] = piece.text
        calls = []
        for call in piece.tool_call_chunks:
            index = self.tool_index.setdefault(call.get("index"), len(self.tool_index))
            out: dict[str, Any] = {"index": index}
            if call.get("id"):
                out["id"], out["type"] = call["id"], "function"
            function = {"name": call.get("name"), "arguments": call.get("args")}
            out["function"] = {k: v for k, v in function.items() if v is not None}
            calls.append(out)
        if calls:
            delta["tool_calls"] = calls
        return delta or None

    def replay(self, result: ChatResult) -> Iterator[dict[str, Any]]:
        """A finished result as a stream: what a cache hit sends to a streaming client."""
        delta: dict[str, Any] = {"role": "assistant", "content": result.message.get("content")}
        if result.message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(result.message["tool_calls"])
            ]
        yield self.chunk(delta)
        yield self.chunk({}, result.finish_reason)
        yield self.chunk({}, usage=result.usage)
