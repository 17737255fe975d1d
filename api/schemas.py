"""Request and response bodies of the JSON API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, field_validator

import vm_templates
from llm.models import UsageTotals
from store.models import SessionStatus, StepStatus, TaskStatus
from workflows.models import MAX_PROMPT_CHARS
from workflows.plans import check_plan_size


class Credentials(BaseModel):
    email: str = Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    password: str = Field(min_length=8, max_length=1024)


TokenName = Annotated[str, Field(min_length=1, max_length=100)]


class TokenRequest(Credentials):
    name: TokenName = "api"


class SignupOut(BaseModel):
    email: str
    detail: str


class TokenCreate(BaseModel):
    name: TokenName


class TokenOut(BaseModel):
    """A new token: its secret is shown this once."""

    token: str
    token_type: str = "bearer"
    id: str
    name: str
    expires_at: datetime


class TokenInfo(BaseModel):
    id: str
    name: str
    created_at: datetime
    expires_at: datetime


class SessionCreate(BaseModel):
    template: str = Field(default=vm_templates.DEFAULT, max_length=64)


class SessionOut(BaseModel):
    id: str
    status: SessionStatus
    template: str
    error: str | None
    # Ended with its sandbox's disk kept: POST .../resume brings it back.
    preserved: bool = False
    created_at: datetime
    ended_at: datetime | None
    events_url: str


class TaskCreate(BaseModel):
    prompt: Annotated[
        str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(check_plan_size)
    ]


class Modification(BaseModel):
    instruction: Annotated[
        str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(check_plan_size)
    ]


class TaskRefOut(BaseModel):
    id: str
    status: TaskStatus


class StepOut(BaseModel):
    index: int
    kind: str
    spec: dict[str, Any]
    status: StepStatus
    exit_code: int | None
    output: str
    error: str | None
    # How its check came out ({kind, ok, detail}), what it produced, its artifacts' ids
    # (GET /api/sessions/{sid}/artifacts/{id}).
    check_result: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    artifacts: list[str] = Field(default_factory=list)

    @field_validator("artifacts", mode="before")
    @classmethod
    def _none_is_empty(cls, value: list[str] | None) -> list[str]:
        return value or []


class TaskOut(BaseModel):
    id: str
    session_id: str
    prompt: str
    status: TaskStatus
    steps: list[StepOut]
    result: str | None
    error: str | None
    created_at: datetime
    # The task's LLM calls (its planning, and calls made for it): tokens and cost.
    llm: UsageTotals


class PoolOut(BaseModel):
    """A warm pool's state, without whose sessions it served."""

    template: str
    target: int
    ready: int
    booting: int
    hits: int
    misses: int
    boot_failures: int
