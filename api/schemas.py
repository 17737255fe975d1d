"""Request and response bodies of the JSON API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from llm.models import UsageTotals
from store.hosts import HostReport
from store.models import HostState, SessionStatus, StepStatus, TaskStatus
from workflows.models import AutoCheckpoint, Prompt


class Credentials(BaseModel):
    email: str = Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    password: str = Field(min_length=8, max_length=1024)


class PasswordChange(BaseModel):
    current: str = Field(min_length=1, max_length=1024)
    new: str = Field(min_length=8, max_length=1024)


class SignupRequest(Credentials):
    # Needed when sign-up is by invite (BERTH_SIGNUP=invite): the code of an admin's invite.
    invite: str | None = Field(default=None, min_length=1, max_length=200)


class InviteOut(BaseModel):
    """A new single-use invite: its code is shown this once."""

    code: str
    link: str  # the dashboard's sign-up page with the code filled in
    expires_at: datetime


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
    last_used_at: datetime | None = None  # to within a minute


class SessionCreate(BaseModel):
    # None: the user's preferred template, else the default one.
    template: str | None = Field(default=None, max_length=64)
    # Checkpoints the session takes by itself; None: the system's (BERTH_SESSION_AUTO_CHECKPOINT).
    auto_checkpoint: AutoCheckpoint | None = None


class SessionOut(BaseModel):
    id: str
    status: SessionStatus
    template: str
    error: str | None
    # Ended with its sandbox's disk kept: POST .../resume brings it back, until kept_until,
    # when the host removes the disk (BERTH_KEPT_MAX_AGE_DAYS; null: kept until removed).
    preserved: bool = False
    kept_until: datetime | None = None
    created_at: datetime
    ended_at: datetime | None
    events_url: str
    # A fork: the session and checkpoint it began from.
    parent_id: str | None = None
    parent_checkpoint_id: str | None = None


class TaskCreate(BaseModel):
    prompt: Prompt


class Modification(BaseModel):
    instruction: Prompt


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


class HostOut(HostReport):
    """A sandbox host as its last heartbeat described it; ``state`` as it reads now (lost:
    silent longer than BERTH_HOST_LOST_AFTER_S)."""

    state: HostState
    last_seen: datetime


# Bounds of a user's session timeouts: hibernating sooner than a minute would suspend a
# sandbox between a user's tasks; a session idle past a week holds its resources for nothing.
HIBERNATE_MIN_S, HIBERNATE_MAX_S = 60, 24 * 3600
IDLE_MIN_S, IDLE_MAX_S = 5 * 60, 7 * 24 * 3600


class Preferences(BaseModel):
    """What the user's new sessions start with; each null means the system's default."""

    template: str | None = Field(default=None, max_length=64, description="Sandbox template")
    model: str | None = Field(
        default=None,
        max_length=200,
        description="An LLM provider's name or model (GET /v1/models), tried first when the "
        "agent plans; null: the configured order",
    )
    hibernate_after_s: int | None = Field(
        default=None,
        ge=HIBERNATE_MIN_S,
        le=HIBERNATE_MAX_S,
        description="Idle this long, a session's sandbox hibernates until the next task",
    )
    idle_timeout_s: int | None = Field(
        default=None,
        ge=IDLE_MIN_S,
        le=IDLE_MAX_S,
        description="Idle this long, a session ends; longer than hibernate_after_s",
    )


class PreferenceDefaults(BaseModel):
    template: str
    hibernate_after_s: float | None  # None: sandboxes never hibernate
    idle_timeout_s: float


class PreferencesOut(Preferences):
    """The user's preferences, the system's defaults, and the choices offered."""

    defaults: PreferenceDefaults
    templates: list[str]
    models: list[str]


class UserLimitsIn(BaseModel):
    """An admin's limits for one user; each null (or left out) is the setting's, 0 is none."""

    spend_day_usd: float | None = Field(default=None, ge=0)
    spend_month_usd: float | None = Field(default=None, ge=0)
    kept_disks: int | None = Field(default=None, ge=0)
    kept_bytes: int | None = Field(default=None, ge=0)


class UserLimitsOut(BaseModel):
    """A user's limits in force (0: none), and the admin's overrides they come from."""

    user_id: str
    spend_day_usd: float
    spend_month_usd: float
    kept_disks: int
    kept_bytes: int
    overrides: UserLimitsIn


WebhookEventName = Literal["session.ready", "session.ended", "task.finished", "sandbox.died"]


class WebhookIn(BaseModel):
    """An endpoint: where to POST, and which events (store/webhooks.py:EVENTS)."""

    url: str = Field(min_length=8, max_length=2000, examples=["https://example.com/hooks/berth"])
    events: list[WebhookEventName] = Field(min_length=1, max_length=4)
    active: bool = True


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    active: bool
    created_at: datetime
    # Only in the answer that made it or rotated it: never shown again.
    secret: str | None = None


class WebhookAttempt(BaseModel):
    at: str
    status: int | None
    error: str | None
    ms: int


class WebhookDeliveryOut(BaseModel):
    id: str
    event: str
    session_id: str
    state: str
    created_at: datetime
    finished_at: datetime | None
    attempts: list[WebhookAttempt]


class CheckpointCreate(BaseModel):
    # Keep the machine's memory too (running processes survive a rollback), if the provider
    # can: the answer's ``memory`` says whether it did.
    memory: bool = False
    label: str | None = Field(default=None, max_length=200)


class CheckpointOut(BaseModel):
    id: str
    session_id: str
    label: str | None
    memory: bool
    # Said when memory was asked for and not kept (Docker keeps the workspace only).
    note: str | None = None
    size_bytes: int
    # The checkpoint.created event's sequence number in the session's log.
    seq: int
    created_at: datetime


class RollbackOut(BaseModel):
    checkpoint_id: str
    # The tasks whose effects were undone (marked rolled back).
    rolled_back: list[str]


class ForkCreate(BaseModel):
    # At most BERTH_FORK_MAX_COUNT (422 past it).
    count: int = Field(default=1, ge=1)
