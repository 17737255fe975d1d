"""Counting a request's tokens before it is sent, per provider: exactly for OpenAI's models
(their BPE tables, from the ``bpe-openai`` package, which ships them: nothing is downloaded),
else a safe estimate (fewer characters per token than any common tokenizer averages, so it
counts high). What a planning call may hold is the model's context window
(``context_tokens`` of its provider) less room for the reply.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import bpe_openai

from config.settings import LLMProvider

# Characters per token where the tokenizer is unknown: English averages about 4 with the
# common BPE tokenizers, code and JSON about 3; 3 errs on the safe side.
CHARS_PER_TOKEN = 3.0
# What each message costs besides its text (role, separators), as OpenAI counts it.
PER_MESSAGE = 4
# The reply's share of the window, at most this many tokens.
REPLY_TOKENS = 4096


class Encoding(Protocol):
    def encode(self, text: str) -> list[int]: ...


@functools.cache
def encoding(model: str) -> Encoding | None:
    """The model's tokenizer, if it is one of OpenAI's the package knows."""
    try:
        found: Encoding = bpe_openai.encoding_for_model(model)
    except bpe_openai.UnsupportedModelError:
        return None
    return found


def count_text(config: LLMProvider, text: str) -> int:
    exact = encoding(config.model) if config.kind == "openai" else None
    if exact is None:
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    return len(exact.encode(text))


def count_messages(config: LLMProvider, messages: list[dict[str, Any]]) -> int:
    """The prompt tokens of chat messages, as the provider would count them (or more)."""
    return sum(PER_MESSAGE + count_text(config, str(m.get("content") or "")) for m in messages)


def prompt_budget(config: LLMProvider) -> int:
    """The most prompt tokens a call to the provider should carry: its window less the
    reply's room."""
    return config.context_tokens - min(config.context_tokens // 4, REPLY_TOKENS)
