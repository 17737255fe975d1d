"""The session workflow's own API: its input, its updates' and queries' inputs and outputs,
and what it carries across continue-as-new. (Its activities' contracts are in
activities/models.py, below it.)

All are Pydantic models, carried by Temporal's Pydantic data converter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, StringConstraints

from activities.models import DoneStep
from sandboxes.models import SandboxInfo, Step
from store.models import SessionStatus, TaskStatus
from workflows.plans import check_plan_size

MAX_PROMPT_CHARS = 20_000
# A task's modifications, each given to every later planning call and carried across
# continue-as-new: at most this many, and this many characters in all.
MAX_NOTES = 10
MAX_NOTES_CHARS = 40_000
# What a session carries across continue-as-new, as JSON, at most (Temporal refuses a
# payload past 2 MB, and warns well before).
MAX_CARRIED_BYTES = 1_000_000
# What a user asks of the agent (a task, or a change to one), by the same rule wherever it
# comes in (the JSON API, the dashboard's forms, the workflow's updates): something other
# than blanks (an empty task would go to the planner as it is), at most MAX_PROMPT_CHARS,
# and a plan written as ``$ `` lines no longer than the plan cap.
Prompt = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S"),
    AfterValidator(check_plan_size),
]


AutoCheckpoint = Literal["none", "before_task"]
# A session's checkpoints at most (each one's machine state takes the host's disk).
MAX_CHECKPOINTS = 50


class SessionInput(BaseModel):
    session_id: str
    template: str = "default"
    # Where sandbox activities go until the sandbox exists; then the sandbox's own queue.
    host_task_queue: str
    # Claim a booted VM from the template's warm pool first (libvirt), and create one cold
    # only when the pool has none.
    warm_pool: bool = False
    idle_timeout_s: float = 3600.0
    # Idle this long, the sandbox is suspended until the next task (None: never).
    hibernate_after_s: float | None = None
    step_timeout_s: float = 600.0
    # The agent loop's bounds, per task.
    max_steps: int = 30
    max_revisions: int = 8
    # The user's preferred LLM provider (its name or model), tried first when planning.
    model: str | None = None
    # The namespace has Berth's search attributes (workflows/search.py): the session keeps
    # BerthStatus current. Its other attributes are set at its start.
    search_attributes: bool = False
    # Set by continue-as-new: the session as the previous run left it.
    carried: Carried | None = None
    # Set by a resume: the sandbox whose disk the session's previous run preserved. Its
    # first machine only: a replacement of that machine is created afresh.
    restore: SandboxInfo | None = None
    # The bound of ``Carried`` as JSON (see MAX_CARRIED_BYTES); lower in tests.
    max_carried_bytes: int = MAX_CARRIED_BYTES
    # Machines that die before a step runs on them are replaced this many times in a row
    # at most (BERTH_SESSION_MAX_REPLACEMENTS), the first at once, each further one after
    # twice the pause before it (from ``replace_backoff_s``); past it the session fails.
    max_replacements: int = 3
    replace_backoff_s: float = 5.0

    # Checkpoints taken by themselves: before each task, or none (see workflows/checkpoints.py).
    auto_checkpoint: AutoCheckpoint = "none"
    # Set for a fork: its first machine is made from this checkpoint (kept on the host of
    # ``host_task_queue``).
    fork: str | None = None
    # A resumed session's checkpoints, kept with its disk: its to roll back to or delete.
    checkpoints: list[str] = Field(default_factory=list)

    # Fleet (issue 18): the host the API placed the session on, and why (its first run
    # records them as session.placed).
    placed_host: str | None = None
    placed_why: str | None = None


# A W3C traceparent: version, trace id, span id, flags.
TRACEPARENT_CHARS = 55


class TaskState(BaseModel):
    id: str
    prompt: str
    status: TaskStatus = TaskStatus.queued
    steps: list[Step] = Field(default_factory=list)
    # The index of the next step to run, and of the one running now (None between steps).
    position: int = 0
    current: int | None = None
    # The latest steps run, for the planner's context when a prose task is re-planned.
    recent: list[DoneStep] = Field(default_factory=list)
    result: str | None = None
    error: str | None = None
    # A prose task is the agent's: planned by the model, revised when a step fails or is
    # refused, and its answer verified against the goal. A written plan runs as written.
    agent: bool = False
    executed: int = 0
    revisions: int = 0
    # The user's modifications, each one given to every later planning call.
    notes: list[str] = Field(default_factory=list)
    # The W3C traceparent of the request that submitted it (traces on): its planning and
    # steps are spans of that request's trace.
    trace: str | None = Field(default=None, max_length=TRACEPARENT_CHARS)


def as_lists(instructions: Any) -> Any:
    """Pending modifications as lists, also as an earlier run carried them (one string)."""
    if not isinstance(instructions, dict):
        return instructions
    return {k: [v] if isinstance(v, str) else v for k, v in instructions.items()}


class Carried(BaseModel):
    """Everything a session is, handed from one run to the next by continue-as-new."""

    sandbox: SandboxInfo
    # Unfinished tasks, the running one first, then the queue in order.
    tasks: list[TaskState] = Field(default_factory=list)
    running: str | None = None
    paused: bool = False
    hibernated: bool = False
    # Modifications not taken yet, per task, in the order they came (a run before this
    # kept one per task, a string).
    instructions: Annotated[dict[str, list[str]], BeforeValidator(as_lists)] = Field(
        default_factory=dict
    )
    # Recently finished tasks, so a late control of one says what became of it.
    finished: dict[str, TaskStatus] = Field(default_factory=dict)
    # Recent submissions' idempotency keys and the tasks they queued.
    submitted: dict[str, str] = Field(default_factory=dict)
    # Signals the session has had and not acted on yet: its end is to keep the sandbox's
    # disk; its machine died (why), to be replaced before the next task.
    preserve: bool = False
    dead: str | None = None
    # Machines replaced since a step last ran (see SessionInput.max_replacements).
    replacements: int = 0
    # The session's checkpoints (ids), deleted with it unless it is preserved.
    checkpoints: list[str] = Field(default_factory=list)
    # The task queue of the host keeping each checkpoint taken since its first run (the
    # session may have moved since); one not named is kept by the session's host.
    checkpoint_hosts: dict[str, str] = Field(default_factory=dict)
    # The host that was lost with the dead machine (see SandboxDeath.host_lost).
    dead_host: str | None = None


class SessionState(BaseModel):
    """What the ``state`` query returns."""

    session_id: str
    status: SessionStatus
    sandbox: SandboxInfo | None
    # Tasks not finished yet; the finished ones' rows and events are in the database.
    tasks: list[TaskState]
    finished: dict[str, TaskStatus] = Field(default_factory=dict)


class TaskSubmission(BaseModel):
    prompt: Prompt
    # The client's Idempotency-Key (hashed): a submission sent again with it is answered
    # with the task it queued, in this run or a later one.
    key: str | None = Field(default=None, max_length=100)
    # The submitting request's span, as a W3C traceparent (None when traces are off).
    trace: str | None = Field(default=None, max_length=TRACEPARENT_CHARS)


class TaskRef(BaseModel):
    id: str
    status: TaskStatus


class TaskControl(BaseModel):
    task_id: str


class TaskModification(BaseModel):
    task_id: str
    instruction: Prompt


class CheckpointAsk(BaseModel):
    memory: bool = False
    label: str | None = Field(default=None, max_length=200)


class CheckpointRef(BaseModel):
    id: str
    # Whether the machine's memory was kept (a container's never is).
    memory: bool
    size_bytes: int


class CheckpointControl(BaseModel):
    checkpoint_id: str


class RollbackAsk(BaseModel):
    checkpoint_id: str
    # The tasks the session had when the checkpoint was taken: every other one it ran
    # since is rolled back.
    tasks_before: list[str] = Field(default_factory=list)


class RollbackRef(BaseModel):
    checkpoint_id: str
    rolled_back: list[str]


class SandboxDeath(BaseModel):
    """Said by the sandbox's host when its machine died (or stopped answering)."""

    sandbox_id: str
    detail: str
    # Set when it is the host that is lost (no heartbeat: berth/fleet.py): the machine can
    # neither be reached nor removed, and the session moves to another host.
    host_lost: str | None = None


SessionInput.model_rebuild()
