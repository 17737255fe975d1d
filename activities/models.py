"""What crosses between the workflows and their activities: every activity's input and
output, the pool's claim contract and the caps a plan is held to.

It sits below both: the workflows import it (and the activities), the activities import it,
and it imports neither. All are Pydantic models, carried by Temporal's Pydantic data converter,
which sends them as JSON: moving a class between modules changes nothing on the wire.
"""

from __future__ import annotations

from typing import cast

from pydantic import BaseModel, ConfigDict, Field

from llm.models import TokenUsage
from sandboxes.models import FileStep, SandboxInfo, Step, StepOutcome
from store.events import NewEvent
from store.models import HostState

# What the model is shown of a step's file content or result texts, at most.
BRIEF_CHARS = 2000
# The most steps one plan may have, written by the user or by the model.
MAX_PLAN_STEPS = 50

# The warm pool's update that hands a ready VM to a session (SandboxPool.claim): called by
# name, so the claiming activity needs nothing of the pool workflow.
POOL_CLAIM_UPDATE = "claim"
# What it answers: a VM, or None when the pool has none ready. (A union is no ``type`` to
# mypy, though the data converter takes it.)
CLAIM_ANSWER = cast(type, SandboxInfo | None)


def pool_workflow_id(host_id: str, template: str) -> str:
    return f"pool-{host_id}-{template}"


def brief_step(step: Step) -> Step:
    """A step as kept once it has run: a written file's content cut short."""
    if isinstance(step, FileStep) and step.content and len(step.content) > BRIEF_CHARS:
        return step.model_copy(update={"content": step.content[:BRIEF_CHARS] + "…"})
    return step


class DoneStep(BaseModel):
    step: Step
    outcome: StepOutcome

    def brief(self) -> DoneStep:
        """As kept for the model's context: a written file's content and a result's texts
        cut short, so every planning call's input (and the history) stays small."""
        step = brief_step(self.step)
        outcome = self.outcome
        if outcome.result is not None:
            texts = outcome.result.model_dump(exclude_none=True)
            cut = {k: v[:BRIEF_CHARS] for k, v in texts.items() if isinstance(v, str)}
            outcome = outcome.model_copy(update={"result": outcome.result.model_copy(update=cut)})
        return DoneStep(step=step, outcome=outcome)


class SandboxRequest(BaseModel):
    session_id: str
    # Made by the workflow, so a retried provision finds the machine an earlier attempt made
    # and reconciliation can tell whose a machine is.
    sandbox_id: str
    template: str


class StepRequest(BaseModel):
    sandbox: SandboxInfo
    task_id: str
    index: int
    step: Step
    timeout_s: float


class PlanRequest(BaseModel):
    task_id: str
    # Whose call it is, for the LLM proxy's accounting: the session's user.
    session_id: str = ""
    prompt: str
    # Set when the user modifies a running task: the plan is redone from here on.
    instruction: str | None = None
    notes: list[str] = Field(default_factory=list)
    done: list[DoneStep] = Field(default_factory=list)
    # Why the plan is being revised (a failed check, a refused command, a verification
    # that fell short): the model is told, so it does not repeat the mistake.
    feedback: str | None = None
    # The LLM provider (name or model) to try first: the session's user's preference.
    model: str | None = None


class ModelAnswer(BaseModel):
    """Which provider and model answered, whether from the cache, and what it cost."""

    provider: str | None = None
    model: str | None = None
    cached: bool = False
    usage: TokenUsage = Field(default_factory=TokenUsage)


class Plan(ModelAnswer):
    steps: list[Step]


class VerifyRequest(BaseModel):
    task_id: str
    session_id: str = ""
    prompt: str
    notes: list[str] = Field(default_factory=list)
    done: list[DoneStep] = Field(default_factory=list)
    model: str | None = None  # as PlanRequest's


class TaskVerdict(ModelAnswer):
    """The model's check of a task's result against its goal, and the answer it gives."""

    ok: bool
    answer: str = ""
    reason: str = ""


class ProgressBatch(BaseModel):
    """Events the workflow appends to its session's log in one transaction."""

    session_id: str
    events: list[NewEvent]


class ClaimRequest(BaseModel):
    session_id: str
    template: str
    # This claim's own key: the activity's retries get the VM it was handed, a later claim
    # of the session (a replacement's) another. Empty from runs begun before it: the key was
    # the session, so a replacement was handed its dead predecessor first.
    claim: str = ""


class RestoreRequest(BaseModel):
    """A new sandbox (its id made by the workflow) with a preserved one's disk."""

    preserved: SandboxInfo
    sandbox_id: str
    session_id: str


class CheckpointRequest(BaseModel):
    """Save the sandbox's machine state as checkpoint ``checkpoint_id`` (its id made by
    the workflow), its memory too if ``memory`` and the provider can."""

    sandbox: SandboxInfo
    checkpoint_id: str
    memory: bool = False


class CheckpointSaved(BaseModel):
    memory: bool
    size_bytes: int


class ForkRequest(BaseModel):
    """A new sandbox (its id made by the workflow) from a checkpoint kept on this host."""

    checkpoint_id: str
    sandbox_id: str
    session_id: str
    template: str


class PoolClaim(BaseModel):
    session_id: str  # or any key the claimer gets the same answer for


class WebhookRequest(BaseModel):
    """Deliver one webhook (a row of store/webhooks.py), tried up to ``max_attempts``."""

    delivery_id: str
    max_attempts: int
    timeout_s: float  # of one attempt


# Fleet (issue 18): the queue every worker polls for the one activity that is no host's own,
# reading the host registry to place a session anew once its host is lost.
FLEET_TASK_QUEUE = "berth-fleet"
# Weight of a host's measured load average against the machines it is known to run.
MEASURED_WEIGHT = 0.5


class Candidate(BaseModel):
    """A host as its registry row reads now (state with lost applied): what placement
    (workflows/placement.py) chooses among."""

    model_config = ConfigDict(frozen=True)

    id: str
    state: HostState
    templates: tuple[str, ...]
    vcpus: int
    memory_available_mb: int
    load1: float
    machines: int
    max_machines: int | None = None
    warm: dict[str, int] = Field(default_factory=dict)
    task_queue: str = ""

    @property
    def load(self) -> float:
        return (self.machines + MEASURED_WEIGHT * self.load1) / max(1, self.vcpus)


class Fleet(BaseModel):
    """The hosts as the registry reads now, and the memory a sandbox of the asked template
    needs there."""

    hosts: list[Candidate]
    memory_mb: int
