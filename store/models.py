"""Tables. Rows other than ``events`` are a read model projected from the event log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class SessionStatus(StrEnum):
    provisioning = "provisioning"
    ready = "ready"
    busy = "busy"
    hibernated = "hibernated"
    # A hibernated sandbox being resumed for the next task.
    waking = "waking"
    ended = "ended"
    failed = "failed"


class HostState(StrEnum):
    active = "active"
    # Takes no new sessions; its warm pools are ended (an operator's ``host drain``).
    draining = "draining"
    # Never stored: a host whose heartbeat is older than BERTH_HOST_LOST_AFTER_S reads so.
    lost = "lost"


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
    # Judged before it ran (its template's command policy, a kind its guest lacks).
    refused = "refused"


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: str = Field(default_factory=new_id, primary_key=True)
    email: str = Field(index=True, unique=True, max_length=320)
    password_hash: str
    is_admin: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class SessionRow(SQLModel, table=True):
    __tablename__ = "sessions"

    id: str = Field(default_factory=new_id, primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True)
    template: str = "default"
    status: SessionStatus = Field(default=SessionStatus.provisioning, sa_type=String(16))
    # As started (the user's preferences, else the system's defaults); None: never.
    idle_timeout_s: float | None = None
    hibernate_after_s: float | None = None
    model: str | None = Field(default=None, max_length=200)
    error: str | None = Field(default=None, sa_column=Column(Text))
    # Highest event sequence number handed out; bumped atomically by each append.
    last_seq: int = 0
    # Ended with its sandbox's disk kept: it may be resumed (POST .../resume).
    preserved: bool = False
    # A fork: the session and checkpoint it began from (its log up to there is inherited).
    parent_id: str | None = Field(default=None, max_length=64, index=True)
    parent_checkpoint_id: str | None = Field(default=None, max_length=64)
    # Checkpoints it takes by itself (workflows.models.AutoCheckpoint); None: the system's.
    auto_checkpoint: str | None = Field(default=None, max_length=16)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None


class CheckpointRow(SQLModel, table=True):
    """A checkpoint of a session: its machine's state (kept on its host, under the id) and
    the session's state when it was taken (``seq``: the checkpoint.created event's)."""

    __tablename__ = "checkpoints"

    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(foreign_key="sessions.id", index=True)
    user_id: str = Field(foreign_key="users.id", index=True)
    label: str | None = Field(default=None, max_length=200)
    memory: bool = False
    # The host queue where the machine's state is kept, and the sandbox it was taken of.
    task_queue: str = Field(max_length=200)
    sandbox: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Counted in the user's kept bytes (api/quotas.py).
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    seq: int = 0
    # The session's tasks (with their steps, positions, notes) and finished tasks then.
    state: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class TaskRow(SQLModel, table=True):
    __tablename__ = "tasks"

    id: str = Field(primary_key=True)
    session_id: str = Field(foreign_key="sessions.id", index=True)
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    status: TaskStatus = Field(default=TaskStatus.queued, sa_type=String(16))
    result: str | None = Field(default=None, sa_column=Column(Text))
    error: str | None = Field(default=None, sa_column=Column(Text))
    # Run after a checkpoint the session was rolled back to: its effects were undone.
    rolled_back: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class StepRow(SQLModel, table=True):
    __tablename__ = "steps"
    __table_args__ = (UniqueConstraint("task_id", "index"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(foreign_key="tasks.id", index=True)
    index: int
    kind: str
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: StepStatus = Field(default=StepStatus.pending, sa_type=String(16))
    exit_code: int | None = None
    # The most recent output, capped: the stream itself lives in the event log.
    output: str = Field(default="", sa_column=Column(Text, nullable=False))
    # The guest's sequence number of the last output line stored, so a retried RunStep
    # resumes after it: no line twice, none lost.
    output_seq: int = 0
    # Characters kept as events, and those past the cap that were not.
    output_chars: int = 0
    dropped_chars: int = 0
    error: str | None = Field(default=None, sa_column=Column(Text))
    # How the step's check came out, what it produced, and the ids of its artifacts.
    check_result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    artifacts: list[str] | None = Field(default=None, sa_column=Column(JSON))
    # On the first step of a revised plan's tail: why the plan was revised.
    revised: str | None = Field(default=None, sa_column=Column(Text))
    started_at: datetime | None = None
    finished_at: datetime | None = None


class SandboxRow(SQLModel, table=True):
    __tablename__ = "sandboxes"
    # Each host's watch reads its running sandboxes every two seconds.
    __table_args__ = (Index("ix_sandboxes_host_id_status", "host_id", "status"),)

    id: str = Field(primary_key=True)
    session_id: str = Field(foreign_key="sessions.id", index=True)
    provider: str
    host_id: str
    template: str
    handle: str = Field(description="The provider's own name for it, e.g. a container id")
    # running, destroyed, preserved (its disk kept), restored (its disk in a newer one),
    # expired (its kept disk removed past the age limit)
    status: str = "running"
    created_at: datetime = Field(default_factory=utcnow)
    destroyed_at: datetime | None = None
    # Sampled by its host every few seconds while it runs: % of one CPU, resident MiB.
    cpu_percent: float | None = None
    memory_mb: float | None = None
    stats_at: datetime | None = None
    # A preserved one's kept disk (or workspace archive), as its host last measured it.
    kept_bytes: int | None = Field(default=None, sa_type=BigInteger)


class Event(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("session_id", "seq"), UniqueConstraint("session_id", "key"))

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(foreign_key="sessions.id", index=True)
    seq: int
    type: str = Field(max_length=64)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Set by writers that may retry (Temporal activities), so a retry appends nothing twice.
    key: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow)


class ArtifactRow(SQLModel, table=True):
    """A file a step made (a screenshot, ...): the bytes live in the artifact store, keyed by
    this id; the row says whose it is and what it is."""

    __tablename__ = "artifacts"

    # Derived from the step's command id and the artifact's name, so a retry stores it once.
    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(foreign_key="sessions.id", index=True)
    task_id: str = Field(max_length=64)
    step_index: int
    name: str = Field(max_length=100)
    media_type: str = Field(max_length=100)
    size: int
    created_at: datetime = Field(default_factory=utcnow)


class LLMReservation(SQLModel, table=True):
    """An LLM call in flight: taken before the call starts and dropped when it ends, so a
    user's concurrent calls are counted by every process the moment they begin."""

    __tablename__ = "llm_reservations"

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(max_length=64, index=True)
    created_at: datetime = Field(default_factory=utcnow)


