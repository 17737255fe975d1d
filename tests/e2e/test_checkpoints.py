"""Checkpoints, rollback and forks on the whole system with Docker sandboxes: a task that
deletes files is rolled back and the next task finds them; a checkpoint forked three ways
gives three sessions, each with the checkpoint's files and a workspace of its own; the API
refuses what it must."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from store.events import EventType
from tests.e2e.test_sandbox_lifecycle import run_task
from tests.e2e.test_system import read_events, token_for, wait_status
from tests.support.local import LocalSystem


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    running = LocalSystem.start(tmp_path_factory.mktemp("berth"), "ckpt")
    yield running
    assert running.stop() == 0


def new_session(base: str, headers: dict[str, str]) -> str:
    sid: str = httpx.post(f"{base}/api/sessions", json={}, headers=headers).json()["id"]
    wait_status(base, headers, sid, "ready")
    return sid


def checkpoint(base: str, headers: dict[str, str], sid: str, **body: Any) -> dict[str, Any]:
    answer = httpx.post(
        f"{base}/api/sessions/{sid}/checkpoints", json=body, headers=headers, timeout=60
    )
    assert answer.status_code == 201, answer.text
    taken: dict[str, Any] = answer.json()
    return taken


def test_a_rollback_brings_deleted_files_back(system: LocalSystem) -> None:
    base = system.base
    headers = token_for(base, "roller@example.com")
    sid = new_session(base, headers)
    run_task(base, headers, sid, "$ mkdir src && echo one > src/a.txt && echo two > b.txt", 0)
    taken = checkpoint(base, headers, sid, memory=True, label="whole")
    # A container's memory is not kept, and the answer says so.
    assert taken["memory"] is False and "Docker" in taken["note"]
    assert taken["label"] == "whole" and taken["size_bytes"] > 0
    listed = httpx.get(f"{base}/api/sessions/{sid}/checkpoints", headers=headers).json()
    assert [c["id"] for c in listed] == [taken["id"]]

    answer = httpx.post(
        f"{base}/api/sessions/{sid}/tasks", json={"prompt": "$ rm -rf src b.txt"}, headers=headers
    )
    breaking = answer.json()["id"]
    seen = read_events(base, headers, sid, lambda e: e["data"].get("task_id") == breaking
                       and e["data"].get("status") == "succeeded")  # fmt: skip
    assert "No such file" in run_task(base, headers, sid, "$ ls src b.txt || true", seen[-1]["seq"])

    rolled = httpx.post(
        f"{base}/api/sessions/{sid}/checkpoints/{taken['id']}/rollback", headers=headers,
        timeout=60,
    )  # fmt: skip
    assert rolled.status_code == 200, rolled.text
    undone = rolled.json()["rolled_back"]
    assert breaking in undone and len(undone) == 2  # the rm and the ls after it
    event = read_events(base, headers, sid, lambda e: e["type"] == EventType.session_rolled_back)
    assert event[-1]["data"]["tasks"] == undone
    output = run_task(base, headers, sid, "$ cat src/a.txt b.txt", event[-1]["seq"])
    assert output == "one\ntwo\n"

    # Refusals: an unknown checkpoint, another user's session, too many forks.
    unknown = f"{base}/api/sessions/{sid}/checkpoints/{'0' * 32}/rollback"
    assert httpx.post(unknown, headers=headers).status_code == 404
    stranger = token_for(base, "stranger2@example.com")
    theirs = f"{base}/api/sessions/{sid}/checkpoints"
    assert httpx.get(theirs, headers=stranger).status_code == 404
    assert httpx.post(f"{theirs}/{taken['id']}/rollback", headers=stranger).status_code == 404
    too_many = httpx.post(f"{theirs}/{taken['id']}/fork", json={"count": 9}, headers=headers)
    assert too_many.status_code == 422, too_many.text

    deleted = httpx.delete(f"{theirs}/{taken['id']}", headers=headers)
    assert deleted.status_code == 204, deleted.text
    assert httpx.get(theirs, headers=headers).json() == []
    assert not (system.data / "checkpoints" / taken["id"]).exists()
    httpx.delete(f"{base}/api/sessions/{sid}", headers=headers)


def test_three_forks_each_go_their_own_way(system: LocalSystem) -> None:
    base = system.base
    headers = token_for(base, "forker@example.com")
    sid = new_session(base, headers)
    run_task(base, headers, sid, "$ echo shared > base.txt", 0)
    taken = checkpoint(base, headers, sid, label="fork point")
    answer = httpx.post(
        f"{base}/api/sessions/{sid}/checkpoints/{taken['id']}/fork",
        json={"count": 3}, headers=headers, timeout=60,
    )  # fmt: skip
    assert answer.status_code == 201, answer.text
    forks = answer.json()
    assert len(forks) == 3 and all(f["parent_id"] == sid for f in forks)
    assert all(f["parent_checkpoint_id"] == taken["id"] for f in forks)
    handles = set()
    for number, child in enumerate(forks):
        fid = child["id"]
        wait_status(base, headers, fid, "ready")
        first = read_events(base, headers, fid, lambda e: e["type"] == EventType.sandbox_ready)
        assert first[0]["type"] == EventType.session_forked_from
        assert first[0]["data"] == {"parent_id": sid, "checkpoint_id": taken["id"],
                                    "seq": taken["seq"]}  # fmt: skip
        handles.add(first[-1]["data"]["handle"])
        output = run_task(
            base, headers, fid, f"$ echo {number} > fork-{number}.txt && cat base.txt && ls", 0
        )
        # The checkpoint's file, and its own file only: no other fork's.
        assert output == f"shared\nbase.txt\nfork-{number}.txt\n", output
    assert len(handles) == 3  # three machines
    # The parent goes on untouched by its forks.
    parent = run_task(base, headers, sid, "$ ls", 0)
    assert parent == "base.txt\n"
    for child in [*forks, {"id": sid}]:
        httpx.delete(f"{base}/api/sessions/{child['id']}", headers=headers)
