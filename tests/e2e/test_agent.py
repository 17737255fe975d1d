"""The agent loop end to end: the whole system as `make run` starts it, its planner and
verifier a scripted OpenAI-compatible server on loopback, steps run in a real sandbox."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from sandboxes.docker import NETWORK
from store.events import EventType
from tests.e2e.test_system import read_events, token_for, wait_status
from tests.guest_agent.test_browser import serve_pages
from tests.support.local import LocalSystem, free_port
from tests.support.scripted_llm import ScriptedLLM

PRIMES = """\
primes = []
n = 2
while len(primes) < 10:
    if all(n % p for p in primes):
        primes.append(n)
    n += 1
print(*primes)
"""


class Agent:
    """The model's side of each task, by a word of its prompt: the planner's replies and the
    verifier's, in order."""

    def __init__(self) -> None:
        self.plans: dict[str, list[dict[str, Any]]] = {}
        self.verdicts: dict[str, list[dict[str, Any]]] = {}
        self.asked: dict[str, list[str]] = defaultdict(list)

    def __call__(self, body: dict[str, Any]) -> str:
        system, asked = body["messages"][0]["content"], body["messages"][-1]["content"]
        word = next(w for w in self.plans if w in asked.partition("\n\n")[0])
        role = "verify" if system.startswith("You check the work") else "plan"
        self.asked[word].append(f"{role}: {asked}")
        replies = (self.verdicts if role == "verify" else self.plans)[word]
        return json.dumps(replies.pop(0) if len(replies) > 1 else replies[0])


@pytest.fixture(scope="module")
def agent() -> Agent:
    return Agent()


@pytest.fixture(scope="module")
def llm(agent: Agent) -> Iterator[ScriptedLLM]:
    with ScriptedLLM(script=agent) as server:
        yield server


@pytest.fixture(scope="module")
def page_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, llm: ScriptedLLM, page_port: int
) -> Iterator[str]:
    running = LocalSystem.start(
        tmp_path_factory.mktemp("berth-agent"),
        "agent",
        {
            **llm.settings,
            "BERTH_AGENT_MAX_STEPS": "4",
            # Sessions idle for 3 s hibernate: tasks here wake them (Docker: pause/unpause).
            "BERTH_SESSION_HIBERNATE_AFTER_S": "3",
            # The page the browser test serves: the one host port sandboxes may reach.
            "BERTH_SANDBOX_HOST_PORTS": f"[{page_port}]",
        },
    )
    yield running.base
    assert running.stop() == 0


@pytest.fixture(scope="module")
def session(system: str) -> Iterator[tuple[dict[str, str], str]]:
    headers = token_for(system, "agent@example.com")
    sid = httpx.post(f"{system}/api/sessions", json={}, headers=headers).json()["id"]
    wait_status(system, headers, sid, "ready")
    yield headers, sid
    httpx.delete(f"{system}/api/sessions/{sid}", headers=headers)


def run_task(system: str, session: tuple[dict[str, str], str], prompt: str) -> dict[str, Any]:
    """Submit a task; its events, once it has ended, and its final state over the API."""
    headers, sid = session
    url = f"{system}/api/sessions/{sid}"
    task = httpx.post(f"{url}/tasks", json={"prompt": prompt}, headers=headers).json()

    def ended(event: dict[str, Any]) -> bool:
        data = event["data"]
        return (
            event["type"] == EventType.task_status
            and data["task_id"] == task["id"]
            and (data["status"] in ("succeeded", "failed", "cancelled"))
        )

    events = read_events(system, headers, sid, ended)
    mine = [e for e in events if e["data"].get("task_id") == task["id"]]
    final = httpx.get(f"{url}/tasks/{task['id']}", headers=headers).json()
    return {"events": mine, "task": final}


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == kind]


def test_a_failed_verification_leads_to_a_new_plan_and_then_an_answer(
    system: str, session: tuple[dict[str, str], str], agent: Agent
) -> None:
    prompt = "create a Python script that prints the first 10 primes, run it, show the output"
    agent.plans["primes"] = [
        {
            "steps": [
                {"kind": "file", "op": "write", "path": "primes.py", "content": PRIMES,
                 "check": {"kind": "file_exists", "value": "primes.py"}},
                {"kind": "terminal", "command": "python3 primes.py",
                 "check": {"kind": "output_contains", "value": "29"}},
            ]
        },
        {"steps": [{"kind": "terminal", "command": "python3 primes.py",
                    "check": {"kind": "output_regex", "value": "^2 3 5 7"}}]},
    ]  # fmt: skip
    agent.verdicts["primes"] = [
        {"ok": False, "answer": "", "reason": "the output was not shown to the user"},
        {"ok": True, "answer": "2 3 5 7 11 13 17 19 23 29", "reason": "printed"},
    ]
    ran = run_task(system, session, prompt)
    assert ran["task"]["status"] == "succeeded", ran
    assert ran["task"]["result"] == "2 3 5 7 11 13 17 19 23 29"
    plans = of_type(ran["events"], EventType.task_plan)
    assert [(p["first"], p.get("revised")) for p in plans] == [
        (0, None),
        (2, "the result falls short of the goal: the output was not shown to the user"),
    ]
    finished = of_type(ran["events"], EventType.step_finished)
    assert [f["status"] for f in finished] == ["succeeded"] * 3
    assert [f["check"]["ok"] for f in finished] == [True, True, True]
    output = "".join(e["text"] for e in of_type(ran["events"], EventType.step_output))
    assert "2 3 5 7 11 13 17 19 23 29" in output
    assert [v["ok"] for v in of_type(ran["events"], EventType.task_verified)] == [False, True]
    # The second plan was made knowing what the first did and why it fell short.
    second = [a for a in agent.asked["primes"] if a.startswith("plan")][1]
    assert "python3 primes.py" in second and "not shown to the user" in second


