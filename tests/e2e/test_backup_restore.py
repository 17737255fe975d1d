"""Backup and restore of a whole running system: a backup taken with a session in flight,
restored into a new data dir, and a system started on it that has the users, the sessions,
their events and artifacts, and no session left half-alive."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from store.events import EventType
from tests.e2e.test_system import read_events, token_for, wait_status
from tests.support.local import LocalSystem

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

DONE = (EventType.task_status, "succeeded")


def berth(data: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "berth", *args],
        env={**os.environ, "BERTH_DATA_DIR": str(data)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_backup_with_a_session_in_flight_restores_into_a_new_data_dir(tmp_path: Path) -> None:
    old = LocalSystem.start(tmp_path / "old", "backup")
    try:
        headers = token_for(old.base, "backup@example.com")
        sid = httpx.post(f"{old.base}/api/sessions", json={}, headers=headers).json()["id"]
        wait_status(old.base, headers, sid, "ready")
        task = httpx.post(
            f"{old.base}/api/sessions/{sid}/tasks",
            json={"prompt": "$ echo before the backup"},
            headers=headers,
        )
        assert task.status_code == 202
        before = read_events(old.base, headers, sid, DONE)
        artifacts = sorted(
            p.relative_to(old.data).as_posix()
            for p in (old.data / "shared").rglob("artifacts/**/*")
        )
        said = berth(old.data, "backup", str(tmp_path / "copy"))
        assert "backed up to" in said
        # The old install goes on (and then away): its session ends with its machine.
        assert httpx.delete(f"{old.base}/api/sessions/{sid}", headers=headers).status_code == 202
        wait_status(old.base, headers, sid, "ended")
    finally:
        assert old.stop() == 0

    # Never over an install.
    refused = subprocess.run(
        [sys.executable, "-m", "berth", "restore", str(tmp_path / "copy")],
        env={**os.environ, "BERTH_DATA_DIR": str(old.data)},
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "not empty" in refused.stdout

    said = berth(tmp_path / "new", "restore", str(tmp_path / "copy"))
    assert "1 sessions live in the backup ended" in said
    new = LocalSystem.start(tmp_path / "new", "restored")
    try:
        # The user's token (its row and key came along) and password both work.
        session = httpx.get(f"{new.base}/api/sessions/{sid}", headers=headers).json()
        assert session["status"] == "ended"
        assert "restored from a backup" in session["error"]
        token = httpx.post(
            f"{new.base}/api/auth/token",
            json={"email": "backup@example.com", "password": "correct horse"},
        )
        assert token.status_code == 200
        after = read_events(
            new.base, headers, sid, lambda e: e["type"] == EventType.session_status
            and e["data"]["status"] == "ended",
        )  # fmt: skip
        assert [e["seq"] for e in after[: len(before)]] == [e["seq"] for e in before]
        output = "".join(e["data"]["text"] for e in after if e["type"] == EventType.step_output)
        assert output == "before the backup\n"
        assert (
            sorted(
                p.relative_to(new.data).as_posix()
                for p in (new.data / "shared").rglob("artifacts/**/*")
            )
            == artifacts
        )

        # The restored system runs sessions of its own.
        fresh = httpx.post(f"{new.base}/api/sessions", json={}, headers=headers).json()["id"]
        wait_status(new.base, headers, fresh, "ready")
        httpx.post(
            f"{new.base}/api/sessions/{fresh}/tasks",
            json={"prompt": "$ echo after the restore"},
            headers=headers,
        )
        events = read_events(new.base, headers, fresh, DONE)
        assert any(e["type"] == EventType.step_output for e in events)
        assert httpx.delete(f"{new.base}/api/sessions/{fresh}", headers=headers).status_code == 202
        wait_status(new.base, headers, fresh, "ended")
    finally:
        assert new.stop() == 0
