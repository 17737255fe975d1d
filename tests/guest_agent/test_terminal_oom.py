"""A command the kernel's out-of-memory killer ends says so in its error; one killed
otherwise does not. The kernel's counter is a file the test points the guest at, which the
command itself bumps just before it is killed (a real process, a real SIGKILL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_agent import terminal
from guest_agent.execution import Execution


@pytest.fixture
def counter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    counter = tmp_path / "memory.events"
    counter.write_text("low 0\noom 0\noom_kill 3\n")
    monkeypatch.setattr(terminal, "OOM_COUNTERS", (tmp_path / "missing", counter))
    return counter


async def test_a_command_killed_for_memory_says_so(tmp_path: Path, counter: Path) -> None:
    step = Execution(exec_id="e", timeout_s=10)
    command = f"printf 'oom 1\\noom_kill 4\\n' > {counter}; kill -9 $$"
    code, error = await terminal.run_command(step, command, str(tmp_path))
    assert code == -9
    assert error == terminal.OUT_OF_MEMORY


async def test_a_command_killed_otherwise_has_no_such_error(tmp_path: Path, counter: Path) -> None:
    step = Execution(exec_id="e", timeout_s=10)
    code, error = await terminal.run_command(step, "kill -9 $$", str(tmp_path))
    assert (code, error) == (-9, None)
    assert terminal.oom_kills() == 3
