"""Inputs and outputs of the session workflow, its updates, queries and activities.

All are Pydantic models, carried by Temporal's Pydantic data converter.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from sandboxes.models import SandboxInfo, Step, StepOutcome
from store.models import SessionStatus, TaskStatus

MAX_PROMPT_CHARS = 20_000


class SessionInput(BaseModel):
    session_id: str
    template: str = "default"
    # Where sandbox activities go until the sandbox exists; then the sandbox's own queue.
    host_task_queue: str
    idle_timeout_s: float = 3600.0
    step_timeout_s: float = 600.0
    # Carried over by continue-as-new, so a long session keeps its sandbox and queue.
    sandbox: SandboxInfo | None = None
    queued: list[TaskState] = Field(default_factory=list)


class TaskState(BaseModel):
    id: str
    prompt: str
    status: TaskStatus = TaskStatus.queued
    steps: list[Step] = Field(default_factory=list)
    current: int | None = None
    result: str | None = None
    error: str | None = None


class SessionState(BaseModel):
    """What the ``state`` query returns."""

    session_id: str
    status: SessionStatus
    sandbox: SandboxInfo | None
    tasks: list[TaskState]


class TaskSubmission(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class TaskRef(BaseModel):
    id: str
    status: TaskStatus


class TaskControl(BaseModel):
    task_id: str


class TaskModification(BaseModel):
    task_id: str
    instruction: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class SandboxRequest(BaseModel):
    session_id: str
    template: str


class StepRequest(BaseModel):
    sandbox: SandboxInfo
    task_id: str
    index: int
    step: Step
    timeout_s: float


class DoneStep(BaseModel):
    step: Step
    outcome: StepOutcome


class PlanRequest(BaseModel):
    task_id: str
    prompt: str
    # Set when the user modifies a running task: the plan is redone from here on.
    instruction: str | None = None
    done: list[DoneStep] = Field(default_factory=list)


class Plan(BaseModel):
    steps: list[Step]


class ProgressEvent(BaseModel):
    session_id: str
    type: str
    data: dict[str, Any] = Field(default_factory=dict)
    key: str | None = None


SessionInput.model_rebuild()
