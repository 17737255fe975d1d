"""Nothing of the agent's own environment, nor of the step user's files, crosses between the
root agent and what it runs: steps get an environment made from nothing, checks look at
files with the step user's rights, a regex check cannot stall the agent, and the Chromium
launcher runs Python isolated."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import guest_agent
from guest_agent import checks, files
from guest_agent.checks import Facts, evaluate
from guest_agent.chromium import LAUNCHER
from guest_agent.execution import Execution
from guest_agent.terminal import run_command
from guest_agent.user import StepUser
from sandboxes.models import TerminalStep
from tests.guest_agent.test_agent import Collector, guest_link

as_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="taking another user's rights needs root (and setpriv)",
)


def nobody() -> StepUser:
    return StepUser.named("nobody")


async def test_a_step_inherits_nothing_of_the_agents_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "HOME": "/root-of-the-agent",
        "OLDPWD": "/",
        "PWD": "/elsewhere",
        "CDPATH": "/",
        "PYTHONPATH": str(tmp_path),
        "PYTHONSTARTUP": str(tmp_path / "startup.py"),
        "BERTH_SECRET": "agent-only",
    }.items():
        monkeypatch.setenv(name, value)
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        out = Collector()
        step = TerminalStep(command="env")
        outcome = await link.gateway.run(link.sandbox_id, "env", step, 10, out)
    assert outcome.exit_code == 0
    env = dict(line.split("=", 1) for line in "".join(out.texts).splitlines() if "=" in line)
    assert env["HOME"] == str(tmp_path)  # the workspace: the steps' home, not the agent's
    leaked = {name for name in env if name in {"OLDPWD", "CDPATH", "BERTH_SECRET"}}
    leaked |= {name for name in env if name.startswith("PYTHON")}
    assert not leaked, env
    assert env.get("PWD", str(tmp_path)) == str(tmp_path)  # bash's own, of its cwd


async def test_a_catastrophic_regex_is_refused_in_time_and_the_loop_runs_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(checks, "REGEX_TIMEOUT_S", 1.0)
    facts = Facts(exit_code=0, output="a" * 40 + "!", workdir="/")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.05)

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    outcome = await evaluate({"kind": "output_regex", "value": "(a+)+$"}, facts)
    ticker.cancel()
    assert outcome == {
        "kind": "output_regex",
        "ok": False,
        "detail": "/(a+)+$/ took more than 1 s to match: refused",
    }
    assert time.monotonic() - started < 5
    assert ticks >= 10  # the event loop (heartbeats) went on meanwhile


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder others may enter, with a file they see and one in a root-only folder."""
    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    (base / "public").write_text("x")
    (base / "root-only").mkdir(mode=0o700)
    (base / "root-only" / "token").write_text("secret")
    yield base
    shutil.rmtree(base)


@as_root
async def test_a_file_check_sees_only_what_the_step_user_may(shared: Path) -> None:
    facts = Facts(exit_code=0, output="", workdir=str(shared))
    check = {"kind": "file_exists", "value": "root-only/token"}
    assert (await evaluate(check, facts) or {}).get("ok")  # the agent itself sees it
    assert await evaluate(check, facts, nobody()) == {
        "kind": "file_exists",
        "ok": False,
        "detail": "root-only/token does not exist",
    }
    public = await evaluate({"kind": "file_exists", "value": "public"}, facts, nobody())
    assert public is not None and public["ok"]


@as_root
async def test_a_regex_check_runs_as_the_step_user() -> None:
    facts = Facts(exit_code=0, output="a\nb\n", workdir="/")
    outcome = await evaluate({"kind": "output_regex", "value": "^b$"}, facts, nobody())
    assert outcome == {"kind": "output_regex", "ok": True, "detail": "/^b$/ matched 'b'"}


@as_root
def test_the_chromium_launcher_runs_python_isolated_and_chromium_as_the_user(
    tmp_path: Path,
) -> None:
    # What a step could leave for root's Python: a sitecustomize on a path, a user site .pth.
    marker = tmp_path / "ran-as-root"
    hostile = tmp_path / "hostile"
    (hostile / "lib/python3.11/site-packages").mkdir(parents=True)
    planted = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n"
    (hostile / "sitecustomize.py").write_text(planted)
    (hostile / "lib/python3.11/site-packages/x.pth").write_text(planted)
    profile = tmp_path / "profile"
    profile.mkdir(mode=0o700)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(hostile),
        "PYTHONPATH": str(hostile),
        "PYTHONUSERBASE": str(hostile),
        "BERTH_PYTHON": sys.executable,
        "BERTH_AGENT_ROOT": str(Path(guest_agent.__file__).parent.parent),
        "BERTH_CHROMIUM": "/bin/sh",  # made to print what Chromium would get
        "BERTH_GUEST_USER": "nobody",
    }
    # Chromium's stand-in prints its environment, then the profile it was given ($0) and
    # that profile's owner.
    chromium = 'env; p="${0#--user-data-dir=}"; echo "profile=$p"; stat -c "owner=%u" "$p"'
    ran = subprocess.run(
        [str(LAUNCHER), "-c", chromium, f"--user-data-dir={profile}"],
        cwd=hostile,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert not marker.exists()
    seen = dict(line.split("=", 1) for line in ran.stdout.splitlines() if "=" in line)
    # The driver's profile stays root's (and empty: root removes it); Chromium gets one the
    # user made, and the user removed it when Chromium was done.
    assert profile.stat().st_uid == 0
    users = Path(seen.pop("profile"))
    assert users != profile
    assert seen.pop("owner") == str(nobody().uid)
    assert not users.exists()
    seen.pop("PWD")  # the shell's own, of its cwd
    assert seen == nobody().environment()


@as_root
async def test_a_step_enters_its_working_directory_as_the_step_user(shared: Path) -> None:
    # root-only/ is root's, mode 0700: root could enter it, the user may not.
    execution = Execution("cwd", timeout_s=10)
    code, error = await run_command(execution, "pwd", str(shared / "root-only"), nobody())
    assert error is None
    assert code != 0, execution.output()
    assert "Permission denied" in execution.output()
    execution = Execution("cwd-ok", timeout_s=10)
    code, _ = await run_command(execution, "pwd; env", str(shared), nobody())
    assert code == 0
    lines = execution.output().splitlines()
    assert lines[0] == str(shared)
    assert not [line for line in lines if line.startswith("OLDPWD=")]


@as_root
async def test_file_steps_carry_none_of_roots_supplementary_groups(shared: Path) -> None:
    # A file of root's group, readable by that group only: root's supplementary groups (0
    # here, disk or adm in a machine) must not open it for the step user.
    group_file = shared / "group-only"
    group_file.write_text("for root's group")
    os.chown(group_file, 0, 0)
    group_file.chmod(0o040)
    os.setgroups([0])  # the agent's own groups, as a root process has them
    execution = Execution("read", timeout_s=10)
    step = {"op": "read", "path": "group-only"}
    with pytest.raises(files.Refused, match="Permission denied"):
        await files.run(execution, step, str(shared), nobody())
    assert os.getgroups() == [0]  # the agent's thread got its own back
    public = await files.run(execution, {"op": "read", "path": "public"}, str(shared), nobody())
    assert public == {"content": "x"}
