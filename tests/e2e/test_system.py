"""The whole system, as `make run` starts it: Temporal dev server, worker, API, a Docker
sandbox with the guest agent. Driven over the JSON API and in Chromium."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from store.events import EventType
from tests.support.local import LocalSystem

DONE = (EventType.task_status, "succeeded")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running = LocalSystem.start(tmp_path_factory.mktemp("berth"), "e2e")
    yield running.base
    assert running.stop() == 0


def token_for(base: str, email: str) -> dict[str, str]:
    credentials = {"email": email, "password": "correct horse"}
    assert httpx.post(f"{base}/api/auth/signup", json=credentials).status_code == 201
    token = httpx.post(f"{base}/api/auth/token", json=credentials).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def wait_status(base: str, headers: dict[str, str], sid: str, wanted: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        session: dict[str, Any] = httpx.get(f"{base}/api/sessions/{sid}", headers=headers).json()
        if session["status"] == wanted:
            return session
        assert session["status"] != "failed", session
        time.sleep(0.3)
    raise AssertionError(f"session {sid} never became {wanted}")


def read_events(
    base: str,
    headers: dict[str, str],
    sid: str,
    until: tuple[str, str] | Callable[[dict[str, Any]], bool],
    after: int = 0,
) -> list[dict[str, Any]]:
    """The SSE stream's events, up to the first of type ``until[0]`` with status
    ``until[1]``, or the first for which ``until`` is true."""
    if isinstance(until, tuple):
        kind, status = until
        until = lambda event: (event["type"], event["data"].get("status")) == (kind, status)  # noqa: E731
    seen: list[dict[str, Any]] = []
    url = f"{base}/api/sessions/{sid}/events"
    with httpx.stream(
        "GET", url, headers={**headers, "Last-Event-ID": str(after)}, timeout=60
    ) as stream:
        current: dict[str, str] = {}
        for line in stream.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                name, _, value = line.partition(": ")
                current[name] = value
            elif line == "" and "data" in current:
                event = json.loads(current["data"])
                assert int(current["id"]) == event["seq"] and current["event"] == event["type"]
                seen.append(event)
                current = {}
                if until(event):
                    return seen
    raise AssertionError("stream ended early")


def test_a_task_runs_in_a_real_sandbox_and_streams_its_output(system: str) -> None:
    base = system
    assert httpx.get(f"{base}/api/sessions").status_code == 401
    headers = token_for(base, "e2e@example.com")
    assert (
        httpx.post(f"{base}/api/sessions", json={"template": "nope"}, headers=headers).status_code
        == 422
    )

    session = httpx.post(f"{base}/api/sessions", json={}, headers=headers)
    assert session.status_code == 201
    sid = session.json()["id"]
    wait_status(base, headers, sid, "ready")
    bad = httpx.post(f"{base}/api/sessions/{sid}/tasks", json={"prompt": ""}, headers=headers)
    assert bad.status_code == 422

    task = httpx.post(
        f"{base}/api/sessions/{sid}/tasks",
        json={"prompt": "$ echo hello && uname -a"},
        headers=headers,
    )
    assert task.status_code == 202
    tid = task.json()["id"]
    events = read_events(base, headers, sid, DONE)
    output = "".join(e["data"]["text"] for e in events if e["type"] == EventType.step_output)
    assert output.startswith("hello\nLinux ")
    types = [e["type"] for e in events]
    assert (
        types.index(EventType.task_plan)
        < types.index(EventType.step_started)
        < types.index(EventType.step_output)
    )
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    # Replay from a sequence number skips what the client had.
    later = read_events(base, headers, sid, DONE, after=events[-3]["seq"])
    assert [e["seq"] for e in later] == [e["seq"] for e in events[-2:]]

    detail = httpx.get(f"{base}/api/sessions/{sid}/tasks/{tid}", headers=headers).json()
    assert detail["status"] == "succeeded"
    assert detail["steps"][0]["exit_code"] == 0 and "hello" in detail["steps"][0]["output"]

    # Another user sees none of it.
    stranger = token_for(base, "stranger@example.com")
    assert httpx.get(f"{base}/api/sessions/{sid}", headers=stranger).status_code == 404

    sandbox = next(e["data"] for e in events if e["type"] == EventType.sandbox_ready)
    assert httpx.delete(f"{base}/api/sessions/{sid}", headers=headers).status_code == 202
    wait_status(base, headers, sid, "ended")
    gone = subprocess.run(["docker", "inspect", sandbox["handle"]], capture_output=True)
    assert gone.returncode != 0, "the sandbox container outlived its session"
    refused = httpx.post(
        f"{base}/api/sessions/{sid}/tasks", json={"prompt": "$ true"}, headers=headers
    )
    assert refused.status_code == 409


def test_a_person_runs_a_command_from_the_dashboard(system: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        page = browser.new_page()
        refused: list[str] = []  # what the Content-Security-Policy blocked, if anything
        page.on(
            "console",
            lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.goto(system)
        page.fill("input[name=email]", "person@example.com")
        page.fill("input[name=password]", "not signed up yet")
        page.click("button[value=login]")
        assert "wrong email or password" in page.inner_text(".error")
        page.fill("input[name=email]", "person@example.com")
        page.fill("input[name=password]", "long enough")
        page.click("button[value=signup]")
        page.click("text=Start a session")
        page.wait_for_url("**/sessions/*")
        page.wait_for_selector("#session-status:text('ready')", timeout=120_000)
        page.fill("#prompt", "$ ls -la /")
        page.click("text=Run")
        page.wait_for_selector("#terminal:has-text('[succeeded, exit 0]')", timeout=60_000)
        terminal = page.inner_text("#terminal")
        assert "$ ls -la /" in terminal and "proc" in terminal and "etc" in terminal
        page.wait_for_selector("#tasks .badge.t-succeeded")  # the task's end follows its step's
        assert page.input_value("#prompt") == "", "the task form was not reset"
        assert refused == []
        page.screenshot(path=str(tmp_path / "dashboard.png"))
        browser.close()
