"""Engine creation and schema migrations."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event, make_url, text
from sqlmodel import Session, create_engine

from store import nofollow

MIGRATIONS = Path(__file__).parent / "migrations"
# What SQLite keeps beside a database file.
JOURNALS = ("-wal", "-shm", "-journal")
# Key of the PostgreSQL advisory lock that serialises migrations ("berth" in ASCII).
MIGRATE_LOCK_KEY = 0x6265727468


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; busy_timeout (set first, so that even
    # the switch to WAL waits) queues writers instead of failing them with "database is
    # locked". synchronous=NORMAL drops the fsync of every commit, which is commit latency on
    # the live path (step output is committed in ~100 ms batches); with WAL it cannot corrupt
    # the database, a power cut may only lose the last commits.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory one."""
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def _private_file(path: Path) -> None:
    """The database file made before SQLite opens it, readable by this user alone (SQLite
    gives its journals the same mode), in a folder others cannot list.

    The folder may be another user's (the API's, when the worker is root: see
    berth/privileges.py), who could leave links there for root's SQLite to write through:
    the file and its journals must be files of their own (no link, no second name), or
    nofollow.Planted. SQLite opens them by name after this check; the folder's owner could
    swap them in between, but not unseen by the next start."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = nofollow.open_own(path, os.O_RDONLY | os.O_CREAT)
    try:
        found = nofollow.checked(fd, str(path))
        if found.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)  # a database of an older version, made with the default mode
    finally:
        os.close(fd)
    for suffix in JOURNALS:
        _own_or_missing(path.with_name(path.name + suffix))


def _own_or_missing(path: Path) -> None:
    try:
        fd = nofollow.open_own(path, nofollow.LOOK)
    except FileNotFoundError:
        return
    try:
        nofollow.checked(fd, str(path))
    finally:
        os.close(fd)


@cache
def get_engine(url: str) -> Engine:
    if make_url(url).get_backend_name() == "sqlite":
        path = _sqlite_file(url)
        if path is not None:
            _private_file(path)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@contextmanager
def snapshot(engine: Engine) -> Iterator[Session]:
    """A read-only session whose queries all see the database as of its first one: a page
    drawn from several tables, and the event number it was drawn at, agree."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            # pysqlite begins no transaction for reads: without BEGIN each query sees the
            # latest commit. In WAL mode the read snapshot starts at the first query.
            conn.exec_driver_sql("BEGIN")
        else:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with Session(conn) as db:
            try:
                yield db
            finally:
                conn.rollback()


def take_turn(db: Session, key: str) -> None:
    """Make ``db``'s transaction wait for, and then exclude until it ends, every other
    transaction that took a turn under ``key``, in any process: a limit's count-then-write
    (N live sessions a user, N open streams) then admits exactly what one process would.

    On PostgreSQL a transaction-scoped advisory lock (read committed would let two
    transactions each count before the other's row). On SQLite the database's single write
    lock, taken now rather than at the first write, so the count read next is the latest:
    BEGIN IMMEDIATE, unless the transaction already wrote (and so holds it)."""
    conn = db.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
        return
    if not conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """Held by one process at a time, across every process that migrates this database."""
    if make_url(url).get_backend_name() == "sqlite":
        path = _sqlite_file(url)
        if path is None:  # an in-memory database belongs to one process
            yield
            return
        _private_file(path)
        # Private: flock needs only read access, so a readable lock could be held by anyone.
        lock_file = path.with_name(f"{path.name}.migrate-lock")
        fd = nofollow.open_own(lock_file, os.O_CREAT | os.O_RDWR)
        with os.fdopen(fd) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a crash
            yield
        return
    # Session-level, on a connection of its own: the migration commits in between.
    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATE_LOCK_KEY})


def migrate(url: str) -> None:
    """Bring the schema to the newest revision. The API and the worker both call this as they
    start: one process migrates while the others wait, then find nothing left to do."""
    with _migration_lock(url):
        command.upgrade(alembic_config(url), "head")
