"""Replays recorded SessionWorkflow histories, one per path (happy, cancel, failure,
continue-as-new, each update and signal, preserve and restore), and SandboxPool's (claims and
refills, a stop with a boot in flight or a VM that cannot be removed, continue-as-new): a
change to a workflow that would break running ones (non-determinism) fails here. The
histories of the workflows running on a real server are replayed by ``python -m berth
replay`` (workflows/replay.py), before a deploy.

Histories are kept per workflow version in tests/workflows/histories/<version>/. Record a new
version's with ``BERTH_RECORD_HISTORY=1 pytest tests/workflows/test_session.py`` (after pointing
``HISTORIES`` there at a new folder); a compatible change keeps replaying the old ones, an
incompatible one is versioned with workflow.patched.

Histories are write-once: SHA256SUMS beside them holds each file's hash, and a file that
changed, or one not listed, fails here. A new recording is listed by adding its line
(``sha256sum v5/name.json >> SHA256SUMS`` in that folder); an old one is never re-recorded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.pool import SandboxPool
from workflows.session import SessionWorkflow
from workflows.webhooks import WebhookDelivery

FOLDER = Path(__file__).parent / "histories"
HISTORIES = sorted(FOLDER.glob("*/*.json"))


def test_recorded_histories_are_write_once() -> None:
    sums = (FOLDER / "SHA256SUMS").read_text().splitlines()
    listed = {name: digest for digest, name in (line.split(maxsplit=1) for line in sums)}
    found = {p.relative_to(FOLDER).as_posix(): p for p in HISTORIES}
    assert set(found) == set(listed), "list each new recording in SHA256SUMS; remove none"
    changed = [
        name
        for name, path in found.items()
        if hashlib.sha256(path.read_bytes()).hexdigest() != listed[name]
    ]
    assert not changed, f"recorded histories are write-once; record a new version: {changed}"


def test_every_path_has_a_recorded_history() -> None:
    assert {p.stem for p in HISTORIES} >= {
        "happy", "cancel", "failure", "continue-as-new", "agent",
        # Each update and signal, and the pool's own paths (issue 17).
        "pause-resume-modify-cancel", "modify-twice", "preserve", "restore", "replace-then-end",
        "pool-claim", "pool-claim-refill", "pool-stop", "pool-stop-undeletable",
        "pool-continue-as-new", "pool-continue-as-new-resumed",
        # A webhook delivery retried (issue 24).
        "webhook-retried",
        # Checkpoints, rollback and forks (issue 19).
        "checkpoint-rollback", "rollback-mid-step", "auto-checkpoint", "fork",
        # An end while a checkpoint or rollback has the machine; events keyed by content.
        "end-during-checkpoint", "end-during-rollback", "end-during-rollback-with-queued",
        "checkpoints-one-at-a-time", "delete-during-rollback", "checkpoint-during-hibernate",
        # A session placed, moved off a lost host, moved off a drained one (issue 18).
        "host-lost-move", "drain-move",
    }  # fmt: skip


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: f"{p.parent.name}/{p.stem}")
async def test_a_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(f"replay-{path.stem}", path.read_text())  # noqa: ASYNC240
    assert any(e.HasField("activity_task_scheduled_event_attributes") for e in history.events)
    replayer = Replayer(
        workflows=[SessionWorkflow, SandboxPool, WebhookDelivery],
        data_converter=pydantic_data_converter,
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
