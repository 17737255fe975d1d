"""Structured output: a reply held to a JSON schema by the provider itself.

A request asks for it as OpenAI does, ``response_format: {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}``. Each provider gets it its own way, through
LangChain's bindings (what ``with_structured_output`` uses underneath): ``openai`` providers
(OpenAI, and OpenAI-compatible servers such as vLLM, llama.cpp or Ollama) are sent the
``response_format`` as it is; ``anthropic`` ones a forced tool whose ``input_schema`` is the
schema, whose input comes back as the reply's content, as OpenAI would give it.

A server without it refuses such a request (400 naming response_format, or the tool); the
provider is then asked again without the schema, the reply being JSON in its text as the
prompt asks, and it is remembered for the process not to ask it so again.
"""

from __future__ import annotations

from typing import Any

from llm.models import ChatRequest

# Words a provider's refusal names when the schema is what it refused (OpenAI, vLLM,
# llama.cpp, Ollama, LiteLLM and Anthropic word it in these terms).
SCHEMA_WORDS = ("response_format", "json_schema", "structured", "tool", "schema")


def json_schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``response_format`` that holds a reply to ``schema`` (strict: every
    property required, none other allowed)."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def wanted_schema(request: ChatRequest) -> tuple[str, dict[str, Any]] | None:
    """The name and schema a request holds its reply to, if it asks for one."""
    form = request.response_format or {}
    if form.get("type") != "json_schema":
        return None
    spec = form.get("json_schema") or {}
    if not isinstance(spec.get("schema"), dict):
        return None
    return str(spec.get("name") or "reply"), spec["schema"]


def forced_tool(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as the one tool a model must call (Anthropic's way to structured output)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": "Give your reply as this tool's input.",
            "parameters": schema,
        },
    }


def without_schema(request: ChatRequest) -> ChatRequest:
    """The request asking for JSON in the reply's text instead."""
    return request.model_copy(update={"response_format": None})


def rejects_schema(status: int | None, message: str) -> bool:
    """Whether a provider's refusal is of the structured output it was asked for."""
    text = message.lower()
    return status in (400, 422, 501) and any(word in text for word in SCHEMA_WORDS)
