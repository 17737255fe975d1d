"""Services in the guest: started by a step, outliving it, their output kept, stopped on
request, never restarted (the agent runs as itself here: no step user)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from guest_agent import services
from guest_agent.protocol import Close, Data
from sandboxes.models import ServiceStep, TerminalStep
from workflows.plans import user_plan


async def test_a_service_outlives_its_step_and_stops(tmp_path: Path) -> None:
    running = services.Services(str(tmp_path), None)
    said: list[str] = []

    async def say(text: str) -> None:
        said.append(text)

    step = {"kind": "service", "command": "echo ready; exec sleep 60"}
    code, error, result = await services.run_step(running, say, step)
    assert (code, error, result) == (0, None, {"content": "s1"})
    assert said[0] == "ready" and "service s1 started" in said[-1]
    assert running.listing()[0]["running"] is True

    sent: list[Data | Close] = []

    async def send(frame: Data | Close) -> None:
        sent.append(frame)

    await running.serve("c1", {"op": "output", "name": "s1"}, send)
    assert isinstance(sent[0], Data) and sent[0].data == b"ready\n"
    await running.serve("c2", {"op": "stop", "name": "s1"}, send)
    assert isinstance(sent[-1], Close) and sent[-1].result is not None
    assert sent[-1].result["running"] is False and sent[-1].result["stopped"] is True
    await asyncio.sleep(0.2)
    assert running.listing()[0]["running"] is False  # and it stays ended: no restart
    await running.serve("c3", {"op": "stop", "name": "s9"}, send)
    assert isinstance(sent[-1], Close) and sent[-1].error == "missing: no service s9"


async def test_a_service_that_ends_at_once_fails_its_step(tmp_path: Path) -> None:
    running = services.Services(str(tmp_path), None)
    said: list[str] = []

    async def say(text: str) -> None:
        said.append(text)

    code, error, _ = await services.run_step(running, say, {"command": "echo broken; exit 3"})
    assert code == 3 and error == "the service ended at once (exit code 3)"
    assert said == ["broken"]


def test_service_lines_in_a_written_plan() -> None:
    plan = user_plan("$ service: python3 -m http.server 8000\n$ curl -s localhost:8000\n"
                     "$ service-stop: s1")  # fmt: skip
    assert plan == [
        ServiceStep(command="python3 -m http.server 8000"),
        TerminalStep(command="curl -s localhost:8000"),
        ServiceStep(action="stop", name="s1"),
    ]
    # Before services (a history that replays), the same line is a command.
    assert user_plan("$ service: x", services=False) == [TerminalStep(command="service: x")]
