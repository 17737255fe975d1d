"""Providers as LangChain chat models, and the conversions between the OpenAI
chat-completions shape the proxy speaks and LangChain's messages.

``openai`` providers are ``ChatOpenAI``: OpenAI itself, or any OpenAI-compatible server
(Ollama, vLLM, llama.cpp server) through ``base_url``. ``anthropic`` ones are ``ChatAnthropic``.
The SDKs' own retries are off: the proxy is the only retry loop, so it sees every failure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, cast

import anthropic
import httpx
import openai
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_messages
from langchain_core.runnables import Runnable

from config.settings import LLMProvider, Settings
from llm.models import ChatRequest, TokenUsage
from llm.structured import forced_tool, rejects_schema, wanted_schema, without_schema

# OpenAI request fields forwarded to the provider besides the named ones of ChatRequest.
log = logging.getLogger("berth.llm")

FORWARDED = {
    "openai": ("top_p", "stop", "seed", "presence_penalty", "frequency_penalty"),
    "anthropic": ("top_p", "stop"),
}
# Anthropic's stop reasons in OpenAI's words.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


def provider_configs(settings: Settings) -> list[LLMProvider]:
    """The ordered providers: ``BERTH_LLM_PROVIDERS``, else the one that ``BERTH_LLM_MODEL``
    names (``openai:NAME``, ``anthropic:NAME``, or a bare name: ``claude-*`` is Anthropic).
    A provider without a key or URL of its own takes its kind's standard variables."""
    configs = list(settings.llm_providers)
    if not configs and settings.llm_model:
        kind, _, model = settings.llm_model.rpartition(":")
        kind = kind or ("anthropic" if model.startswith("claude") else "openai")
        if kind not in ("openai", "anthropic"):
            raise ValueError(
                f"BERTH_LLM_MODEL: unknown provider {kind!r} (use openai: or anthropic:)"
            )
        configs = [LLMProvider(name=kind, kind=cast(Any, kind), model=model)]
    return [with_defaults(config, settings) for config in configs]


def model_names(configs: list[LLMProvider]) -> list[str]:
    """What may name one provider (in a request's ``model``, a user's preference): each
    one's model and name, in order."""
    names: list[str] = []
    for config in configs:
        names += [n for n in (config.model, config.name) if n not in names]
    return names


def with_defaults(config: LLMProvider, settings: Settings) -> LLMProvider:
    if config.kind == "openai":
        key, url = settings.openai_api_key, settings.openai_base_url
    else:
        key, url = settings.anthropic_api_key, None
    return config.model_copy(
        update={"api_key": config.api_key or key, "base_url": config.base_url or url}
    )


def chat_model(config: LLMProvider, timeout_s: float) -> BaseChatModel:
    if config.kind == "anthropic":
        from langchain_anthropic import ChatAnthropic

        model: BaseChatModel = ChatAnthropic(
            model=config.model,
            api_key=config.api_key or "",
            base_url=config.base_url,
            timeout=timeout_s,
            max_retries=0,
        )
        return model
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=config.model,
        api_key=config.api_key or "not-needed",  # local servers take any key
        base_url=config.base_url,
        timeout=timeout_s,
        max_retries=0,
        stream_usage=True,
    )


