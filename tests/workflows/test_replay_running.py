"""``python -m berth replay``, the check before a deploy, on a real Temporal dev server with
payloads encrypted as Berth's: a session that ran a task and a warm pool, both still running,
replay against this tree and their histories are saved readable; against a session workflow
changed without a patch, the same histories fail and the command exits non-zero."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, Worker

from config.settings import Settings
from tests.workflows.test_session import Stubs, params, submit, until
from workflows.client import connect, workflow_id
from workflows.pool import PoolInput, SandboxPool
from workflows.replay import ENCRYPTED
from workflows.session import SessionWorkflow

ROOT = Path(__file__).parents[2]
# An opened payload's encoding, as the history's JSON writes it.
PLAIN = base64.b64encode(b"json/plain").decode()


@dataclass
class Running:
    client: Client
    session: WorkflowHandle  # type: ignore[type-arg]
    pool: WorkflowHandle  # type: ignore[type-arg]
    environment: dict[str, str]


@pytest.fixture
async def running(temporal_address: str, tmp_path: Path) -> AsyncIterator[Running]:
    """A worker with stub activities (the edge), a session that ran a task and a pool with
    one VM, both left running; the settings' environment for the command."""
    settings = Settings(data_dir=tmp_path / "data", temporal_address=temporal_address)
    client = await connect(settings)
    stubs = Stubs()
    async with Worker(
        client,
        task_queue=stubs.queue,
        workflows=[SessionWorkflow, SandboxPool],
        activities=stubs.all(),
        max_heartbeat_throttle_interval=timedelta(seconds=1),
    ):
        session = params(stubs)
        handle = await client.start_workflow(
            SessionWorkflow.run,
            session,
            id=workflow_id(session.session_id),
            task_queue=stubs.queue,
        )
        await submit(client, handle.id, "$ echo hello")
        await until(lambda: "succeeded" in stubs.task_statuses().values())
        pool = await client.start_workflow(
            SandboxPool.run,
            PoolInput(template="default", host_task_queue=stubs.queue, min_size=1, max_size=1),
            id=f"pool-{stubs.queue}-default",
            task_queue=stubs.queue,
        )
        await until(lambda: len(stubs.provisioned) == 2)
        environment = {
            **os.environ,
            "BERTH_DATA_DIR": str(settings.data_dir),
            "BERTH_TEMPORAL_ADDRESS": temporal_address,
            "PYTHONPATH": str(ROOT),
        }
        yield Running(client, handle, pool, environment)
        for workflow in (handle, pool):
            await workflow.terminate(reason="test over")


async def berth(environment: dict[str, str], *argv: str, code: str = "") -> tuple[int, str]:
    """The command line in a process of its own; ``code`` runs before it (a test's change)."""
    script = f"import sys\n{code}\nfrom berth.cli import main\nsys.exit(main(sys.argv[1:]))"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *argv,
        env=environment, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_running_workflows_replay_and_are_saved_decrypted(
    running: Running, tmp_path: Path
) -> None:
    saved = tmp_path / "saved"
    code, out = await berth(running.environment, "replay", "--save", str(saved))
    print(out)
    assert code == 0, out
    assert f"ok    {running.session.id} (SessionWorkflow" in out
    assert f"ok    {running.pool.id} (SandboxPool" in out
    assert "0 failed" in out
    files = {p.name.split(".")[0]: p for p in saved.glob("*.json")}
    assert set(files) >= {running.session.id, running.pool.id}
    # Opened with the payload key: the test's converter, which has no key, replays them, and
    # no sealed payload is left in them.
    text = files[running.session.id].read_text()
    assert ENCRYPTED not in text and PLAIN in text
    replayer = Replayer(
        workflows=[SessionWorkflow, SandboxPool], data_converter=pydantic_data_converter
    )
    for path in files.values():
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        assert (await replayer.replay_workflow(history)).replay_failure is None


async def test_a_change_without_a_patch_fails_the_replay(running: Running) -> None:
    change = (
        "import workflows.replay as replay\n"
        "from tests.workflows.unpatched import UnpatchedSession\n"
        "replay.WORKFLOWS = (UnpatchedSession, replay.SandboxPool)"
    )
    code, out = await berth(
        running.environment, "replay", "--workflow-id", running.session.id, code=change
    )
    print(out)
    assert code == 1, out
    assert f"FAIL  {running.session.id} (SessionWorkflow" in out
    assert "Nondeterminism" in out and "1 replayed, 1 failed" in out
