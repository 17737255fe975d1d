"""`python -m berth machines`: every Berth machine on the host by install, and --prune removing
those of an install whose data dir is gone, against the real Docker engine."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import vm_templates
from berth.host import make_gateway, make_provider
from berth.machines import machines, parse_age, why_prune
from config.settings import Settings
from sandboxes.docker import HOST_LABEL, INSTALL_LABEL, docker, exists
from sandboxes.models import HostMachine
from tests.support.local import free_port


def settings_for(data: Path) -> Settings:
    return Settings(
        data_dir=data,
        sandbox_provider="docker",
        host_id=f"mach-{uuid.uuid4().hex[:8]}",
        guest_token_secret=f"machines-{data.name}",
        gateway_port=free_port(),
    )


async def test_prune_removes_the_machines_of_a_gone_install_and_says_so(tmp_path: Path) -> None:
    kept, gone = settings_for(tmp_path / "kept"), settings_for(tmp_path / "gone")
    sandboxes = {}
    providers = []
    try:
        for settings in (kept, gone):
            settings.data_dir.mkdir()
            provider = make_provider(settings, make_gateway(settings))
            providers.append(provider)
            await provider.prepare()
            sandboxes[settings.host_id] = await provider.provision(
                uuid.uuid4().hex, uuid.uuid4().hex, vm_templates.DEFAULT
            )
        # New machines carry their install: the data dir, absolute.
        for settings in (kept, gone):
            handle = sandboxes[settings.host_id].handle
            label = await docker(
                "inspect", "--format", f'{{{{index .Config.Labels "{INSTALL_LABEL}"}}}}', handle
            )
            assert label == str(settings.data_dir.resolve())
        shutil.rmtree(gone.data_dir)

        said: list[str] = []
        assert await machines(kept, prune=False, older_than=None, say=said.append) == 0
        listing = "\n".join(said)
        assert f"{gone.data_dir.resolve()} (gone): 1 machine" in listing
        assert f"{kept.data_dir.resolve()}: 1 machine" in listing
        assert sandboxes[gone.host_id].session_id in listing
        assert await exists("container", sandboxes[gone.host_id].handle)

        said.clear()
        assert await machines(kept, prune=True, older_than=None, say=said.append) == 0
        removed = [line for line in said if line.startswith("removed ")]
        gone_sandbox = sandboxes[gone.host_id]
        assert any(
            f"berth-{gone_sandbox.id}" in line
            and f"its install {gone.data_dir.resolve()} is gone" in line
            for line in removed
        ), said
        assert not any(f"berth-{sandboxes[kept.host_id].id}" in line for line in removed)
        assert not await exists("container", gone_sandbox.handle)
        assert await exists("container", sandboxes[kept.host_id].handle)
    finally:
        for settings in (kept, gone):
            label = f"label={HOST_LABEL}={settings.host_id}"
            handles = (await docker("ps", "--all", "--quiet", "--filter", label)).split()
            if handles:
                await docker("rm", "--force", *handles)
        for provider in providers:
            await provider.close()


def machine(install: str, age: timedelta, now: datetime) -> HostMachine:
    return HostMachine(
        kind="docker", name="berth-x", handle="x", sandbox_id="x", session_id="s", host_id="h",
        install=install, state="running", created_at=now - age,
    )  # fmt: skip


def test_what_prune_takes_and_what_it_spares(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    here, gone = str(tmp_path), str(tmp_path / "nowhere")
    two_days = parse_age("2d")
    assert two_days == timedelta(days=2) and parse_age("90s") == timedelta(seconds=90)
    assert "is gone" in (why_prune(machine(gone, timedelta(minutes=1), now), None, now) or "")
    # An install that exists, or one unknown (made before machines carried it): by age only.
    assert why_prune(machine(here, timedelta(days=3), now), None, now) is None
    assert why_prune(machine("", timedelta(days=3), now), None, now) is None
    assert "older than 2d" in (why_prune(machine("", timedelta(days=3), now), two_days, now) or "")
    assert why_prune(machine(here, timedelta(days=1), now), two_days, now) is None
    with pytest.raises(ValueError, match="not an age"):
        parse_age("2 days")
