"""`python -m berth backup` and `restore` on a data dir of files (the whole system's round
trip, with a session in flight, is tests/e2e/test_backup_restore.py)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlmodel import Session, select

from berth.backup import BackupError, backup, restore
from config.settings import Settings
from store.db import migrate
from store.models import HostRow, SandboxRow, SessionRow, User, utcnow
from tests.support.postgres import drop_database, fresh_database
from tests.support.world import build


def install(data: Path, url: str | None) -> Settings:
    """An install's files as a running system leaves them: both databases, an artifact,
    the generated secrets, a kept disk."""
    settings = Settings(data_dir=data, database_url=url)
    settings.shared_dir.mkdir(parents=True)
    migrate(settings.db_url)
    engine = create_engine(settings.db_url)
    world = build(engine)
    with Session(engine) as db:
        db.add(
            SandboxRow(
                id="sb1",
                session_id=world.session_id,
                provider="docker",
                host_id="local",
                template="default",
                handle="c1",
                status="preserved",
                kept_bytes=123,
            )
        )
        # The host registry as it stood: live state of that install, not data.
        db.add(
            HostRow(
                id="local", task_queue="berth-host-local", provider="docker", accel="none",
                vcpus=2, memory_mb=4096, memory_available_mb=2048, load1=0.5,
                started_at=utcnow(), last_seen=utcnow(),
            )
        )  # fmt: skip
        db.commit()  # fmt: skip
    engine.dispose()
    with sqlite3.connect(settings.shared_dir / "temporal.db") as temporal:
        temporal.execute("PRAGMA journal_mode=wal")
        temporal.execute("CREATE TABLE history (id INTEGER PRIMARY KEY, event TEXT)")
        temporal.execute("INSERT INTO history (event) VALUES ('started')")
    (settings.artifacts_dir / "ab").mkdir(parents=True)
    (settings.artifacts_dir / "ab" / "cdef").write_bytes(b"\x89PNG screenshot")
    (data / "guest_token_secret").write_text("guest")
    (settings.shared_dir / "payload_secret").write_text("payload")
    (settings.shared_dir / "user_token_secret").write_text("user")
    return settings


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[tuple[str | None, str | None]]:
    """(the install's database URL, the restore's), None for SQLite in the data dir."""
    if request.param == "sqlite":
        yield None, None
        return
    urls = fresh_database(), fresh_database()
    if None in urls:
        pytest.skip("no PostgreSQL")
    yield urls
    for url in urls:
        assert url is not None
        drop_database(url)


def test_a_backup_restores_into_a_fresh_data_dir(
    tmp_path: Path, database: tuple[str | None, str | None]
) -> None:
    source, target = database
    settings = install(tmp_path / "old", source)
    # Temporal keeps writing while the copy is taken: the copy is one consistent state.
    stop = threading.Event()

    def write() -> None:
        with sqlite3.connect(settings.shared_dir / "temporal.db", timeout=30) as db:
            while not stop.is_set():
                db.execute("INSERT INTO history (event) VALUES ('step')")
                db.commit()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        report = backup(settings, tmp_path / "backup")
    finally:
        stop.set()
        writer.join()
    assert report.manifest["kept_disks"] == [
        {"sandbox_id": "sb1", "session_id": report.manifest["kept_disks"][0]["session_id"],  # type: ignore[index]
         "user_id": report.manifest["kept_disks"][0]["user_id"],  # type: ignore[index]
         "provider": "docker", "host_id": "local", "bytes": 123}
    ]  # fmt: skip
    assert json.loads((tmp_path / "backup" / "kept-disks.json").read_text())[0]["bytes"] == 123

    fresh = Settings(data_dir=tmp_path / "new", database_url=target)
    restore(fresh, tmp_path / "backup")
    engine = create_engine(fresh.db_url)
    with Session(engine) as db:
        emails = sorted(u.email for u in db.exec(select(User)))
        assert emails == ["admin@example.com", "other@example.com", "owner@example.com"]
        assert len(db.exec(select(SessionRow)).all()) == 1
        # No session is placed on a host of the old install's: each registers on its start.
        assert db.exec(select(HostRow)).all() == []
    engine.dispose()
    with sqlite3.connect(fresh.shared_dir / "temporal.db") as temporal:
        (count,) = temporal.execute("SELECT count(*) FROM history").fetchone()
        assert count >= 1
        assert temporal.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert (fresh.artifacts_dir / "ab" / "cdef").read_bytes() == b"\x89PNG screenshot"
    assert (fresh.shared_dir / "payload_secret").read_text() == "payload"
    assert (fresh.data_dir / "guest_token_secret").stat().st_mode & 0o777 == 0o600

    # Never over an install: a second restore into the same place is refused.
    with pytest.raises(BackupError, match="not empty"):
        restore(fresh, tmp_path / "backup")


def test_a_backup_goes_into_a_new_folder_only(tmp_path: Path) -> None:
    settings = install(tmp_path / "old", None)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "something").write_text("")
    with pytest.raises(BackupError, match="not empty"):
        backup(settings, tmp_path / "used")
    with pytest.raises(BackupError, match="not a Berth backup"):
        restore(Settings(data_dir=tmp_path / "new"), tmp_path / "used")


def test_the_database_password_is_on_no_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pg_dump and pg_restore get the password in their environment: a command line is
    readable by every user of the host."""
    urls = fresh_database(), fresh_database()
    if None in urls:
        pytest.skip("no PostgreSQL")
    # The local server trusts its callers, so the password is carried, never checked.
    source, target = (str(u).replace("postgres@", "postgres:hunter2@") for u in urls)
    ran: list[tuple[list[str], dict[str, str]]] = []
    real = subprocess.run

    def run(argv: list[str], **kwargs: Any) -> Any:
        ran.append((argv, kwargs.get("env") or {}))
        return real(argv, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    try:
        backup(install(tmp_path / "old", source), tmp_path / "backup")
        restore(Settings(data_dir=tmp_path / "new", database_url=target), tmp_path / "backup")
    finally:
        for url in urls:
            assert url is not None
            drop_database(url)
    assert [argv[0] for argv, _ in ran] == ["pg_dump", "pg_restore"]
    for argv, env in ran:
        assert not any("hunter2" in part for part in argv)
        assert env["PGPASSWORD"] == "hunter2"


def test_a_backup_into_a_folder_made_beforehand_is_its_owners_alone(tmp_path: Path) -> None:
    settings = install(tmp_path / "old", None)
    (tmp_path / "made").mkdir(mode=0o755)
    backup(settings, tmp_path / "made")
    assert (tmp_path / "made").stat().st_mode & 0o777 == 0o700
