"""Chaos at the model provider (a fake OpenAI-compatible server on loopback: the test's
edge): the first provider down, then slow, then every provider failing. A task falls back
to the next provider or fails with a clear error within a bound; none is left running."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from store.events import EventType
from tests.e2e.chaos.harness import report, system
from tests.e2e.test_spine import Spine, User, is_event
from tests.support.local import free_port
from tests.support.scripted_llm import Reply, ScriptedLLM

PLAN = json.dumps({"steps": [{"command": "echo planned"}]})
VERDICT = json.dumps({"ok": True, "answer": "planned", "reason": "said"})
TIMEOUT_S = 3.0  # BERTH_LLM_TIMEOUT_S: a slow provider is one slower than this
PRIMARY_PORT = free_port()  # nothing listens here until the primary comes up, slow


def answer(body: dict[str, Any]) -> str:
    verifying = body["messages"][0]["content"].startswith("You check the work")
    return VERDICT if verifying else PLAN


@pytest.fixture(scope="module")
def backup() -> Iterator[ScriptedLLM]:
    with ScriptedLLM(script=answer) as server:
        yield server


@pytest.fixture(scope="module")
def spine(tmp_path_factory: pytest.TempPathFactory, backup: ScriptedLLM) -> Iterator[Spine]:
    providers = [
        {"name": "primary", "model": "big", "base_url": f"http://127.0.0.1:{PRIMARY_PORT}/v1",
         "api_key": "k1"},
        {"name": "backup", "model": "small", "base_url": f"{backup.url}/v1", "api_key": "k2"},
    ]  # fmt: skip
    yield from system(
        tmp_path_factory.mktemp("berth-chaos-model"),
        "chaosmodel",
        {
            "BERTH_LLM_PROVIDERS": json.dumps(providers),
            "BERTH_LLM_TIMEOUT_S": str(TIMEOUT_S),
            "BERTH_LLM_BACKOFF_S": "0.05",
            # Each phase starts with the primary again, not after its cooldown.
            "BERTH_LLM_COOLDOWN_S": "0.01",
        },
    )


def prose(
    user: User, sid: str, phase: str, bound_s: float
) -> tuple[dict[str, Any], float, list[str]]:
    """A prose task (planned by a model), its words new to the cache: how it ended, how long
    it took, who planned it."""
    started = time.monotonic()
    tid = user.queue(sid, f"say that it was planned ({phase})")
    task = user.wait_task(sid, tid, bound_s)
    took = time.monotonic() - started
    stream = user.stream(sid)
    ended = is_event(EventType.task_status, task_id=tid, status=task["status"])
    stream.wait_for("the task's end", ended, 10)
    planners = [
        e["data"].get("provider")
        for e in stream.events
        if e["type"] == EventType.task_plan and e["data"]["task_id"] == tid
    ]
    return task, took, planners


@pytest.mark.timeout(300)
def test_a_provider_down_then_slow_falls_back_or_fails_clearly(
    user: User, backup: ScriptedLLM
) -> None:
    sid = user.new_session()
    user.wait_session(sid, "ready", 90)

    task, took, planners = prose(user, sid, "primary down", 90)
    report(f"primary down (nothing listens): task {task['status']} in {took:.1f} s, "
           f"planned by {planners}")  # fmt: skip
    assert task["status"] == "succeeded" and planners == ["backup"], task

    slow = Reply(content=PLAN, hang_s=4 * TIMEOUT_S)
    with ScriptedLLM(default=slow, port=PRIMARY_PORT) as primary:
        task, took, planners = prose(user, sid, "primary slow", 120)
        report(f"primary slow ({slow.hang_s:.0f} s an answer, timeout {TIMEOUT_S:.0f} s): "
               f"task {task['status']} in {took:.1f} s, planned by {planners}, "
               f"{len(primary.requests)} calls to the primary")  # fmt: skip
        assert task["status"] == "succeeded" and planners == ["backup"], task
        assert primary.requests, "the slow primary was never asked"

        backup.script = None
        backup.default = Reply(status=503)
        try:
            task, took, planners = prose(user, sid, "all failing", 150)
        finally:
            backup.script, backup.default = answer, None
    report(f"primary slow and backup failing: task {task['status']} in {took:.1f} s, "
           f"error {task['error']!r}")  # fmt: skip
    assert task["status"] == "failed", task
    assert task["error"], "a failed task without a reason"

    task, took, planners = prose(user, sid, "providers back", 90)
    assert task["status"] == "succeeded", task
    assert user.session(sid)["status"] == "ready"
    report(f"providers back: the next task succeeded in {took:.1f} s in the same session")
