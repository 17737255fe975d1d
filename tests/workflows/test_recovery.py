"""A session replaces its dead machine and keeps going, within bounds: a step that ran out
of attempts without its guest has its machine checked; a machine that cannot be woken from
hibernation is replaced; a hibernation that timed out is not taken for an awake machine;
machines that keep dying are replaced a bounded number of times, with a pause between, and
then the session fails saying why. Stubbed activities on Temporal's dev server (the
harness of tests/workflows/test_session.py); each path's history is recorded for replay."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity, workflow
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.models import StepRequest
from sandboxes.models import Health, SandboxInfo, StepOutcome
from store.events import EventType
from tests.workflows.test_session import (
    Stubs,
    end,
    env,  # noqa: F401 (a fixture)
    params,
    running,
    save_history,
    short_env,  # noqa: F401 (a fixture)
    submit,
    until,
)
from workflows import options
from workflows.models import SandboxDeath, SessionInput, SessionState
from workflows.session import SessionWorkflow


class Machines(Stubs):
    """The stubs, with a host that can say a machine is down (``health``), machines that
    cannot be woken (``unwakeable``), a hibernation that outlasts its timeout
    (``slow_hibernate``), and a step that finds no guest (``$ lost``)."""

    def __init__(self) -> None:
        super().__init__()
        self.health = Health(running=True, guest_connected=True)
        self.checked: list[str] = []
        self.unwakeable: set[str] = set()
        self.slow_hibernate = False
        self.broken_hibernate = False  # fails after the machine was suspended
        self.ran_on: list[str] = []

    @activity.defn(name="CheckSandbox")
    async def check(self, sandbox: SandboxInfo) -> Health:
        self.checked.append(sandbox.id)
        return self.health

    @activity.defn(name="RunStep")
    async def run_step(self, request: StepRequest) -> StepOutcome:
        self.ran_on.append(request.sandbox.id)
        if request.step.describe() == "$ lost":
            # As the real one, once its retries ran out (one here: the test need not wait).
            raise ApplicationError("guest lost for more than 30 s", type="GuestUnavailable",
                                   non_retryable=True)  # fmt: skip
        return await super().run_step(request)

    @activity.defn(name="HibernateSandbox")
    async def hibernate(self, sandbox: SandboxInfo) -> None:
        if self.slow_hibernate:
            await asyncio.sleep(2)  # past the test's 0.5 s start-to-close timeout
        await super().hibernate(sandbox)
        if self.broken_hibernate:
            self.health = Health(running=False, guest_connected=False, detail="hibernated")
            raise ApplicationError("saved, then the answer failed", non_retryable=True)

    @activity.defn(name="WakeSandbox")
    async def wake(self, sandbox: SandboxInfo) -> None:
        if sandbox.id in self.unwakeable:
            raise ApplicationError("its machine is gone", type="SandboxDied", non_retryable=True)
        await super().wake(sandbox)

    def all(self) -> list[Callable[..., Any]]:
        return [*super().all(), self.check]

    def died(self) -> list[str]:
        return [e.data["error"] for e in self.events if e.type == EventType.sandbox_died]


def replacing(stubs: Machines, most: int, backoff_s: float) -> SessionInput:
    """A session whose machines are replaced ``most`` times in a row, the first pause
    ``backoff_s``."""
    return params(stubs).model_copy(
        update={"max_replacements": most, "replace_backoff_s": backoff_s}
    )


async def kill_machine(handle: WorkflowHandle, stubs: Machines, count: int) -> None:  # type: ignore[type-arg]
    """Once the session's ``count``-th machine is ready, say it died, as its host would.
    Machines are told apart by id: a local activity re-run (its workflow task's completion
    refused for a signal that came meanwhile) records an event twice in the stubs."""

    def ready() -> list[str]:
        ids = [e.data["sandbox_id"] for e in stubs.events if e.type == EventType.sandbox_ready]
        return list(dict.fromkeys(ids))

    await until(lambda: len(ready()) == count)
    death = SandboxDeath(sandbox_id=ready()[-1], detail=f"death {count}")
    await handle.signal(SessionWorkflow.sandbox_died, death)


async def test_a_step_without_its_guest_has_its_machine_checked_and_replaced(
    env: WorkflowEnvironment,  # noqa: F811
) -> None:
    stubs = Machines()
    stubs.health = Health(running=False, guest_connected=False, detail="missing")
    async with running(env, stubs, params(stubs)) as handle:
        lost = await submit(env.client, handle.id, "$ lost")
        await until(lambda: stubs.task_statuses().get(lost.id) == "failed")
        (first,) = stubs.checked
        await until(lambda: len(stubs.provisioned) == 2)
        ref = await submit(env.client, handle.id, "$ echo on the new machine")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("unavailable-replaced", await handle.fetch_history())
    assert first == stubs.provisioned[0]
    assert stubs.ran_on == stubs.provisioned  # the next task ran on the new machine
    (why,) = stubs.died()
    assert "a step found no guest" in why and "its machine is down (missing)" in why
    assert stubs.destroyed == stubs.provisioned


async def test_a_healthy_machine_is_kept_after_a_step_without_its_guest(
    env: WorkflowEnvironment,  # noqa: F811
) -> None:
    stubs = Machines()
    async with running(env, stubs, params(stubs)) as handle:
        lost = await submit(env.client, handle.id, "$ lost")
        await until(lambda: stubs.task_statuses().get(lost.id) == "failed")
        ref = await submit(env.client, handle.id, "$ echo same machine")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
    assert len(stubs.provisioned) == 1 and stubs.checked == stubs.provisioned
    assert stubs.died() == []


async def test_a_machine_that_cannot_be_woken_is_replaced_and_the_session_goes_on(
    env: WorkflowEnvironment,  # noqa: F811
) -> None:
    stubs = Machines()
    session = params(stubs).model_copy(update={"hibernate_after_s": 0.5})
    async with running(env, stubs, session) as handle:
        await until(lambda: EventType.sandbox_hibernated in stubs.types())
        stubs.unwakeable.add(stubs.provisioned[0])
        ref = await submit(env.client, handle.id, "$ echo after a lost machine")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("wake-replaced", await handle.fetch_history())
    first, second = stubs.provisioned
    assert stubs.ran_on == [second] and stubs.destroyed == [first, second]
    (why,) = stubs.died()
    assert "could not be woken" in why and "files in it are lost" in why


@workflow.defn(name="SessionWorkflow")
class OutsideSandbox(SessionWorkflow):
    """The session workflow itself, run outside the sandbox so a test's options reach it
    (its history is the real workflow's, replayed as such)."""

    @workflow.run
    async def run(self, params: SessionInput) -> SessionState:
        return await super().run(params)


async def test_a_hibernation_that_timed_out_is_woken_before_the_next_task(
    env: WorkflowEnvironment,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stubs = Machines()
    stubs.slow_hibernate = True
    # The workflow reads its options from this module (run outside the sandbox, which
    # would import its own).
    monkeypatch.setattr(
        options,
        "HIBERNATE",
        options.ActivityOptions(
            start_to_close_timeout=timedelta(seconds=0.5),
            retry_policy=RetryPolicy(maximum_attempts=1),
        ),
    )
    session = params(stubs).model_copy(update={"hibernate_after_s": 0.5})
    async with running(env, stubs, session, kind=OutsideSandbox) as handle:
        await until(lambda: EventType.sandbox_hibernation_failed in stubs.types())
        failed = next(e for e in stubs.events if e.type == EventType.sandbox_hibernation_failed)
        assert failed.data.get("unsure") is True
        await until(lambda: stubs.events[-1].data == {"status": "hibernated"})
        assert (await handle.query(SessionWorkflow.state)).status == "hibernated"
        ref = await submit(env.client, handle.id, "$ echo woken first")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("hibernate-unsure", await handle.fetch_history())
    (sandbox,) = stubs.provisioned
    assert f"wake {sandbox}" in stubs.power and stubs.ran_on == [sandbox]


async def test_machines_that_keep_dying_are_replaced_a_bounded_number_of_times(
    env: WorkflowEnvironment,  # noqa: F811
) -> None:
    stubs = Machines()
    async with running(env, stubs, replacing(stubs, 2, 0.5)) as handle:
        for count in range(1, 4):
            await kill_machine(handle, stubs, count)
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 60)  # a loaded host is slow
        history = await handle.fetch_history()
        save_history("replace-bounded", history)
    assert len(stubs.provisioned) == 3 and stubs.destroyed == stubs.provisioned
    last = stubs.events[-1].data
    assert last["status"] == "failed"
    assert "died 3 times in a row" in last["error"] and "death 3" in last["error"]
    assert "BERTH_SESSION_MAX_REPLACEMENTS" in last["error"]
    # The first replacement at once, the second after a pause (a timer), no third.
    pauses = [
        e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
        for e in history.events
        if e.HasField("timer_started_event_attributes")
        and b"back off" in e.user_metadata.summary.data
    ]
    assert pauses == [timedelta(seconds=0.5)]


async def test_a_step_that_ran_resets_the_count_of_replacements(
    env: WorkflowEnvironment,  # noqa: F811
) -> None:
    stubs = Machines()
    async with running(env, stubs, replacing(stubs, 1, 0.1)) as handle:
        for count in range(1, 4):
            await until(lambda c=count: stubs.types().count(EventType.sandbox_ready) == c)  # type: ignore[misc]
            ref = await submit(env.client, handle.id, f"$ echo {count}")
            await until(lambda r=ref.id: stubs.task_statuses().get(r) == "succeeded")  # type: ignore[misc]
            await kill_machine(handle, stubs, count)
        await until(lambda: len(stubs.provisioned) == 4)
        await end(handle)
    assert stubs.events[-1].data == {"status": "ended"}


async def test_machines_dying_past_a_continue_as_new_are_still_counted(
    short_env: WorkflowEnvironment,  # noqa: F811
) -> None:
    """The replacement loop hands the session to a new run when its history grows long,
    carrying the dead machine and the count: the bound holds across runs."""
    stubs = Machines()
    async with running(short_env, stubs, replacing(stubs, 6, 0.01)) as handle:
        first_run = handle.result_run_id
        latest = short_env.client.get_workflow_handle(handle.id)
        for count in range(1, 8):
            await kill_machine(latest, stubs, count)
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(latest.result(), 60)  # a loaded host is slow
        assert (await latest.describe()).run_id != first_run, "never continued as new"
        first = short_env.client.get_workflow_handle(handle.id, run_id=first_run)
        save_history("replace-continue-as-new", await first.fetch_history())
        save_history("replace-continue-as-new-resumed", await latest.fetch_history())
    assert len(stubs.provisioned) == 7 and stubs.destroyed == stubs.provisioned
    assert "died 7 times in a row" in stubs.events[-1].data["error"]


async def test_a_replacement_claims_a_warm_vm_of_its_own(
    env: WorkflowEnvironment,  # noqa: F811
) -> None:
    """Each claim has its own key: the pool remembers its answers by key (a retried claim
    gets the same VM), so a key per session handed a replacement its dead predecessor."""
    stubs = Machines()
    stubs.pool = ["warm-1", "warm-2"]
    session = params(stubs).model_copy(update={"warm_pool": True})
    async with running(env, stubs, session) as handle:
        await kill_machine(handle, stubs, 1)
        await until(lambda: len(stubs.claimed) == 2)
        ref = await submit(env.client, handle.id, "$ echo on the replacement")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("claim-per-claim", await handle.fetch_history())
    first, second = stubs.claim_keys
    assert first != second and first.startswith(session.session_id + "/")
    assert stubs.ran_on == ["warm-2"] and stubs.provisioned == []


async def test_a_suspended_machine_behind_a_lost_step_is_woken_not_replaced(
    env: WorkflowEnvironment,  # noqa: F811
) -> None:
    """A step waited out a machine paused behind the session's back: its files are whole,
    so the next task wakes it."""
    stubs = Machines()
    stubs.health = Health(running=False, guest_connected=False, detail="paused")
    async with running(env, stubs, params(stubs)) as handle:
        lost = await submit(env.client, handle.id, "$ lost")
        await until(lambda: stubs.task_statuses().get(lost.id) == "failed")
        stubs.health = Health(running=True, guest_connected=True)
        ref = await submit(env.client, handle.id, "$ echo woken")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("suspended-wakes", await handle.fetch_history())
    (sandbox,) = stubs.provisioned
    assert stubs.died() == [] and f"wake {sandbox}" in stubs.power
    assert stubs.ran_on == [sandbox, sandbox]


async def test_a_hibernation_that_failed_after_the_save_is_taken_for_what_the_host_sees(
    env: WorkflowEnvironment,  # noqa: F811
) -> None:
    stubs = Machines()
    stubs.broken_hibernate = True
    session = params(stubs).model_copy(update={"hibernate_after_s": 0.5})
    async with running(env, stubs, session) as handle:
        await until(lambda: EventType.sandbox_hibernation_failed in stubs.types())
        await until(lambda: stubs.events[-1].data == {"status": "hibernated"})
        failed = next(e for e in stubs.events if e.type == EventType.sandbox_hibernation_failed)
        assert failed.data.get("unsure") is True
        stubs.health = Health(running=True, guest_connected=True)
        ref = await submit(env.client, handle.id, "$ echo woken first")
        await until(lambda: stubs.task_statuses().get(ref.id) == "succeeded")
        await end(handle)
        save_history("hibernate-checked", await handle.fetch_history())
    (sandbox,) = stubs.provisioned
    assert f"wake {sandbox}" in stubs.power and stubs.ran_on == [sandbox]
