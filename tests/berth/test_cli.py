"""The command line answers without starting anything: ``--help`` on every command prints its
usage and options and exits 0, a mistyped option or command is refused with argparse's message
(exit 2), and a chosen command gets its arguments typed. Nothing here starts a process of
Berth's or imports what the commands run."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import berth
from berth.cli import main

# Each command and subcommand, with what its help must show besides its usage line.
COMMANDS: dict[tuple[str, ...], list[str]] = {
    (): ["run", "worker", "api", "prepare", "create-admin", "host", "bench"],
    ("run",): ["foreground", "--hosts", "--api-replicas"],
    ("worker",): ["worker"],
    ("api",): ["API"],
    ("prepare",): ["--provider", "docker", "libvirt"],
    ("create-admin",): ["EMAIL", "--promote-existing"],
    ("host",): ["drain", "undrain"],
    ("host", "drain"): ["HOST"],
    ("host", "undrain"): ["HOST"],
    ("bench",): ["spine", "llm", "vm", "load", "fork"],
    ("bench", "spine"): ["--out"],
    ("bench", "llm"): ["--out"],
    ("bench", "vm"): ["--out", "--runs", "--warm-runs", "--only", "--idle-vms"],
    ("bench", "fork"): ["--out", "--runs", "--providers"],
    ("bench", "load"): ["--out", "--sequential", "--staggered", "--burst", "--sessions", "--rate"],
}
HEAVY = {"temporalio", "uvicorn", "fastapi", "sqlalchemy", "sqlmodel", "httpx", "bench"}


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    code = exited.value.code
    assert isinstance(code, int)
    return code


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: " ".join(c) or "berth")
def test_help_on_every_command_prints_its_usage_and_options(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m berth {' '.join(command)}".rstrip())
    assert "-h, --help" in out
    for shown in COMMANDS[command]:
        assert shown in out


@pytest.mark.parametrize("command", list(COMMANDS)[1:], ids=" ".join)
def test_every_command_says_in_one_line_what_it_does_and_is_listed_so(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    exit_code([*command, "--help"])
    summary = capsys.readouterr().out.split("\n\n")[1]
    assert summary and "\n" not in summary
    exit_code([*command[:-1], "--help"])
    listed = " ".join(capsys.readouterr().out.split())
    assert f"{command[-1]} {summary}" in listed


def test_run_help_returns_at_once_and_starts_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    root = Path(berth.__file__).parents[1]
    env = {**os.environ, "BERTH_DATA_DIR": str(data), "PYTHONPATH": str(root)}
    # Its own session, so that a child it left behind would still be found in its group.
    helped = subprocess.Popen(
        [sys.executable, "-m", "berth", "run", "--help"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err = helped.communicate(timeout=10)
    assert helped.returncode == 0, err
    assert out.startswith("usage: python -m berth run")
    with pytest.raises(ProcessLookupError):
        os.killpg(helped.pid, 0)  # no process of its group is left
    assert list(data.iterdir()) == []


def test_parsing_imports_nothing_the_commands_run() -> None:
    probe = (
        "import sys\n"
        "from berth.cli import build_parser\n"
        "build_parser().parse_args(['bench', 'vm', '--runs', '2'])\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=10, check=True
    )
    assert HEAVY.isdisjoint(loaded.stdout.split())


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["--bogus", "api"], "unrecognized arguments: --bogus"),
        (["bench", "vm", "--runs", "0"], "--runs"),
        (["prepare", "--provider", "qemu"], "invalid choice: 'qemu'"),
        (["launch"], "invalid choice: 'launch'"),
        (["bench", "disk"], "invalid choice: 'disk'"),
        (["create-admin"], "the following arguments are required: EMAIL"),
    ],
)
def test_a_mistyped_option_or_command_is_refused_by_name(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m berth")
    assert "error:" in err.splitlines()[-1]
    assert named in err.splitlines()[-1]


@pytest.mark.parametrize("argv", [[], ["bench"]], ids=["berth", "bench"])
def test_no_command_prints_the_usage_and_exits_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m berth")
    assert "the following arguments are required" in err


def stand_in(
    monkeypatch: pytest.MonkeyPatch, module: str, name: str, answer: int
) -> list[tuple[Any, ...]]:
    """Replace ``module.name`` by a recorder of its calls, without importing the module."""
    calls: list[tuple[Any, ...]] = []

    def record(*args: Any) -> int:
        calls.append(args)
        return answer

    fake = types.ModuleType(module)
    setattr(fake, name, record)
    monkeypatch.setitem(sys.modules, module, fake)
    return calls


Case = tuple[list[str], str, str, Callable[[Path], tuple[Any, ...]]]
CASES: list[Case] = [
    (
        ["create-admin", "ann@example.com"],
        "berth.admin",
        "create_admin",
        lambda _: ("ann@example.com", False),
    ),
    (
        ["create-admin", "ann@example.com", "--promote-existing"],
        "berth.admin",
        "create_admin",
        lambda _: ("ann@example.com", True),
    ),
    (["prepare"], "berth.prepare", "prepare", lambda _: (None,)),
    (["prepare", "--provider", "docker"], "berth.prepare", "prepare", lambda _: ("docker",)),
    (["bench", "spine"], "bench.spine", "bench", lambda _: (Path(".berth/bench/spine.json"),)),
    (["bench", "llm", "--out", "OUT"], "bench.llm", "bench", lambda out: (out,)),
    (
        ["bench", "vm"],
        "bench.vm",
        "bench",
        lambda _: (Path(".berth/bench/vm.json"), 3, 8, None, 20),
    ),
    (
        [
            "bench",
            "vm",
            "--out",
            "OUT",
            "--runs",
            "5",
            "--warm-runs",
            "2",
            "--idle-vms",
            "4",
            "--only",
            "cold",
        ],
        "bench.vm",
        "bench",
        lambda out: (out, 5, 2, ["cold"], 4),
    ),
    (["run"], "berth.run", "run", lambda _: (1, 1)),
    (["run", "--hosts", "2", "--api-replicas", "3"], "berth.run", "run", lambda _: (2, 3)),
]


@pytest.mark.parametrize(
    ("argv", "module", "name", "expected"), CASES, ids=[" ".join(case[0]) for case in CASES]
)
def test_a_command_gets_its_arguments_typed_and_its_exit_status_passed_on(
    argv: list[str],
    module: str,
    name: str,
    expected: Callable[[Path], tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.json"
    calls = stand_in(monkeypatch, module, name, answer=7)
    assert main([str(out) if arg == "OUT" else arg for arg in argv]) == 7
    assert calls == [expected(out)]


@pytest.fixture(autouse=True)
def own_umask() -> Iterator[None]:
    """main() sets the process's umask: the test process gets its own back."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_command_runs_with_a_private_umask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor, the worker and the API all start through main(), Temporal and the
    others as children of the supervisor: what they create is their user's alone."""
    seen: list[int] = []
    fake = types.ModuleType("berth.worker")
    fake.run = lambda: seen.append(current_umask())  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "berth.worker", fake)
    assert main(["worker"]) == 0
    assert seen == [0o077]


@pytest.mark.parametrize(
    ("proxies", "trusted"),
    [(None, "127.0.0.1"), ("10.0.0.0/8,192.0.2.7", "10.0.0.0/8,192.0.2.7")],
    ids=["default", "set"],
)
def test_the_api_believes_forwarded_headers_of_the_trusted_proxies_only(
    proxies: str | None, trusted: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Behind a TLS proxy uvicorn must take X-Forwarded-Proto from it (the cookie stays
    Secure, the Origin check sees https), and from no one else."""
    from config.settings import get_settings

    calls: list[dict[str, Any]] = []
    fake = types.ModuleType("uvicorn")
    fake.run = lambda *_, **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvicorn", fake)
    monkeypatch.setenv("BERTH_DATA_DIR", str(tmp_path))
    if proxies is not None:
        monkeypatch.setenv("BERTH_TRUSTED_PROXIES", proxies)
    get_settings.cache_clear()
    try:
        assert main(["api"]) == 0
    finally:
        get_settings.cache_clear()
    [served] = calls
    assert served["proxy_headers"] is True
    assert served["forwarded_allow_ips"] == trusted
