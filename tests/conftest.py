"""Shared fixtures (databases on SQLite and PostgreSQL, a Temporal dev server) and the markers
that say what a test needs beyond Python: applied here per folder and file, so `make test-fast`
(`-m "not docker and not libvirt and not chromium and not e2e and not chaos"`) runs without
Docker, VMs or a browser. A test that needs one of them only in part carries its own mark."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from temporalio.client import Client

from berth.machines import inventory, remove
from berth.run import wait_for_port
from config.settings import Settings
from store.db import get_engine, migrate
from tests.support.local import free_port
from tests.support.postgres import drop_database, fresh_database
from workflows import search

BIN = Path(sys.executable).parent
TEMPORAL = BIN / "temporal"
TEMPORAL_TEST_SERVER = BIN / "temporal-test-server"

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
    "sandboxes/test_snapshots.py": ("libvirt", "e2e"),
    "sandboxes/test_libvirt_checkpoints.py": ("libvirt", "e2e"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        where = item.path.relative_to(root).as_posix()
        for prefix, marks in NEEDS.items():
            if where == prefix or (prefix.endswith("/") and where.startswith(prefix)):
                for mark in marks:
                    item.add_marker(mark)


@pytest.fixture(scope="session", autouse=True)
def no_machines_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A system's machines outlive it on purpose (a restart adopts them again), so a test
    that ends without ending its sessions left them running. Once the run is over, those of
    the systems it started (installs under its own temporary folder) are removed."""
    yield
    base = tmp_path_factory.getbasetemp().resolve()

    async def clear() -> None:
        settings = Settings(data_dir=base)
        for machine in await inventory(settings, lambda _: None):
            if machine.install and Path(machine.install).is_relative_to(base):
                await remove(settings, machine)

    asyncio.run(clear())


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'berth.db'}"
        return
    url = fresh_database()
    if url is None:
        pytest.skip("no PostgreSQL")
    yield url
    get_engine(url).dispose()
    drop_database(url)


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
