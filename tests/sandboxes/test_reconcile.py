"""Reconciling a host's sandboxes with the live sessions, against the real Docker engine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

import vm_templates
from berth.host import make_gateway, make_provider
from config.settings import Settings
from sandboxes.docker import HOST_LABEL, docker, exists
from sandboxes.models import Machine, SandboxInfo
from sandboxes.monitor import Placed
from sandboxes.provider import SandboxProvider
from sandboxes.reconcile import reconcile, reconcile_forever
from tests.support.local import free_port


@pytest.fixture
async def provider() -> AsyncIterator[SandboxProvider]:
    # A host of its own, so the test sees only its containers; the gateway is never started,
    # the guests just keep dialling.
    settings = Settings(
        sandbox_provider="docker",
        host_id=f"rec-{uuid.uuid4().hex[:8]}",
        guest_token_secret="reconcile-test",
        gateway_port=free_port(),  # its firewall rule's, though nothing listens there
    )
    provider = make_provider(settings, make_gateway(settings))
    await provider.prepare()
    try:
        yield provider
    finally:
        label = f"label={HOST_LABEL}={settings.host_id}"
        handles = (await docker("ps", "--all", "--quiet", "--filter", label)).split()
        if handles:
            await docker("rm", "--force", *handles)
        await provider.close()


async def provision(provider: SandboxProvider) -> SandboxInfo:
    return await provider.provision(uuid.uuid4().hex, uuid.uuid4().hex, vm_templates.DEFAULT)


async def test_live_sessions_keep_their_sandbox_and_orphans_are_destroyed(
    provider: SandboxProvider,
) -> None:
    a, b, c = [await provision(provider) for _ in range(3)]
    machines = await provider.machines()
    assert {(m.sandbox_id, m.session_id, m.handle) for m in machines} == {
        (s.id, s.session_id, s.handle) for s in (a, b, c)
    }
    assert {m.state for m in machines} == {"running"}

    # A is live with its sandbox; B is live but owns another sandbox; C has ended.
    live = {a.session_id: a.id, b.session_id: uuid.uuid4().hex}

    async def owner(session_id: str) -> str | None:
        return live.get(session_id)

    report = await reconcile(provider, owner, grace_s=0)
    assert report.adopted == [a.id]
    assert sorted(report.destroyed) == sorted([b.id, c.id])
    assert report.failed == [] and report.young == []
    assert await exists("container", a.handle)
    assert not await exists("container", b.handle)
    assert not await exists("container", c.handle)


async def test_a_young_orphan_is_spared_until_the_grace_period_is_over(
    provider: SandboxProvider,
) -> None:
    orphan = await provision(provider)

    async def nobody(session_id: str) -> str | None:
        return None

    report = await reconcile(provider, nobody, grace_s=60)
    assert report.young == [orphan.id] and report.destroyed == []
    assert await exists("container", orphan.handle)
    report = await reconcile(provider, nobody, grace_s=0)
    assert report.destroyed == [orphan.id]
    assert not await exists("container", orphan.handle)


async def test_a_machine_that_cannot_be_destroyed_does_not_stop_the_others(
    provider: SandboxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck, gone = await provision(provider), await provision(provider)
    remove = provider.remove

    async def flaky_remove(handle: str) -> None:
        if handle == stuck.handle:
            raise RuntimeError("engine says no")
        await remove(handle)

    monkeypatch.setattr(provider, "remove", flaky_remove)

    async def nobody(session_id: str) -> str | None:
        return None

    report = await reconcile(provider, nobody, grace_s=0)
    assert report.failed == [stuck.id] and report.destroyed == [gone.id]
    assert await exists("container", stuck.handle)
    assert not await exists("container", gone.handle)


async def test_a_session_that_cannot_be_asked_keeps_its_machine(
    provider: SandboxProvider,
) -> None:
    unanswered, orphan = await provision(provider), await provision(provider)

    async def owner(session_id: str) -> str | None:
        if session_id == unanswered.session_id:
            raise ConnectionError("the query timed out")
        return None

    report = await reconcile(provider, owner, grace_s=0)
    assert report.unknown == [unanswered.id] and report.destroyed == [orphan.id]
    assert await exists("container", unanswered.handle)


async def test_a_live_sessions_stopped_or_removed_machine_is_told_not_adopted(
    provider: SandboxProvider,
) -> None:
    """After a Docker restart (a stopped container) or a ``docker rm -f`` behind Berth's
    back (one the database still places here), the live session is told its machine is
    dead; the one that runs is adopted."""
    running, stopped, removed = [await provision(provider) for _ in range(3)]
    await docker("stop", "--time", "0", stopped.handle)
    await docker("rm", "--force", removed.handle)
    live = {s.session_id: s.id for s in (running, stopped, removed)}

    async def owner(session_id: str) -> str | None:
        return live.get(session_id)

    told: dict[str, str] = {}

    async def died(machine: Machine, reason: str) -> None:
        told[machine.sandbox_id] = reason

    placed = [
        Placed(sandbox_id=s.id, session_id=s.session_id, handle=s.handle)
        for s in (running, stopped, removed)
    ]
    report = await reconcile(provider, owner, grace_s=0, on_death=died, placed=placed)
    assert report.adopted == [running.id] and report.destroyed == []
    assert sorted(report.dead) == sorted([stopped.id, removed.id])
    assert "its machine is exited" in told[stopped.id]
    assert "its machine is gone" in told[removed.id]
    assert await exists("container", stopped.handle)  # its session removes it


async def test_reconcile_forever_outlives_a_failing_pass_and_stops_when_told(
    provider: SandboxProvider,
) -> None:
    orphan = await provision(provider)
    calls = 0

    async def owner(session_id: str) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("Temporal is down")
        return None

    stop = asyncio.Event()
    loop = asyncio.create_task(reconcile_forever(provider, owner, 0.05, stop, grace_s=0))
    for _ in range(100):
        if not await exists("container", orphan.handle):
            break
        await asyncio.sleep(0.05)
    assert calls >= 2 and not await exists("container", orphan.handle)
    stop.set()
    await asyncio.wait_for(loop, 5)


async def test_provisioning_the_same_sandbox_again_returns_its_container(
    provider: SandboxProvider,
) -> None:
    first = await provision(provider)
    again = await provider.provision(first.id, first.session_id, first.template)
    assert again == first
    # A stopped one (say, after a host reboot) is started again.
    await docker("kill", first.handle)
    assert (await provider.is_running(first.handle))[0] is False
    third = await provider.provision(first.id, first.session_id, first.template)
    assert third == first
    assert await provider.is_running(first.handle) == (True, "running")


async def test_another_install_on_the_same_engine_and_host_id_is_left_alone(
    provider: SandboxProvider,
) -> None:
    theirs = await provision(provider)
    # Another install (its own signing key) that happens to use the same host id.
    settings = Settings(
        sandbox_provider="docker", host_id=provider.host_id, guest_token_secret="another install"
    )
    ours = make_provider(settings, make_gateway(settings))
    assert await ours.machines() == []

    async def nobody(session_id: str) -> str | None:
        return None

    report = await reconcile(ours, nobody, grace_s=0)
    assert report.destroyed == [] and await exists("container", theirs.handle)
