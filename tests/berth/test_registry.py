"""The host registry: a worker's heartbeat writes its host's capacity and load (its session
machines apart from its warm pools' members), keeps the state an operator gave it, and acts
on a drain; a silent host reads as lost; admins see the hosts (API and page), others do not;
``python -m berth host drain`` sets the state, and a draining host takes no new session. The
worker's Temporal tuning comes from the settings."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session
from temporalio.client import Client
from temporalio.worker import Worker

from api import accounts
from berth.registry import heartbeat_forever, memory_mb, register
from berth.web import create_app
from berth.worker import tuning
from config.settings import Settings
from sandboxes.models import Machine
from sandboxes.provider import SandboxProvider
from store import hosts
from store.db import get_engine, migrate
from store.models import HostRow, HostState, User, utcnow
from tests.support.local import free_port
from tests.support.world import FAST_PASSWORDS, World, build
from workflows.pool import member_session_id
from workflows.session import SessionWorkflow

CHECKOUT = Path(__file__).resolve().parents[2]


class Machines:
    """The one edge faked: a provider's answer about its machines."""

    def __init__(self, session_ids: list[str]) -> None:
        self.session_ids = session_ids

    async def machines(self) -> list[Machine]:
        return [
            Machine(
                sandbox_id=f"sb{i}",
                session_id=sid,
                handle=f"h{i}",
                state="running",
                created_at=utcnow(),
            )
            for i, sid in enumerate(self.session_ids)
        ]

    def accel(self) -> str:
        return "tcg"


def provider(*session_ids: str) -> SandboxProvider:
    return cast(SandboxProvider, Machines(list(session_ids)))


def host_settings(tmp_path: Path, db_url: str, **more: object) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=db_url,
        host_id="h1",
        sandbox_provider="libvirt",
        vm_max_running=7,
        **more,  # type: ignore[arg-type]
    )


def row(engine: Engine, host_id: str = "h1") -> HostRow:
    with Session(engine) as db:
        found = db.get(HostRow, host_id)
        assert found is not None
        return found


def test_meminfo_is_read_in_mib() -> None:
    text = "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n"
    assert memory_mb(text) == (16000, 8000)


