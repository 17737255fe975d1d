"""The API's bodies, as the server's OpenAPI schema describes them (same names as its
components; tests/client/test_models.py fails when the two drift). Answers are read leniently:
a field the server adds later is ignored, not an error."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field


class SessionStatus(StrEnum):
    provisioning = "provisioning"
    ready = "ready"
    busy = "busy"
    hibernated = "hibernated"
    waking = "waking"
    ended = "ended"
    failed = "failed"


class TaskStatus(StrEnum):
    queued = "queued"
    planning = "planning"
    running = "running"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class StepStatus(StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    skipped = "skipped"
    refused = "refused"


# A task in one of these has ended; a session likewise.
TASK_FINAL = (TaskStatus.succeeded, TaskStatus.failed, TaskStatus.cancelled)
SESSION_FINAL = (SessionStatus.ended, SessionStatus.failed)


# Which checkpoints a session takes by itself.
AutoCheckpoint = Literal["before_task", "none"]


class SessionCreate(BaseModel):
    template: str | None = None
    # Checkpoints the session takes by itself (None: the server's default).
    auto_checkpoint: AutoCheckpoint | None = None


class SessionOut(BaseModel):
    id: str
    status: SessionStatus
    template: str
    error: str | None
    preserved: bool = False
    # A kept disk is removed after this (null: kept until removed).
    kept_until: datetime | None = None
    created_at: datetime
    ended_at: datetime | None
    events_url: str
    # A fork: the session and checkpoint it began from.
    parent_id: str | None = None
    parent_checkpoint_id: str | None = None


class TaskCreate(BaseModel):
    prompt: str


class Modification(BaseModel):
    instruction: str


class TaskRefOut(BaseModel):
    id: str
    status: TaskStatus


class FileEntry(BaseModel):
    name: str
    kind: str  # dir, file, link, other
    size: int


class FileListing(BaseModel):
    """A folder of a session's workspace (``kind`` dir), or one file's description."""

    path: str
    kind: str
    size: int
    entries: list[FileEntry]
    more: bool = False


class StepOut(BaseModel):
    index: int
    kind: str
    spec: dict[str, Any]
    status: StepStatus
    exit_code: int | None
    output: str
    error: str | None
    check_result: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    artifacts: list[str] = Field(default_factory=list)


class UsageTotals(BaseModel):
    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0


class TaskOut(BaseModel):
    id: str
    session_id: str
    prompt: str
    status: TaskStatus
    steps: list[StepOut]
    result: str | None
    error: str | None
    created_at: datetime
    llm: UsageTotals


class SessionUsage(UsageTotals):
    session_id: str


class TaskUsage(UsageTotals):
    session_id: str | None
    task_id: str


class UserUsage(BaseModel):
    user_id: str
    total: UsageTotals
    sessions: list[SessionUsage]
    tasks: list[TaskUsage]


class TokenRequest(BaseModel):
    email: str
    password: str
    name: str = "api"


class TokenOut(BaseModel):
    token: str
    token_type: str = "bearer"
    id: str
    name: str
    expires_at: datetime


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class LimitOut(BaseModel):
    """The limit a refusal hit: its setting, value, what is used of it, when it resets."""

    name: str
    value: float
    unit: str
    used: float
    resets_at: datetime | None = None


class Problem(BaseModel):
    """A problem document (RFC 9457): every error the API answers."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None
    error_id: str | None = None
    limit: LimitOut | None = None


class Event(BaseModel):
    """One event of a session's log, as its stream sends it: ``seq`` counts from 1."""

    seq: int
    type: str
    data: dict[str, Any]
    at: datetime

    @property
    def task_id(self) -> str | None:
        found = self.data.get("task_id")
        return found if isinstance(found, str) else None
