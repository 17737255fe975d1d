"""Checkpoints of a libvirt VM on real libvirt and QEMU (TCG here): a disk checkpoint taken
while the VM runs, a rollback after the files were deleted brings them back, and a fork boots
a VM of its own from the checkpoint's disk."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine
from temporalio.testing import ActivityEnvironment

from activities.checkpoints import CheckpointActivities
from activities.models import CheckpointRequest, CheckpointSaved, ForkRequest
from sandboxes.libvirt import LibvirtProvider
from sandboxes.models import SandboxInfo
from tests.activities.test_run_step import sqlite_engine
from tests.sandboxes.test_libvirt import CONNECT_TIMEOUT_S, boot, gone, run, unavailable, vms

__all__ = ["sqlite_engine", "vms"]

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


async def test_a_disk_checkpoint_rolls_back_deleted_files_and_forks(
    vms: LibvirtProvider, sqlite_engine: Engine
) -> None:
    sandbox = await boot(vms)
    made = "echo kept > kept.txt && mkdir d && echo x > d/y"
    assert (await run(vms, sqlite_engine, sandbox, made))[0] == 0
    activities = CheckpointActivities(vms, CONNECT_TIMEOUT_S)
    checkpoint_id = uuid.uuid4().hex
    request = CheckpointRequest(sandbox=sandbox, checkpoint_id=checkpoint_id, memory=True)
    saved: CheckpointSaved = await ActivityEnvironment().run(activities.take, request)
    assert saved.memory is False and saved.size_bytes > 0
    # The VM goes on after the checkpoint.
    assert (await run(vms, sqlite_engine, sandbox, "rm -rf kept.txt d"))[0] == 0
    assert (await run(vms, sqlite_engine, sandbox, "cat kept.txt"))[0] != 0

    back: SandboxInfo = await ActivityEnvironment().run(activities.roll_back, request)
    assert back.id == sandbox.id and vms.gateway.is_connected(back.id)
    assert await run(vms, sqlite_engine, back, "cat kept.txt d/y") == (0, "kept\nx\n")

    fork = ForkRequest(
        checkpoint_id=checkpoint_id, sandbox_id=uuid.uuid4().hex,
        session_id=uuid.uuid4().hex, template=sandbox.template,
    )  # fmt: skip
    forked: SandboxInfo = await ActivityEnvironment().run(activities.fork, fork)
    assert forked.id != sandbox.id and forked.handle != sandbox.handle
    assert await run(vms, sqlite_engine, forked, "cat kept.txt") == (0, "kept\n")
    # Its own disk: what it writes, its parent does not see.
    assert (await run(vms, sqlite_engine, forked, "echo mine > fork.txt"))[0] == 0
    assert (await run(vms, sqlite_engine, back, "cat fork.txt"))[0] != 0

    for machine in (back, forked):
        await vms.destroy(machine)
        assert await gone(vms, machine)
    await ActivityEnvironment().run(activities.delete, checkpoint_id)
    assert not vms.checkpoint_folder(checkpoint_id).exists()
