"""The whitelisted terminal: a corpus of bypass attempts, each refused with a reason that
names what was refused; allowed commands judged allowed and then run by the real guest
terminal; and RunStep refusing a command before the guest sees it."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from guest_agent.execution import Execution
from guest_agent.terminal import run_command
from guest_agent.user import WORKSPACE
from sandboxes.models import ServiceStep, TerminalStep
from sandboxes.policy import CommandPolicy, judge, load_policy
from sandboxes.policy.programs import SPECIAL, special_bits
from sandboxes.policy.shell import parse
from store import events
from store.events import EventType
from tests.activities.test_run_step import link_activities, sqlite_engine, step_request
from tests.guest_agent.test_agent import guest_link
from tests.sandboxes.policy_corpus import ALLOWED, BYPASSES

__all__ = ["sqlite_engine"]  # a fixture, used by name

POLICY = load_policy("default")


def test_the_corpus_is_large_and_distinct() -> None:
    assert len({command for _, command, _ in BYPASSES}) == len(BYPASSES) >= 60
    assert len({name for name, _, _ in BYPASSES}) == len(BYPASSES)
    assert len(set(ALLOWED)) == len(ALLOWED) >= 25


@pytest.mark.parametrize(
    ("command", "named"), [(c, n) for _, c, n in BYPASSES], ids=[i for i, _, _ in BYPASSES]
)
def test_a_bypass_is_refused_with_a_reason(command: str, named: str) -> None:
    cwd = "/etc" if command in ("rm -r passwd", "cat a.tar | tar x") else None  # judged too
    verdict = judge(command, POLICY, cwd=cwd)
    assert not verdict.allowed
    assert named in verdict.reason, verdict.reason


@pytest.mark.parametrize("command", ALLOWED)
def test_an_allowed_command_is_allowed(command: str) -> None:
    verdict = judge(command, POLICY)
    assert verdict.allowed, verdict.reason


def test_edge_words_get_a_verdict_not_an_exception() -> None:
    assert judge("echo \u00b2>x", POLICY).allowed  # `²` is a word, not a file descriptor
    assert judge("git --version", POLICY).allowed
    assert judge("git status --short", POLICY).allowed
    assert judge("python3 -m venv .venv", POLICY).allowed
    assert "`/etc`" in judge("ls", POLICY, cwd="/etc").reason


def test_the_template_home_is_the_step_users_workspace() -> None:
    assert POLICY.home == WORKSPACE == CommandPolicy(programs={}).home
    assert WORKSPACE in POLICY.workspace


def test_a_tilde_expands_where_bash_expands_it() -> None:
    """At a word's start, and after the first `=` and each `:` of an assignment-shaped word
    (which bash expands even as an argument)."""
    (command,) = parse("echo ~ a=~/x b+=x:~ 1a=~ a=b=~ x:~ '~' a=''~")[0].commands
    home = "\0HOME\0"
    texts = [w.text for w in command.words[1:]]
    assert texts == [home, f"a={home}/x", f"b+=x:{home}", "1a=~", "a=b=~", "x:~", "~", "a=~"]
    assert "another user's home" in judge("echo a=~root", POLICY).reason


def workspace_policy(workspace: Path) -> CommandPolicy:
    """The default policy with a test's temporary directory as the guest's home."""
    return POLICY.model_copy(update={"home": str(workspace), "workspace": [str(workspace)]})


async def test_allowed_commands_run_in_the_guest_terminal(tmp_path: Path) -> None:
    policy = workspace_policy(tmp_path)
    (tmp_path / "notes.txt").write_text("alpha one\nbeta two\ngamma three\n")
    (tmp_path / "src").mkdir()
    failures = []
    for n, command in enumerate(ALLOWED):
        assert judge(command, policy).allowed, command
        execution = Execution(f"e{n}", timeout_s=30)
        code, _ = await run_command(execution, command, str(tmp_path))
        if code != 0:
            failures.append(f"{command!r} exited {code}: {execution.output()}")
    assert not failures
    assert (tmp_path / "f.txt").read_text() == "kept\n"
    assert (tmp_path / "src" / "pkg" / "a.py").exists()


def test_a_policy_file_replaces_the_templates(tmp_path: Path) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text("allow_chaining = false\n[programs.ls]\n[programs.echo]\nmax_args = 1\n")
    policy = load_policy("default", strict)
    assert judge("ls -la", policy).allowed
    assert "not an allowed program" in judge("cat x", policy).reason
    assert "chaining" in judge("ls; ls", policy).reason
    assert "at most 1 arguments" in judge("echo a b", policy).reason
    assert judge("ls | ls", policy).allowed  # pipes stay allowed unless the file says not


async def test_run_step_refuses_before_the_guest_sees_the_command(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    engine = sqlite_engine
    async with guest_link(tmp_path) as link:
        activities = link_activities(link.gateway, engine, tmp_path)
        request = step_request(engine, link.sandbox_id, 'python3 -c \'open("pwned", "w")\'')
        with pytest.raises(ApplicationError) as caught:
            await ActivityEnvironment().run(activities.run_step, request)
        assert caught.value.type == "CommandRefused" and caught.value.non_retryable
        assert "python3 -c" in caught.value.message
        # The rule it ran into is quoted, from the template's policy.
        assert "policy rule: python3: script files only" in caught.value.message
        assert "refused: -c -i" in caught.value.message
        await asyncio.sleep(0.2)
        assert link.agent.executions == {} and not (tmp_path / "pwned").exists()
        with Session(engine) as db:
            kinds = [e.type for e in events.read_after(db, request.sandbox.session_id, 0)]
        assert EventType.step_started not in kinds and EventType.step_finished not in kinds
        # The same activity still runs what the policy allows.
        allowed = request.model_copy(update={"step": TerminalStep(command="echo fine")})
        outcome = await ActivityEnvironment().run(activities.run_step, allowed)
        assert outcome.ok and len(link.agent.executions) == 1
        # A service's command is judged as a command is: nothing starts.
        service = ServiceStep(command="python3 -c 'import http.server'")
        refused = request.model_copy(update={"step": service})
        with pytest.raises(ApplicationError) as caught:
            await ActivityEnvironment().run(activities.run_step, refused)
        assert caught.value.type == "CommandRefused"
        assert link.agent.services.known == {}


MODES = [
    *("4755", "04755", "2755", "1777", "755", "0", "7777", "07777", "17777", "8", "79"),
    *("=4755", "+6000", "-6000", "+1000", "=0", "-w,u+s", "u=rwx,g+s", "g-s,u+s", "o+s"),
    *("o+t", "u+t", "+t", "a+X", "go=u-w", "u+s,u-s", "a=rwxst", "ug+s", "=", "+", "u=g"),
    *("u+4000", "u+q", "", "u", "+90", "u+s,", ",u+s", "rwx", "u+rw+s", "+s-s", "g=u+s"),
]


@pytest.mark.parametrize("mode", MODES)
def test_the_mode_reader_agrees_with_gnu_chmod(tmp_path: Path, mode: str) -> None:
    """special_bits says what real chmod does: which special bits a mode sets on a plain
    file, and which modes it cannot read."""
    target = tmp_path / "f"
    target.write_text("")
    target.chmod(0o644)
    done = subprocess.run(["chmod", "--", mode, str(target)], capture_output=True, check=False)
    try:
        mine = special_bits(mode)
    except ValueError:
        assert done.returncode != 0, f"chmod reads `{mode}`; the policy refuses it as unreadable"
        return
    assert done.returncode == 0, f"the policy reads `{mode}`, chmod does not: {done.stderr!r}"
    bits = target.stat().st_mode
    set_now = [name for name, bit in SPECIAL if bits & bit]
    assert set(set_now) <= set(mine), f"`{mode}` set {set_now}; the reader said {mine}"


@pytest.mark.parametrize("cwd", ["var/tmp", "run/berth", "./x", ""])
def test_a_step_s_working_directory_must_be_absolute(cwd: str) -> None:
    # The policy reads a relative directory against the home while the guest enters it
    # from `/`: `var/tmp` was judged as /home/berth/var/tmp and ran in /var/tmp.
    with pytest.raises(ValueError, match="cwd"):
        TerminalStep(command="echo hi > y", cwd=cwd)
    assert TerminalStep(command="echo hi > y", cwd="/home/berth/work").cwd == "/home/berth/work"