def test_a_host_registers_its_capacity_and_load_and_keeps_an_operators_state(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    settings = host_settings(tmp_path, db_url)
    started = utcnow()
    machines = provider("s1", "s2", member_session_id("default", "warm1"))
    assert asyncio.run(register(settings, engine, machines, started)) == HostState.active
    first = row(engine)
    assert (first.task_queue, first.provider, first.accel) == ("berth-host-h1", "libvirt", "tcg")
    assert (first.machines, first.max_machines, first.warm) == (2, 7, {"default": 1})
    assert first.vcpus == os.cpu_count() and 0 < first.memory_available_mb <= first.memory_mb
    assert "default" in first.templates and first.started_at == started

    with Session(engine) as db:
        assert hosts.set_state(db, "h1", HostState.draining)
        assert not hosts.set_state(db, "nobody", HostState.draining)
        with pytest.raises(ValueError, match="silence"):
            hosts.set_state(db, "h1", HostState.lost)
    # The next beat updates the load, and keeps the drain.
    later = asyncio.run(register(settings, engine, provider("s1"), started))
    assert later == HostState.draining
    second = row(engine)
    assert second.machines == 1 and second.warm == {} and second.last_seen >= first.last_seen


def test_a_silent_host_reads_as_lost_and_back_when_it_beats(engine: Engine, db_url: str,
                                                            tmp_path: Path) -> None:  # fmt: skip
    settings = host_settings(tmp_path, db_url)
    asyncio.run(register(settings, engine, provider(), utcnow()))
    seen = row(engine)
    assert hosts.seen_state(seen, 30.0, seen.last_seen + timedelta(seconds=29)) == "active"
    assert hosts.seen_state(seen, 30.0, seen.last_seen + timedelta(seconds=31)) == "lost"
    with Session(engine) as db:
        assert hosts.state_of(db, "h1", 30.0) == HostState.active
        assert hosts.state_of(db, "nobody", 30.0) is None
        db.get(HostRow, "h1").last_seen = utcnow() - timedelta(seconds=60)  # type: ignore[union-attr]
        db.commit()
        assert hosts.state_of(db, "h1", 30.0) == HostState.lost
    asyncio.run(register(settings, engine, provider(), utcnow()))
    with Session(engine) as db:
        assert hosts.state_of(db, "h1", 30.0) == HostState.active


def test_the_heartbeat_acts_on_a_drain_and_an_undrain(engine: Engine, db_url: str,
                                                      tmp_path: Path) -> None:  # fmt: skip
    settings = host_settings(tmp_path, db_url, host_heartbeat_s=0.05)

    async def scenario() -> list[HostState]:
        changes: list[HostState] = []
        changed = asyncio.Event()

        async def on_change(state: HostState) -> None:
            changes.append(state)
            changed.set()

        async def operator(state: HostState) -> None:
            changed.clear()
            with Session(engine) as db:
                hosts.set_state(db, "h1", state)
            await asyncio.wait_for(changed.wait(), 10)

        started = utcnow()
        state = await register(settings, engine, provider(), started)
        stop = asyncio.Event()
        heart = asyncio.create_task(
            heartbeat_forever(settings, engine, provider(), started, state, on_change, stop)
        )
        await operator(HostState.draining)
        await operator(HostState.active)
        before = row(engine).last_seen
        await asyncio.sleep(0.3)
        assert row(engine).last_seen > before  # it kept beating
        stop.set()
        await asyncio.wait_for(heart, 5)
        return changes

    assert asyncio.run(scenario()) == [HostState.draining, HostState.active]


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[tuple[TestClient, World, Settings]]:
    settings = Settings(
        data_dir=tmp_path,
        host_id="h1",
        temporal_address=f"127.0.0.1:{free_port()}",  # nothing there: never reached
        **FAST_PASSWORDS,
    )
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client, build(client.app.state.engine), settings  # type: ignore[attr-defined]


def bearer(client: TestClient, user: User) -> dict[str, str]:
    settings = client.app.state.settings  # type: ignore[attr-defined]
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        _, secret = accounts.issue_token(db, settings, user, "test")
    return {"Authorization": f"Bearer {secret}"}


def test_admins_see_the_hosts_and_a_draining_host_takes_no_new_session(
    stage: tuple[TestClient, World, Settings],
) -> None:
    client, world, settings = stage
    engine = get_engine(settings.db_url)
    asyncio.run(register(settings, engine, provider("s1"), utcnow()))
    silent = settings.model_copy(update={"host_id": "h2"})
    asyncio.run(register(silent, engine, provider(), utcnow()))
    with Session(engine) as db:
        db.get(HostRow, "h2").last_seen = utcnow() - timedelta(hours=1)  # type: ignore[union-attr]
        db.commit()

    assert client.get("/api/admin/hosts").status_code == 401
    assert client.get("/api/admin/hosts", headers=bearer(client, world.owner)).status_code == 403
    listed = client.get("/api/admin/hosts", headers=bearer(client, world.admin))
    assert listed.status_code == 200, listed.text
    by_id = {h["id"]: h for h in listed.json()}
    assert by_id["h1"]["state"] == "active" and by_id["h1"]["machines"] == 1
    assert by_id["h2"]["state"] == "lost"
    assert datetime.fromisoformat(by_id["h1"]["last_seen"]) > utcnow() - timedelta(minutes=1)

    client.cookies.set("berth_token", bearer(client, world.admin)["Authorization"][7:])
    page = client.get("/admin")
    assert page.status_code == 200 and "<code>h2</code>" in page.text and "lost" in page.text
    client.cookies.clear()

    with Session(engine) as db:
        hosts.set_state(db, "h1", HostState.draining)
    owner = bearer(client, world.owner)
    refused = client.post("/api/sessions", json={}, headers=owner)
    assert refused.status_code == 503, refused.text
    # h1 draining and h2 lost: no host to place it on.
    assert refused.headers["Retry-After"] == "30"
    assert "no active host with template 'default'" in refused.json()["detail"]


def test_the_command_line_drains_and_undrains_a_registered_host(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, host_id="h1")
    engine = get_engine(settings.db_url)
    migrate(settings.db_url)
    asyncio.run(register(settings, engine, provider(), utcnow()))
    env = {**os.environ, "BERTH_DATA_DIR": str(tmp_path), "PYTHONPATH": str(CHECKOUT)}

    def berth(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "berth", "host", *argv],
            env=env, cwd=CHECKOUT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    drained = berth("drain", "h1")
    assert drained.returncode == 0, drained.stderr
    assert "h1 is draining" in drained.stdout and row(engine).state == HostState.draining
    assert berth("undrain", "h1").returncode == 0 and row(engine).state == HostState.active
    unknown = berth("drain", "nope")
    assert unknown.returncode == 1 and "no host 'nope'" in unknown.stderr and "h1" in unknown.stderr


def test_the_workers_temporal_tuning_comes_from_the_settings(temporal_address: str) -> None:
    settings = Settings(
        temporal_address=temporal_address,
        worker_max_concurrent_workflow_tasks=7,
        worker_max_concurrent_activities=9,
        worker_max_concurrent_local_activities=3,
        worker_max_cached_workflows=50,
    )

    async def configured() -> dict[str, object]:
        client = await Client.connect(temporal_address)
        worker = Worker(client, task_queue="q", workflows=[SessionWorkflow], **tuning(settings))
        return dict(worker.config())

    config = asyncio.run(configured())
    assert config["max_concurrent_workflow_tasks"] == 7
    assert config["max_concurrent_activities"] == 9
    assert config["max_concurrent_local_activities"] == 3
    assert config["max_cached_workflows"] == 50


def test_a_change_not_acted_on_is_tried_again_next_beat(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    settings = host_settings(tmp_path, db_url, host_heartbeat_s=0.05)

    async def scenario() -> int:
        tries = 0
        done = asyncio.Event()

        async def on_change(state: HostState) -> None:
            nonlocal tries
            tries += 1
            if tries == 1:
                raise RuntimeError("Temporal is away")
            done.set()

        started = utcnow()
        state = await register(settings, engine, provider(), started)
        with Session(engine) as db:
            hosts.set_state(db, "h1", HostState.draining)
        stop = asyncio.Event()
        heart = asyncio.create_task(
            heartbeat_forever(settings, engine, provider(), started, state, on_change, stop)
        )
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.2)  # no more calls: the change was acted on
        stop.set()
        await asyncio.wait_for(heart, 5)
        return tries

    assert asyncio.run(scenario()) == 2


def test_an_admin_drains_and_undrains_a_host_over_the_api_and_sees_the_button(
    stage: tuple[TestClient, World, Settings],
) -> None:
    client, world, settings = stage
    engine = get_engine(settings.db_url)
    asyncio.run(register(settings, engine, provider(), utcnow()))
    url = "/api/admin/hosts/h1/state"
    owner, admin = bearer(client, world.owner), bearer(client, world.admin)
    assert client.put(url, json={"state": "draining"}, headers=owner).status_code == 403
    assert client.put(url, json={"state": "lost"}, headers=admin).status_code == 422
    missing = client.put("/api/admin/hosts/nobody/state", json={"state": "draining"}, headers=admin)
    assert missing.status_code == 404
    assert client.put(url, json={"state": "draining"}, headers=admin).status_code == 204
    assert row(engine).state == HostState.draining
    client.cookies.set("berth_token", admin["Authorization"][7:])
    page = client.get("/admin").text
    assert 'hx-post="/ui/admin/hosts/h1/undrain"' in page
    client.cookies.clear()
    assert client.put(url, json={"state": "active"}, headers=admin).status_code == 204
    assert row(engine).state == HostState.active
