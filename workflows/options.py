"""How long each activity the workflows call may take, and how it is retried.

Plain values, deterministic and shared by the session and the pool workflows: a call site
says what it runs, where and why (task queue, summary) and takes its timing from here, as
``**options.WAKE``. Changing a value changes only activities scheduled from then on.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final, TypedDict

from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityCancellationType


class ActivityOptions(TypedDict, total=False):
    """The timing options of ``workflow.execute_activity_method`` (and its start_ twin)."""

    start_to_close_timeout: timedelta
    schedule_to_close_timeout: timedelta
    heartbeat_timeout: timedelta
    retry_policy: RetryPolicy
    cancellation_type: ActivityCancellationType


# Long work on a machine beats this often, so a lost host is noticed in time.
HEARTBEAT = timedelta(seconds=30)
STEP_ATTEMPTS = 10


def making_machine(attempts: int) -> ActivityOptions:
    """Making a machine (created cold, restored, booted for a pool). Its cancel completes
    only once the attempt that makes it has stopped (and removed what it made), so no
    machine is made after the destroy that an end sends."""
    return ActivityOptions(
        start_to_close_timeout=timedelta(minutes=10),
        heartbeat_timeout=HEARTBEAT,
        retry_policy=RetryPolicy(maximum_attempts=attempts),
        cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    )


def running_step(step_timeout_s: float) -> ActivityOptions:
    """A step in the sandbox: its own timeout and two minutes more for the guest's round
    trips. A cancelled step is over only once its command is dead, so nothing else can
    start in the sandbox beside it.

    Every worker lost mid-step costs an attempt (its heartbeat times out), though the
    command runs on in the guest and the next attempt re-attaches to it: STEP_ATTEMPTS
    leaves room for several such losses (five kill -9 of the worker in one step, in the
    chaos suite), while an unreachable guest still gives up after
    GUEST_UNAVAILABLE_ATTEMPTS (activities/sandbox.py). The retry policy is not part of
    what a replay compares (an activity's type and id are), so no patch is needed."""
    return ActivityOptions(
        start_to_close_timeout=timedelta(seconds=step_timeout_s + 120),
        heartbeat_timeout=timedelta(seconds=10),
        retry_policy=RetryPolicy(
            maximum_attempts=STEP_ATTEMPTS, non_retryable_error_types=["ValueError"]
        ),
        cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    )


# The session's own machine, and a warm pool's VM.
MAKE_MACHINE: Final = making_machine(attempts=3)
BOOT_POOL_VM: Final = making_machine(attempts=2)

# A claim answers at once (a VM or none): past this the pool is in trouble; create cold.
CLAIM: Final = ActivityOptions(
    start_to_close_timeout=timedelta(seconds=20), retry_policy=RetryPolicy(maximum_attempts=2)
)
ASSIGN: Final = ActivityOptions(
    start_to_close_timeout=timedelta(seconds=30), retry_policy=RetryPolicy(maximum_attempts=5)
)
HIBERNATE: Final = ActivityOptions(
    start_to_close_timeout=timedelta(minutes=2), retry_policy=RetryPolicy(maximum_attempts=3)
)
WAKE: Final = ActivityOptions(
    start_to_close_timeout=timedelta(minutes=3),
    heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(maximum_attempts=3),
)
# Asking the host whether a machine runs and its guest is connected: an answer at once.
CHECK_SANDBOX: Final = ActivityOptions(
    start_to_close_timeout=timedelta(seconds=30), retry_policy=RetryPolicy(maximum_attempts=3)
)
PRESERVE: Final = ActivityOptions(
    start_to_close_timeout=timedelta(minutes=5),
    heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(maximum_attempts=3),
)
# Ending a session waits this long for its sandbox; past it, the host's reconciliation
# removes the machine.
# Reading the host registry: any worker answers at once (the fleet's queue).
READ_FLEET: Final = ActivityOptions(
    start_to_close_timeout=timedelta(seconds=10),
    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
)
DESTROY: Final = ActivityOptions(
    schedule_to_close_timeout=timedelta(minutes=3),
    start_to_close_timeout=timedelta(minutes=1),
    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=20)),
)
DESTROY_POOL_VM: Final = ActivityOptions(start_to_close_timeout=timedelta(minutes=3))


def destroying_pool_vm(within: timedelta) -> ActivityOptions:
    """A pool VM's removal as its pool ends: retried, but given up after ``within``."""
    return ActivityOptions(
        schedule_to_close_timeout=within,
        start_to_close_timeout=min(within, timedelta(minutes=1)),
        retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
    )


STOP_STEP: Final = ActivityOptions(
    start_to_close_timeout=timedelta(seconds=30), retry_policy=RetryPolicy(maximum_attempts=3)
)
# A model call: planning, or verifying a result.
CONSULT: Final = ActivityOptions(
    start_to_close_timeout=timedelta(minutes=3), retry_policy=RetryPolicy(maximum_attempts=3)
)

# Recording progress, a local activity: tried a few times within one workflow task (about
# 8 s between the first and the last), then again after RECORD_AGAIN_AFTER, doubling to
# RECORD_AGAIN_MAX, for as long as it takes: a session outlasts a database outage rather
# than fail for it. (A local activity's schedule-to-close did not end its retries.)
RECORD_TIMEOUT = timedelta(seconds=15)
RECORD_TRIES = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    maximum_interval=timedelta(seconds=4),
    maximum_attempts=5,
)
RECORD_AGAIN_AFTER = timedelta(seconds=5)
RECORD_AGAIN_MAX = timedelta(minutes=5)
# Before the patch record-later: retried without end within one workflow task.
RECORD_RETRY_UNBOUNDED = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=0,
)