class LLMCall(SQLModel, table=True):
    """One request answered by the LLM proxy (a cache hit too), for accounting and limits."""

    __tablename__ = "llm_calls"
    # The rate limit counts a user's recent calls; the budget sums a task's tokens.
    __table_args__ = (Index("ix_llm_calls_user_created", "user_id", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(max_length=64)
    session_id: str | None = Field(default=None, index=True, max_length=64)
    task_id: str | None = Field(default=None, index=True, max_length=64)
    provider: str = Field(max_length=100)
    model: str = Field(max_length=200)
    # Tokens a provider spent on it: 0 for a cache hit.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False
    latency_ms: float = 0.0
    created_at: datetime = Field(default_factory=utcnow)


class LLMCacheEntry(SQLModel, table=True):
    """A cached LLM answer (when no Redis is configured), keyed by a hash of the request."""

    __tablename__ = "llm_cache"

    key: str = Field(primary_key=True, max_length=64)
    result: str = Field(sa_column=Column(Text, nullable=False))
    expires_at: datetime = Field(index=True)


class ApiToken(SQLModel, table=True):
    """A user's bearer token: only a keyed hash of it is kept, so the table opens nothing."""

    __tablename__ = "api_tokens"

    id: str = Field(default_factory=new_id, primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True)
    name: str = Field(max_length=100)
    token_hash: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    revoked_at: datetime | None = None
    # When it last opened a request, to within accounts.LAST_USED_RESOLUTION.
    last_used_at: datetime | None = None


class PreviewShare(SQLModel, table=True):
    """A link that opens one port's preview of a session to whoever holds it, until it
    expires or its owner revokes it: only a keyed hash of its token is kept."""

    __tablename__ = "preview_shares"

    id: str = Field(default_factory=new_id, primary_key=True)
    session_id: str = Field(foreign_key="sessions.id", index=True)
    port: int
    token_hash: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    revoked_at: datetime | None = None


class Invite(SQLModel, table=True):
    """A single-use sign-up code an admin made (``BERTH_SIGNUP=invite``): only a keyed hash
    of it is kept, like a token's."""

    __tablename__ = "invites"

    id: str = Field(default_factory=new_id, primary_key=True)
    code_hash: str = Field(index=True, unique=True, max_length=64)
    created_by: str = Field(foreign_key="users.id")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    used_at: datetime | None = None


class AuthCounter(SQLModel, table=True):
    """Attempts per key (e.g. login failures of an email from an address) in a fixed window,
    in the database so every API process counts the same attempts."""

    __tablename__ = "auth_counters"

    key: str = Field(primary_key=True, max_length=200)
    count: int = 0
    window_start: datetime
    locked_until: datetime | None = None


class AuditEntry(SQLModel, table=True):
    """Who did what, when, from where. Append-only: the database refuses updates and deletes."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor_id: str | None = Field(default=None, index=True, max_length=32)
    action: str = Field(max_length=64)
    target: str | None = Field(default=None, index=True, max_length=200)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    ip: str | None = Field(default=None, max_length=64)


class UserPreferences(SQLModel, table=True):
    """What a user's new sessions start with; each None means the system's default."""

    __tablename__ = "user_preferences"

    user_id: str = Field(foreign_key="users.id", primary_key=True)
    template: str | None = Field(default=None, max_length=64)
    # A configured LLM provider's name or model, tried first (the others remain fallbacks).
    model: str | None = Field(default=None, max_length=200)
    hibernate_after_s: int | None = None
    idle_timeout_s: int | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class UserLimits(SQLModel, table=True):
    """An admin's limits for one user, in place of the settings' (None: the setting's; 0:
    no limit): LLM spending per day and per month, kept disks (count, bytes)."""

    __tablename__ = "user_limits"

    user_id: str = Field(foreign_key="users.id", primary_key=True)
    spend_day_usd: float | None = None
    spend_month_usd: float | None = None
    kept_disks: int | None = None
    kept_bytes: int | None = Field(default=None, sa_type=BigInteger)
    updated_at: datetime = Field(default_factory=utcnow)


class HostRow(SQLModel, table=True):
    """A sandbox host (a worker): what it can hold and holds, as its last heartbeat said.
    Only ``state`` is the operators'; the rest is the host's own report."""

    __tablename__ = "hosts"

    id: str = Field(primary_key=True, max_length=64)  # BERTH_HOST_ID
    task_queue: str = Field(max_length=200)
    provider: str = Field(max_length=16)
    # How its VMs run: kvm or tcg; "none" for containers.
    accel: str = Field(max_length=8)
    state: HostState = Field(default=HostState.active, sa_type=String(16))
    vcpus: int
    memory_mb: int
    memory_available_mb: int
    load1: float
    # Machines of sessions it runs (any state), and the most it may run (None: no cap).
    machines: int = 0
    max_machines: int | None = None
    # Machines ready or booting in each template's warm pool.
    warm: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    templates: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    started_at: datetime
    last_seen: datetime = Field(index=True)


class StreamLease(SQLModel, table=True):
    """An event stream open on some API process, counted against its user's streams by
    every process; dropped when the stream ends, or (its process gone) once it is older
    than any stream may live."""

    __tablename__ = "stream_leases"

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(max_length=64, index=True)
    created_at: datetime = Field(default_factory=utcnow)


class WebhookEndpoint(SQLModel, table=True):
    """Where a user wants to be told of their sessions' events (api/webhooks.py). Its signing
    secret is kept sealed (config/keys.py:seal, under the payload key): shown once, when made
    or rotated, and opened only by the worker that signs a delivery."""

    __tablename__ = "webhook_endpoints"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=32)
    url: str = Field(max_length=2000)
    # The event names it is told of (store/webhooks.py:EVENTS).
    events: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    secret: str = Field(sa_column=Column(Text, nullable=False))
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class WebhookDelivery(SQLModel, table=True):
    """One event for one endpoint: written with the event (the outbox), then delivered by a
    workflow of its own; each attempt is logged in ``attempts``."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_state", "state", "dispatched"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    endpoint_id: str = Field(foreign_key="webhook_endpoints.id", index=True, max_length=32)
    event: str = Field(max_length=32)
    session_id: str = Field(max_length=32)
    # The JSON body sent (built once, so every attempt signs the same bytes).
    body: str = Field(sa_column=Column(Text, nullable=False))
    # pending (to deliver), delivered, failed (attempts used up, or the endpoint is gone).
    state: str = Field(default="pending", max_length=16)
    # Whether its delivery workflow has been started.
    dispatched: bool = False
    # Every attempt: {"at", "status" (the HTTP status, or null), "error", "ms"}.
    attempts: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    created_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime | None = None
