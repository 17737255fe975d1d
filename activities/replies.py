"""The shapes of the planner's and the verifier's replies: JSON schemas the providers hold
them to (structured output, strict: every property required, null where it does not
apply), and their parsing into steps and verdicts, with an error that says exactly what
does not fit (it is sent back to the model once to repair its reply).
"""

from __future__ import annotations

import json
import re
from typing import Any, get_args

from pydantic import BaseModel, ValidationError, field_validator

from activities.models import MAX_PLAN_STEPS, TaskVerdict
from sandboxes.models import STEP_KINDS, BrowserAction, CheckKind, Step

PLAN_SCHEMA_NAME = "plan"
VERDICT_SCHEMA_NAME = "verdict"


def _nullable(kind: str, **more: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **more}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    # anyOf, the form of an optional enum or object every strict mode reads.
    return {"anyOf": [schema, {"type": "null"}]}


def _enum(*values: str) -> dict[str, Any]:
    return _or_null({"type": "string", "enum": list(values)})


CHECK_SCHEMA = _or_null(
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["kind", "value"],
        "properties": {
            "kind": {"type": "string", "enum": list(get_args(CheckKind))},
            "value": {"type": "string"},
        },
    }
)


def plan_schema(kinds: tuple[str, ...] = STEP_KINDS) -> dict[str, Any]:
    """The plan's JSON schema, with the step kinds the guest runs. Every field of every kind
    is in each step (strict structured output has no optional properties): null where it
    does not apply."""
    browsing = get_args(BrowserAction) if "browser" in kinds else ()
    actions = (*browsing, *(("start", "stop") if "service" in kinds else ()))
    fields: dict[str, Any] = {
        "kind": {"type": "string", "enum": list(kinds)},
        "command": _nullable("string", description="terminal or service: the command line"),
        "op": _enum("write", "read", "list"),
        "path": _nullable("string", description="file: the path in the workspace"),
        "content": _nullable("string", description="file write: the whole content"),
        "action": _enum(*actions),
        "url": _nullable("string"),
        "selector": _nullable("string"),
        "text": _nullable("string"),
        "value": _nullable("string"),
        "name": _nullable("string", description="service stop: the service's name (s1, ...)"),
        "check": CHECK_SCHEMA,
    }
    if "browser" not in kinds:
        for name in ("url", "selector", "text", "value"):
            del fields[name]
    if "service" not in kinds:
        del fields["name"]
    if "browser" not in kinds and "service" not in kinds:
        del fields["action"]
    step = {
        "type": "object",
        "additionalProperties": False,
        "required": list(fields),
        "properties": fields,
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["steps"],
        "properties": {"steps": {"type": "array", "items": step}},
    }


VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["ok", "answer", "reason"],
    "properties": {
        "ok": {"type": "boolean", "description": "whether the task is done"},
        "answer": {"type": "string", "description": "the result the user gets"},
        "reason": {"type": "string", "description": "why it is or is not done"},
    },
}


class _Reply(BaseModel):
    steps: list[Step]

    @field_validator("steps", mode="before")
    @classmethod
    def _terminal_by_default(cls, steps: Any) -> Any:
        # Nulls are the schema's "does not apply"; models often leave out a command's kind.
        if isinstance(steps, list):
            steps = [
                {k: v for k, v in s.items() if v is not None} if isinstance(s, dict) else s
                for s in steps
            ]
            return [
                {"kind": "terminal", **s} if isinstance(s, dict) and "kind" not in s else s
                for s in steps
            ]
        return steps


def json_object(text: str) -> Any:
    """A model's reply's first JSON object, fenced in markdown or not."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match is None:
        raise ValueError(f"the reply holds no JSON object: {text[:300]!r}")
    try:
        return json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply's JSON does not parse: {exc}") from exc


def problems(exc: ValidationError) -> str:
    """A validation error in the words a model can act on: where, and what is wrong."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "the reply"
        lines.append(f"- {where}: {error['msg']}")
    return "\n".join(lines)


def parse_reply(text: str) -> list[Step]:
    """The steps in a planner's reply (none when it finds the task done already)."""
    try:
        reply = _Reply.model_validate(json_object(text))
    except ValidationError as exc:
        raise ValueError(f"the planner's reply is not a plan:\n{problems(exc)}") from exc
    return reply.steps[:MAX_PLAN_STEPS]


def parse_verdict(text: str) -> TaskVerdict:
    try:
        return TaskVerdict.model_validate(json_object(text))
    except ValidationError as exc:
        raise ValueError(f"the verifier's reply is not a verdict:\n{problems(exc)}") from exc
