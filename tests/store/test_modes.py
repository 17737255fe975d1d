"""Data at rest is private: the database and the artifacts are their user's alone, in folders
other local users cannot list, whatever umask the process that made them had."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session

from store.artifacts import ArtifactStore
from store.db import get_engine, migrate


@pytest.fixture(autouse=True)
def lax_umask() -> Iterator[None]:
    """The default umask of most systems, under which files are world-readable."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_sqlite_database_is_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "berth.db"
    url = f"sqlite:///{path}"
    migrate(url)
    with get_engine(url).connect() as conn:
        conn.exec_driver_sql("CREATE TABLE probe (x)")  # journals made beside it
        conn.commit()
    assert mode(path.parent) == 0o700
    for made in path.parent.iterdir():
        assert mode(made) == 0o600, made.name


def test_an_older_database_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    path.touch(mode=0o644)
    migrate(f"sqlite:///{path}")
    assert mode(path) == 0o600


def test_artifacts_are_private(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'berth.db'}"
    migrate(url)
    store = ArtifactStore(tmp_path / "shared" / "artifacts", max_bytes=1024)
    with Session(get_engine(url)) as db:
        found = store.save(
            db, session_id="s1", task_id="t1", step_index=0, exec_id="e1",
            name="shot.png", media_type="image/png", data=b"png",
        )  # fmt: skip
    assert mode(store.root) == 0o700
    assert mode(store.root / "s1") == 0o700
    assert mode(store.path("s1", found)) == 0o600
