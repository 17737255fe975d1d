"""Template snapshots on real libvirt and QEMU (TCG here): new VMs are restored from the
template's snapshot with a fresh identity each (token, MAC, address, hostname, random seed,
the host's clock), run steps as themselves, and boot instead when no snapshot fits the host.
At most two VMs run at once (the machine is shared)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from sqlalchemy import Engine

import vm_templates
from sandboxes.libvirt import BOOTED, LibvirtProvider
from sandboxes.models import SandboxInfo
from tests.activities.test_run_step import sqlite_engine
from tests.sandboxes.test_containment import Sandbox
from tests.sandboxes.test_libvirt import CONNECT_TIMEOUT_S, gone, run, unavailable, vms
from tests.workflows.test_session import env

__all__ = ["env", "sqlite_engine", "vms"]  # fixtures of other tests'

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

# The guest's clock against the host's, at most (the target).
CLOCK_SKEW_S = 0.05
IDENTITY = (
    "cat /proc/sys/kernel/hostname /sys/class/net/eth0/address;"
    " /opt/berth/busybox ip -4 -o addr show dev eth0 | /opt/berth/busybox awk '{print $4}';"
    " head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"
)


async def create(provider: LibvirtProvider) -> SandboxInfo:
    sandbox = await provider.provision(uuid.uuid4().hex, uuid.uuid4().hex, vm_templates.DEFAULT)
    await provider.wait_connected(sandbox, CONNECT_TIMEOUT_S)
    return sandbox


async def test_a_restored_vm_runs_steps_on_the_hosts_clock(
    vms: LibvirtProvider, sqlite_engine: Engine
) -> None:
    snapshot = vms.snapshot(vm_templates.DEFAULT)
    assert snapshot is not None, "prepare() took no snapshot"
    sandbox = await create(vms)
    assert vms.origin(sandbox.handle) == f"snapshot {snapshot.key}"
    code, output = await run(vms, sqlite_engine, sandbox, "echo hello; cat /etc/berth-template")
    assert (code, output) == (0, "hello\ndefault\n")
    # Set from the host's as the VM was restored: the snapshot's own is minutes old.
    before = time.time()
    code, output = await Sandbox(vms, sandbox).run("date +%s.%N")
    after = time.time()
    assert code == 0
    guest = float(output)
    assert before - CLOCK_SKEW_S <= guest <= after + CLOCK_SKEW_S, (before, guest, after)
    await vms.destroy(sandbox)
    assert await gone(vms, sandbox)


async def test_two_vms_restored_from_one_snapshot_are_each_themselves(
    vms: LibvirtProvider,
) -> None:
    sandboxes = await asyncio.gather(create(vms), create(vms))
    seen = []
    for sandbox in sandboxes:
        assert vms.origin(sandbox.handle).startswith("snapshot ")
        # The gateway routes a step by the token the guest dialled with: this one's.
        code, output = await Sandbox(vms, sandbox).run(IDENTITY)
        assert code == 0, output
        hostname, mac, address, randomness = output.split()
        assert hostname == f"berth-{sandbox.id[:12]}"
        assert address.split("/")[0] == vms.address(sandbox.handle)
        assert f"<mac address='{mac}'/>" in vms.conn.lookupByName(sandbox.handle).XMLDesc(0)
        seen.append((vms.guest_env(sandbox.id)["BERTH_GUEST_TOKEN"], mac, address, randomness))
    for first, second in zip(*seen, strict=True):
        assert first != second  # token, MAC, address, the kernel's random bytes
    for sandbox in sandboxes:
        await vms.destroy(sandbox)


async def test_a_vm_boots_when_no_snapshot_fits_the_host(
    vms: LibvirtProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert vms.snapshot(vm_templates.DEFAULT) is not None
    # As on a host with another QEMU or CPU: the snapshot's key is not this host's.
    monkeypatch.setattr(vms, "snapshot_key", lambda template: "0" * 12)
    assert vms.snapshot(vm_templates.DEFAULT) is None
    sandbox = await create(vms)
    assert vms.origin(sandbox.handle) == BOOTED
    code, output = await Sandbox(vms, sandbox).run("cat /proc/sys/kernel/hostname")
    assert (code, output) == (0, f"berth-{sandbox.id[:12]}\n")
    await vms.destroy(sandbox)
