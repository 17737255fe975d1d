"""What crosses the sandbox boundary: a sandbox's identity, a step, and how a step ended."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class TerminalStep(BaseModel):
    """A shell command. Browser steps will join as another ``kind`` of a tagged union."""

    kind: Literal["terminal"] = "terminal"
    command: str = Field(min_length=1, max_length=16_000)
    cwd: str | None = None

    def describe(self) -> str:
        return f"$ {self.command}"


Step = TerminalStep


class SandboxInfo(BaseModel):
    id: str
    session_id: str
    provider: str
    host_id: str
    # Activities that touch this sandbox must run on its host's worker: the guest's link
    # ends there.
    task_queue: str
    template: str
    handle: str


class Machine(BaseModel):
    """A machine found on a host, as its provider labelled it at creation."""

    sandbox_id: str
    session_id: str
    handle: str
    state: str
    created_at: datetime


class StepOutcome(BaseModel):
    exit_code: int
    timed_out: bool = False
    error: str | None = None
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None

    def problem(self) -> str:
        """What went wrong, in words, for the user and the planner."""
        if self.error:
            return self.error
        if self.timed_out:
            return "timed out"
        return f"exited with {self.exit_code}"


class Health(BaseModel):
    running: bool
    guest_connected: bool
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.running and self.guest_connected
