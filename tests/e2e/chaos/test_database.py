"""Chaos at the database, when it is PostgreSQL: the system's app database on a private
PostgreSQL cluster of the test's own (initdb and pg_ctl in a temporary folder, on a free
loopback port, as the ``postgres`` user when run as root), which the test restarts in the
middle of a task. The machine's shared PostgreSQL is never touched."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.chaos.harness import check_once, counting, numbered, report, system, wait_output
from tests.e2e.test_spine import Spine, User
from tests.support.local import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DOWN_S = 5.0  # how long the database stays down


class PrivatePostgres:
    """A PostgreSQL cluster in a folder of its own, for one test module."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="berth-chaos-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        # PostgreSQL refuses to run as root: the cluster belongs to the postgres user.
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self.owner is not None:
            os.chown(self.folder, self.owner.pw_uid, self.owner.pw_gid)
        self.folder.chmod(0o755)
        self._as_owner("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                       "--no-sync", "-E", "UTF8")  # fmt: skip
        self.start()
        self._as_owner("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                       "berth")  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/berth"

    def _as_owner(self, program: str, *args: str) -> None:
        command = [str(PG_BIN / program), *args]
        if self.owner is not None:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60, cwd=self.folder)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-o",
                       options, "-w", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._as_owner("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with_cluster = (self.data / "postmaster.pid").exists()
        if with_cluster:
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL 15 binaries in {PG_BIN}")
    cluster = PrivatePostgres()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def spine(tmp_path_factory: pytest.TempPathFactory, postgres: PrivatePostgres) -> Iterator[Spine]:
    yield from system(
        tmp_path_factory.mktemp("berth-chaos-database"),
        "chaosdb",
        {"BERTH_DATABASE_URL": postgres.url},
    )


@pytest.mark.timeout(240)
def test_a_task_outlives_a_postgresql_restart_without_losing_an_event(
    user: User, postgres: PrivatePostgres
) -> None:
    sid = user.new_session()
    stream = user.stream(sid, reconnect=True)
    tid = user.queue(sid, f"$ {counting(60, 0.25)}\n$ echo after")
    wait_output(user, stream, tid, "line 10\n", 90)
    postgres.stop()
    stopped = time.monotonic()
    report(f"stopped the app's PostgreSQL (port {postgres.port}) at line 10 of 60")
    time.sleep(DOWN_S)
    postgres.start()
    report(f"started it again after {time.monotonic() - stopped:.1f} s")
    task = user.wait_task(sid, tid, 150)
    assert task["status"] == "succeeded", (task, user.spine.tail())
    assert task["steps"][0]["output"] == numbered(60)
    assert task["steps"][1]["output"] == "after\n"
    check_once(stream, tid, numbered(60))
    report(f"the task succeeded; the stream reconnected {stream.reconnects} times")
