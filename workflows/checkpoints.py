"""What the session workflow's checkpoints, rollbacks and forks need beside its handlers:
how long their activities may take, the session's state a checkpoint keeps, and which tasks
a rollback undoes. Pure: called from workflow code."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

from temporalio.common import RetryPolicy

from store.models import TaskStatus
from workflows.models import MAX_CHECKPOINTS, TaskState
from workflows.options import HEARTBEAT, ActivityOptions

# A checkpoint or rollback is taken between steps: it waits this long for the running step
# to end, then is refused (try again, or cancel the task).
STEP_WAIT: Final = timedelta(seconds=60)

# Saving or loading a workspace archive or a disk layer: seconds, a memory image longer.
SAVE: Final = ActivityOptions(
    start_to_close_timeout=timedelta(minutes=5),
    heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(maximum_attempts=3),
)
# A checkpoint left behind is kept disk only: a few tries, then the session goes on.
DELETE: Final = ActivityOptions(
    start_to_close_timeout=timedelta(minutes=1), retry_policy=RetryPolicy(maximum_attempts=3)
)


def check_room(checkpoints: list[str]) -> None:
    if len(checkpoints) >= MAX_CHECKPOINTS:
        raise ValueError(
            f"the session has {len(checkpoints)} checkpoints, the most it keeps; delete one"
        )


def check_known(checkpoints: list[str], checkpoint_id: str) -> None:
    if checkpoint_id not in checkpoints:
        raise ValueError(f"no checkpoint {checkpoint_id} in this session")


def session_state(
    tasks: dict[str, TaskState], running: TaskState | None, finished: dict[str, TaskStatus]
) -> dict[str, Any]:
    """The session's state a checkpoint keeps: its unfinished tasks with their steps, plan
    position and notes, the one running, and the finished ones' ids and ends."""
    return {
        "tasks": [t.model_dump(mode="json") for t in tasks.values()],
        "running": running.id if running else None,
        "finished": {k: v.value for k, v in finished.items()},
    }


def undone(finished: dict[str, TaskStatus], before: list[str]) -> list[str]:
    """The finished tasks a rollback undoes: those the session did not have finished or
    queued when the checkpoint was taken."""
    kept = set(before)
    return [t for t in finished if t not in kept]
