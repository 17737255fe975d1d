"""First start always works, and a crash is not an outage: processes migrating one database
at once, the whole system coming up on fresh data dirs, the supervisor restarting a killed
worker."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from berth import run
from berth.worker import temporal_runtime
from config.settings import Settings
from store.db import get_engine
from tests.support.local import LocalSystem

MIGRATING_PROCESSES = 4


def migrate_together(barrier: Barrier, url: str) -> None:
    from store.db import migrate

    barrier.wait(timeout=60)  # released together, so that their migrations overlap
    migrate(url)


def test_processes_migrating_one_fresh_database_at_once_all_succeed(db_url: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(MIGRATING_PROCESSES)
    processes = [
        spawn.Process(target=migrate_together, args=(barrier, db_url))
        for _ in range(MIGRATING_PROCESSES)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(90)
    assert [p.exitcode for p in processes] == [0] * MIGRATING_PROCESSES
    engine = get_engine(db_url)
    assert {"users", "sessions", "events"} <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1


def test_a_crashing_child_is_restarted_with_a_doubling_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "berth.run")
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the supervisor's clock
    child = run.Child("crasher", lambda: subprocess.Popen(["false"]), tmp_path)
    delays = []
    for _ in range(7):
        child.process.wait()
        child.tend()  # notices the exit
        assert child.restart_at is not None
        delays.append(child.restart_at - now[0])
        now[0] = child.restart_at
        child.tend()  # restarts
        assert int((tmp_path / "crasher.pid").read_text()) == child.process.pid
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    # Up for a minute: healthy again, so the next crash waits 1 s.
    child.process.wait()
    now[0] += run.BACKOFF_RESET_S
    child.tend()
    assert child.restart_at == now[0] + 1
    assert "crasher exited with 1; restarting in 30 s" in caplog.text
    child.stop()


def tail(log: Path) -> str:
    """The end of the supervisor's output, without the health checks' access log."""
    lines = log.read_text().splitlines(keepends=True)
    return "".join(line for line in lines if "/healthz" not in line)[-3000:]


def wait_for(what: str, check: Callable[[], bool], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen:\n{tail(log)}")
        time.sleep(0.3)


@contextmanager
def running_system(data: Path) -> Iterator[LocalSystem]:
    """The whole system on ``data``; checks that SIGTERM stops it cleanly."""
    system = LocalSystem.start(data, "startup", timeout_s=120)
    try:
        yield system
    finally:
        code = system.stop()
    assert code == 0, tail(data / "run.log")


@pytest.mark.e2e
@pytest.mark.parametrize("attempt", range(3))
def test_the_system_comes_up_on_a_fresh_data_dir(tmp_path: Path, attempt: int) -> None:
    pids = tmp_path / "run"
    with running_system(tmp_path):
        assert {"temporal.pid", "worker.pid", "api.pid"} <= {p.name for p in pids.iterdir()}
    assert not list(pids.iterdir())
    # First start needs no second chance: nothing crashed on the way up.
    assert "restarting" not in (tmp_path / "run.log").read_text()


@pytest.mark.e2e
def test_the_supervisor_restarts_a_killed_worker(tmp_path: Path) -> None:
    log, pid_file = tmp_path / "run.log", tmp_path / "run" / "worker.pid"
    with running_system(tmp_path) as system:
        killed = int(pid_file.read_text())
        os.kill(killed, signal.SIGKILL)
        wait_for(
            "a restart of the worker",
            lambda: (
                "worker exited with -9; restarting in 1 s" in log.read_text()
                and int(pid_file.read_text()) != killed
            ),
            log,
        )
        os.kill(int(pid_file.read_text()), 0)  # the new worker exists
        wait_for("the new worker", lambda: log.read_text().count("worker up") == 2, log)
        assert system.healthy()


def test_a_taken_metrics_port_costs_the_worker_its_metrics_not_its_life(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose SDK metrics port is taken used to exit, and its supervisor restarted
    it for ever: it runs on without those metrics, and says why."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(data_dir=tmp_path, metrics_host="127.0.0.1", temporal_metrics_port=port)
        with caplog.at_level(logging.ERROR, logger="berth.worker"):
            assert temporal_runtime(settings) is None
    assert "BERTH_TEMPORAL_METRICS_PORT" in caplog.text and "in use" in caplog.text