def test_a_refused_command_is_fed_back_and_the_agent_works_around_it(
    system: str, session: tuple[dict[str, str], str], agent: Agent
) -> None:
    agent.plans["inline"] = [
        {"steps": [{"kind": "terminal", "command": "python3 -c 'print(6 * 7)'"}]},
        {"steps": [{"kind": "file", "op": "write", "path": "six.py", "content": "print(6 * 7)"},
                   {"kind": "terminal", "command": "python3 six.py",
                    "check": {"kind": "output_contains", "value": "42"}}]},
    ]  # fmt: skip
    agent.verdicts["inline"] = [{"ok": True, "answer": "42", "reason": "shown"}]
    ran = run_task(system, session, "compute six times seven inline")
    assert ran["task"]["status"] == "succeeded" and ran["task"]["result"] == "42", ran
    refused = of_type(ran["events"], EventType.step_finished)[0]
    assert refused["status"] == "refused" and "python3 -c" in refused["error"]
    second = [a for a in agent.asked["inline"] if a.startswith("plan")][1]
    assert "refused" in second and "python3 -c" in second


def test_a_task_that_never_gets_there_ends_failed_when_its_steps_run_out(
    system: str, session: tuple[dict[str, str], str], agent: Agent
) -> None:
    agent.plans["hopeless"] = [
        {"steps": [{"kind": "terminal", "command": "ls /nowhere",
                    "check": {"kind": "exit_code", "value": "0"}}]}
    ]  # fmt: skip
    agent.verdicts["hopeless"] = [{"ok": False, "reason": "never"}]
    ran = run_task(system, session, "hopeless: list a directory that is not there")
    assert ran["task"]["status"] == "failed"
    assert "ran out of its step budget: 4 steps" in ran["task"]["error"]
    assert len(of_type(ran["events"], EventType.step_started)) == 4


@contextmanager
def title_task(agent: Agent, port: int) -> Iterator[str]:
    """A page served where sandboxes may reach it (the Docker bridge's address, ``port``),
    the agent's script to read its title, and the task's prompt."""
    bridge = subprocess.run(
        ["docker", "network", "inspect", NETWORK, "--format",
         "{{(index .IPAM.Config 0).Gateway}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    with serve_pages(bridge, port) as base:
        agent.plans["title"] = [
            {"steps": [{"kind": "browser", "action": "navigate", "url": f"{base}/form",
                        "check": {"kind": "page_text_contains", "value": "Go"}}]}
        ]  # fmt: skip
        agent.verdicts["title"] = [{"ok": True, "answer": "Form", "reason": "the title is read"}]
        yield f"open the page at {base}/form and tell me its title"


def test_a_browser_task_reads_a_page_title_and_its_screenshot_is_served(
    system: str, session: tuple[dict[str, str], str], agent: Agent, page_port: int
) -> None:
    with title_task(agent, page_port) as prompt:
        ran = run_task(system, session, prompt)
    assert ran["task"]["status"] == "succeeded" and ran["task"]["result"] == "Form", ran
    (finished,) = of_type(ran["events"], EventType.step_finished)
    assert finished["check"]["ok"] and finished["result"]["title"] == "Form"
    # The verifier read the title the browser found.
    assert "title: Form" in next(a for a in agent.asked["title"] if a.startswith("verify"))
    headers, sid = session
    (shot,) = finished["artifacts"]
    url = f"{system}/api/sessions/{sid}/artifacts/{shot}"
    image = httpx.get(url, headers=headers)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content.startswith(b"\xff\xd8")  # a JPEG
    stranger = token_for(system, "stranger@example.com")
    assert httpx.get(url, headers=stranger).status_code == 404


def test_a_hibernated_session_wakes_for_the_next_task_with_its_files(
    system: str, session: tuple[dict[str, str], str]
) -> None:
    ran = run_task(system, session, "$ echo kept > kept.txt")
    assert ran["task"]["status"] == "succeeded", ran
    headers, sid = session
    wait_status(system, headers, sid, "hibernated")
    ran = run_task(system, session, "$ cat kept.txt")
    assert ran["task"]["status"] == "succeeded" and ran["task"]["result"] == "kept\n", ran
    woken = read_events(system, headers, sid, lambda e: e["type"] == EventType.sandbox_woken)
    assert woken[-1]["type"] == EventType.sandbox_woken
