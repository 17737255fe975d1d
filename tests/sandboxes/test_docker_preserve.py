"""Preserving and restoring a real Docker sandbox's workspace when Temporal retries the
activity after an attempt that did its work but whose answer was lost (the worker killed
or cut off just before it reported): the retry finds the work done, rather than failing
and losing the session's files."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import vm_templates
from berth.host import make_gateway, make_provider
from config.settings import Settings
from sandboxes.docker import DockerProvider
from sandboxes.models import SandboxInfo, TerminalStep
from tests.support.local import free_port

# Short: a retry that waits for a guest which will never come fails within this.
CONNECT_TIMEOUT_S = 20.0


@pytest.fixture
async def docker(tmp_path: Path) -> AsyncIterator[DockerProvider]:
    settings = Settings(
        data_dir=tmp_path,
        sandbox_provider="docker",
        host_id=f"keep-{uuid.uuid4().hex[:8]}",
        secret_key="preserve-docker-test",
        temporal_address=f"127.0.0.1:{free_port()}",  # nothing there: not needed here
        gateway_port=free_port(),
    )
    gateway = make_gateway(settings)
    provider = make_provider(settings, gateway)
    assert isinstance(provider, DockerProvider)
    await provider.prepare()
    await gateway.start(provider.host_address, settings.gateway_port)
    try:
        yield provider
    finally:
        for machine in await provider.machines():
            await provider.remove(machine.handle)  # only this test's: its own host id
        await gateway.stop()


async def shell(provider: DockerProvider, sandbox: SandboxInfo, command: str) -> str:
    lines: list[str] = []

    async def sink(seq: int, stream: str, text: str) -> None:
        lines.append(text)

    outcome = await provider.run_step(
        sandbox, uuid.uuid4().hex, TerminalStep(command=command), 30, sink
    )
    assert outcome.ok, outcome
    return "".join(lines)


async def test_a_retried_preserve_and_restore_find_their_work_done(
    docker: DockerProvider,
) -> None:
    session_id = uuid.uuid4().hex
    sandbox = await docker.provision(uuid.uuid4().hex, session_id, vm_templates.DEFAULT)
    await docker.wait_connected(sandbox, 60)
    await shell(docker, sandbox, "echo kept > notes.txt")

    await docker.preserve(sandbox, CONNECT_TIMEOUT_S)
    # The attempt's answer was lost: Temporal runs it again, on a machine already gone.
    await docker.preserve(sandbox, CONNECT_TIMEOUT_S)
    assert (docker.preserved(sandbox.id) / "workspace.tar").exists()

    new_id = uuid.uuid4().hex
    restored = await docker.restore(
        sandbox.id, new_id, session_id, vm_templates.DEFAULT, CONNECT_TIMEOUT_S
    )
    assert not docker.preserved(sandbox.id).exists()  # the new machine has it now
    # Again, the answer lost: the retry is given the machine the first attempt made.
    again = await docker.restore(
        sandbox.id, new_id, session_id, vm_templates.DEFAULT, CONNECT_TIMEOUT_S
    )
    assert again == restored
    assert await shell(docker, again, "cat notes.txt") == "kept\n"


async def test_a_sparse_file_is_kept_sparse_not_written_out_on_the_host(
    docker: DockerProvider,
) -> None:
    """A file of huge size and no blocks costs the workspace's tmpfs nothing; written out in
    full into the host's archive, a session could fill the host's disk when it is kept."""
    session_id = uuid.uuid4().hex
    sandbox = await docker.provision(uuid.uuid4().hex, session_id, vm_templates.DEFAULT)
    await docker.wait_connected(sandbox, 60)
    await shell(docker, sandbox, "truncate -s 1G hole && echo kept > notes.txt")
    await docker.preserve(sandbox, CONNECT_TIMEOUT_S)
    assert (docker.preserved(sandbox.id) / "workspace.tar").stat().st_size < 2**20
    restored = await docker.restore(
        sandbox.id, uuid.uuid4().hex, session_id, vm_templates.DEFAULT, CONNECT_TIMEOUT_S
    )
    assert await shell(docker, restored, "stat -c %s hole && cat notes.txt") == "1073741824\nkept\n"


@pytest.mark.parametrize("kept_id", ["../../etc", "/etc", "a/b", "", "x" * 65])
def test_a_kept_id_names_no_folder_outside_the_preserved_root(tmp_path: Path, kept_id: str) -> None:
    """A resumed session's kept sandbox id reaches the (root) worker from the database,
    through the workflow's input: it may not walk out of the preserved root, whose folders
    the worker reads, copies and deletes."""
    settings = Settings(data_dir=tmp_path, sandbox_provider="docker", secret_key="kept-id-test")
    provider = make_provider(settings, make_gateway(settings))
    assert provider.preserved("0123abcd" * 4).parent == tmp_path.resolve() / "preserved"
    with pytest.raises(ValueError, match="not a sandbox id"):
        provider.preserved(kept_id)
