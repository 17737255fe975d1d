"""Shared fixtures (databases on SQLite and PostgreSQL, a Temporal dev server) and the markers
that say what a test needs beyond Python: applied here per folder and file, so `make test-fast`
(`-m "not docker and not libvirt and not chromium and not e2e and not chaos"`) runs without
Docker, VMs or a browser. A test that needs one of them only in part carries its own mark."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from temporalio.client import Client

from berth.run import wait_for_port
from store.db import get_engine, migrate
from tests.support.local import free_port
from workflows import search

BIN = Path(sys.executable).parent
TEMPORAL = BIN / "temporal"
TEMPORAL_TEST_SERVER = BIN / "temporal-test-server"
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

# What the tests under each folder or file need (paths relative to tests/).
NEEDS: dict[str, tuple[str, ...]] = {
    "e2e/": ("e2e", "docker"),
    "e2e/chaos/": ("chaos",),
    "e2e/test_system.py": ("chromium",),
    "e2e/test_dashboard_browser.py": ("chromium",),
    "e2e/test_hands_browser.py": ("chromium",),
    "berth/test_startup.py": ("e2e", "docker"),
    "client/test_system.py": ("e2e", "docker", "chromium"),
    "berth/test_machines.py": ("docker",),
    "guest_agent/test_browser.py": ("chromium",),
    "sandboxes/test_containment.py": ("docker",),
    "sandboxes/test_docker_browser.py": ("docker", "chromium"),
    "sandboxes/test_docker_preserve.py": ("docker",),
    "sandboxes/test_firewall.py": ("docker",),
    "sandboxes/test_reconcile.py": ("docker",),
    "sandboxes/test_libvirt.py": ("libvirt", "e2e"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        where = item.path.relative_to(root).as_posix()
        for prefix, marks in NEEDS.items():
            if where == prefix or (prefix.endswith("/") and where.startswith(prefix)):
                for mark in marks:
                    item.add_marker(mark)


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


async def until_healthy(address: str, timeout_s: float = 60) -> None:
    """The dev server's port opens before its frontend serves: a client connecting at once
    may be told "Frontend is not healthy yet" (seen under load)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await Client.connect(address)
                return
            except RuntimeError:
                await asyncio.sleep(0.2)


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
            *search.dev_server_flags(),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port("temporal", "127.0.0.1", port, server, timeout_s=60)
        asyncio.run(until_healthy(f"127.0.0.1:{port}"))
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)
