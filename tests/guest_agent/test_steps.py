"""File steps and checks in the guest agent, through the real gateway and protocol."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from guest_agent.checks import Facts, evaluate
from sandboxes.gateway import GuestGateway
from sandboxes.models import Check, FileStep, Step, StepOutcome, TerminalStep
from tests.guest_agent.test_agent import Collector, guest_link

EXEC_IDS = itertools.count()


async def run(gateway: GuestGateway, sandbox_id: str, step: Step) -> tuple[StepOutcome, str]:
    out = Collector()
    outcome = await gateway.run(sandbox_id, f"s{next(EXEC_IDS)}", step, 10, out)
    return outcome, "".join(out.texts)


async def test_files_are_written_read_and_listed_in_the_workspace(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    async with guest_link(workspace) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        go = link.gateway, link.sandbox_id
        wrote, said = await run(
            *go,
            FileStep(
                op="write",
                path="src/primes.py",
                content="print([2, 3, 5, 7])\n",
                check=Check(kind="file_exists", value="src/primes.py"),
            ),
        )
        read, read_out = await run(*go, FileStep(op="read", path=str(workspace / "src/primes.py")))
        listed, _ = await run(*go, FileStep(op="list", path="."))
        ran, _ = await run(
            *go,
            TerminalStep(
                command="python3 src/primes.py",
                check=Check(kind="output_contains", value="[2, 3, 5, 7]"),
            ),
        )
    assert wrote.ok and wrote.check is not None and wrote.check.ok
    assert wrote.check.detail == "src/primes.py exists (20 bytes)"
    assert said == f"wrote 20 bytes to {workspace / 'src/primes.py'}\n"
    assert (workspace / "src/primes.py").read_text() == "print([2, 3, 5, 7])\n"
    assert read.ok and read.result is not None and read.result.content == "print([2, 3, 5, 7])\n"
    assert read_out == "print([2, 3, 5, 7])\n"
    assert listed.ok and listed.result is not None and listed.result.content == "src/"
    assert ran.ok and ran.check is not None and ran.check.ok


async def test_paths_out_of_the_workspace_are_refused(tmp_path: Path) -> None:
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    workspace.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s3cret")
    os.symlink(outside / "secret", workspace / "link")
    os.symlink(outside, workspace / "dir")
    attempts = [
        FileStep(op="read", path="../outside/secret"),
        FileStep(op="read", path=str(outside / "secret")),
        FileStep(op="read", path="link"),  # a symlink that points out
        FileStep(op="write", path="dir/planted", content="x"),  # through a linked folder
        FileStep(op="list", path="dir"),
    ]
    async with guest_link(workspace) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        outcomes = [await run(link.gateway, link.sandbox_id, step) for step in attempts]
        missing, _ = await run(link.gateway, link.sandbox_id, FileStep(op="read", path="nope"))
    for step, (outcome, said) in zip(attempts, outcomes, strict=True):
        assert outcome.exit_code == 1 and not outcome.ok, step
        assert outcome.error is not None and "is outside the workspace" in outcome.error, step
        assert "s3cret" not in said and outcome.result is None
    assert not (outside / "planted").exists()
    assert missing.exit_code == 1 and missing.error == "read nope: No such file or directory"


async def test_checks_of_terminal_steps(tmp_path: Path) -> None:
    cases = [
        ("exit 3", Check(kind="exit_code", value="3"), True),  # expected to fail: it is ok
        ("exit 0", Check(kind="exit_code", value="1"), False),
        ("echo 'total: 42 items'", Check(kind="output_regex", value=r"total: \d+"), True),
        ("echo 'total: many'", Check(kind="output_regex", value=r"total: \d+"), False),
        ("echo done >&2", Check(kind="output_contains", value="done"), True),
        ("echo x; false", Check(kind="output_contains", value="x"), False),  # exit 1 fails
        ("touch made", Check(kind="file_exists", value="made"), True),
        ("true", Check(kind="file_exists", value="never-made"), False),
    ]
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        for command, check, ok in cases:
            outcome, _ = await run(
                link.gateway, link.sandbox_id, TerminalStep(command=command, check=check)
            )
            assert outcome.check is not None and outcome.check.kind == check.kind
            assert outcome.ok is ok, (command, outcome)
    assert outcome.check is not None and outcome.check.detail == "never-made does not exist"


@pytest.mark.parametrize(
    ("kind", "value", "ok", "detail"),
    [
        ("exit_code", "0", True, "exit code 0, expected 0"),
        ("output_contains", "lo w", True, "'lo w' found in the output (12 characters)"),
        ("output_regex", "w.r", True, "/w.r/ matched 'wor'"),
        ("output_regex", "(", False, "bad regex /(/: missing ), unterminated subpattern at posi"
         "tion 0"),
        ("url_matches", "example", True, "page URL https://example.org/ matches /example/"),
        ("page_text_contains", "Hi", True, "'Hi' found in the page text (9 characters)"),
        ("page_text_contains", "Bye", False, "'Bye' not found in the page text (9 characters)"),
        ("telepathy", "x", False, "unknown check 'telepathy'"),
    ],
)  # fmt: skip
async def test_each_check_says_what_it_saw(kind: str, value: str, ok: bool, detail: str) -> None:
    facts = Facts(
        exit_code=0,
        output="hello world\n",
        workdir="/",
        url="https://example.org/",
        page_text="Hi there!",
    )
    assert await evaluate({"kind": kind, "value": value}, facts) == {
        "kind": kind,
        "ok": ok,
        "detail": detail,
    }


async def test_page_checks_without_a_page_fail() -> None:
    facts = Facts(exit_code=0, output="", workdir="/")
    for kind in ("url_matches", "page_text_contains"):
        assert await evaluate({"kind": kind, "value": "x"}, facts) == {
            "kind": kind,
            "ok": False,
            "detail": "no page is open",
        }