@dataclass
class Answer:
    """One provider's complete answer, before accounting."""

    message: dict[str, Any]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Provider:
    config: LLMProvider
    chat: BaseChatModel
    # False once the provider refused a request for structured output (llm/structured.py):
    # it is then asked for JSON in text.
    structured: bool = True

    @property
    def name(self) -> str:
        return self.config.name

    def identity(self) -> list[str | None]:
        """What makes two providers answer alike: part of the cache key (never the key)."""
        return [self.config.kind, self.config.base_url, self.config.model]

    def params(self, request: ChatRequest) -> dict[str, Any]:
        """The generation parameters sent along with the messages."""
        params: dict[str, Any] = {
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if self.config.kind == "openai":
            params["response_format"] = request.response_format
        extras = request.model_extra or {}
        params.update({k: extras[k] for k in FORWARDED[self.config.kind] if k in extras})
        return {k: v for k, v in params.items() if v is not None}

    def runnable(self, request: ChatRequest) -> Runnable[LanguageModelInput, BaseMessage]:
        schema = wanted_schema(request)
        if schema is not None and self.config.kind == "anthropic":
            # LangChain's structured output for Anthropic: the schema as a forced tool.
            name, parameters = schema
            return self.chat.bind_tools([forced_tool(name, parameters)], tool_choice=name)
        if not request.tools:
            return self.chat
        choice = request.tool_choice
        if self.config.kind == "anthropic":
            if isinstance(choice, dict):
                choice = choice.get("function", {}).get("name")
            choice = {"required": "any", "none": None}.get(choice, choice)
        return self.chat.bind_tools(request.tools, tool_choice=choice)

    async def invoke(self, request: ChatRequest) -> Answer:
        """The provider's answer; a request for structured output it refuses is asked again
        without (and never with it again)."""
        if not self.structured:
            request = without_schema(request)
        try:
            return await self._invoke(request)
        except Exception as exc:
            if wanted_schema(request) is None or not rejects_schema(status_of(exc), str(exc)):
                raise
            log.warning(
                "LLM provider %s refused structured output; JSON in text from now on", self.name
            )
            self.structured = False
            return await self._invoke(without_schema(request))

    async def _invoke(self, request: ChatRequest) -> Answer:
        messages = convert_to_messages(request.messages)
        reply = cast(
            AIMessage, await self.runnable(request).ainvoke(messages, **self.params(request))
        )
        answer = answer_of(reply)
        if wanted_schema(request) is not None and self.config.kind == "anthropic":
            # The forced tool's input is the reply, as content (OpenAI's shape of it).
            calls = answer.message.pop("tool_calls", None) or []
            if calls:
                answer.message["content"] = calls[0]["function"]["arguments"]
            if answer.finish_reason == "tool_calls":
                answer.finish_reason = "stop"
        return answer

    async def astream(self, request: ChatRequest) -> AsyncGenerator[AIMessageChunk, None]:
        if not self.structured or self.config.kind == "anthropic":
            # Anthropic's forced tool would stream as tool calls, not the content asked for.
            request = without_schema(request)
        messages = convert_to_messages(request.messages)
        async for chunk in self.runnable(request).astream(messages, **self.params(request)):
            yield cast(AIMessageChunk, chunk)


def answer_of(reply: AIMessage) -> Answer:
    usage = reply.usage_metadata or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    return Answer(
        message=openai_message(reply),
        finish_reason=finish_reason(reply),
        prompt_tokens=usage["input_tokens"],
        completion_tokens=usage["output_tokens"],
    )


def openai_message(reply: AIMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["args"])},
            }
            for call in reply.tool_calls
        ]
    elif message["content"] is None:
        message["content"] = ""
    return message


def finish_reason(reply: AIMessage) -> str | None:
    meta = reply.response_metadata
    reason = meta.get("finish_reason") or meta.get("stop_reason")
    if reason is None and reply.tool_calls:
        return "tool_calls"
    return FINISH_REASONS.get(reason, reason) if reason else None


def usage_of(answer: Answer, cost_usd: float) -> TokenUsage:
    return TokenUsage(
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        total_tokens=answer.prompt_tokens + answer.completion_tokens,
        cost_usd=cost_usd,
    )


# ---- what a provider's failure means


def status_of(exc: BaseException) -> int | None:
    if isinstance(exc, openai.APIStatusError | anthropic.APIStatusError):
        return exc.status_code
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth trying the same provider again: a timeout, a lost connection, 408/409/429, 5xx."""
    if isinstance(
        exc,
        TimeoutError
        | httpx.TransportError
        | openai.APIConnectionError
        | anthropic.APIConnectionError,
    ):
        return True
    status = status_of(exc)
    return status is not None and (status in (408, 409, 429) or status >= 500)


def is_refusal(exc: BaseException) -> bool:
    """The provider refused the request as malformed (400, 413, 422)."""
    return status_of(exc) in (400, 413, 422)


def describe(exc: BaseException) -> str:
    """Why a provider failed, in words fit for a user: its status and the kind of error.
    The provider's own text (which may name an account or part of a key) goes to the log."""
    log.warning("LLM provider error: %s", str(exc)[:2000])
    if isinstance(exc, TimeoutError):
        return "timed out"
    status = status_of(exc)
    kind = type(exc).__name__
    return f"HTTP {status} ({kind})" if status is not None else kind
