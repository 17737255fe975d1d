"""The check before a deploy: the histories of the workflows running now, fetched from the
Temporal server, replayed against this working tree's workflow classes.

A change that would break a running session (a command added, removed or reordered without
``workflow.patched``) fails its replay here, before the new worker meets that session and
fails its workflow task on every retry. The recorded histories under tests/ cover the paths
someone thought of; this covers the sessions that actually exist.

Payloads are opened with the payload key (the client's codec), so the replay sees the values
the workflows saw. ``save`` writes each history as JSON with its payloads opened: what the
workflows did, readable, to add to the recorded histories (they hold the sessions' commands
and output in clear: keep them as private as the database).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import PayloadCodec
from temporalio.worker import Replayer, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from workflows.codec import ENCODING
from workflows.pool import SandboxPool
from workflows.session import SessionWorkflow

WORKFLOWS: tuple[type, ...] = (SessionWorkflow, SandboxPool)
# Every running session and warm pool of the namespace.
RUNNING = (
    'ExecutionStatus="Running" AND (WorkflowType="SessionWorkflow" OR WorkflowType="SandboxPool")'
)
ENCRYPTED = base64.b64encode(ENCODING).decode()


@dataclass(frozen=True)
class Replayed:
    """One workflow run's replay: None as ``failure`` when it replayed as it ran."""

    workflow_id: str
    run_id: str
    workflow_type: str
    events: int
    failure: str | None

    def line(self) -> str:
        what = f"{self.workflow_id} ({self.workflow_type}, run {self.run_id}, {self.events} events)"
        return f"ok    {what}" if self.failure is None else f"FAIL  {what}: {self.failure}"


async def histories(
    client: Client, query: str | None, workflow_ids: Sequence[str]
) -> AsyncIterator[WorkflowHistory]:
    """The named workflows' latest runs, or those the visibility query lists."""
    if workflow_ids:
        for workflow_id in workflow_ids:
            yield await client.get_workflow_handle(workflow_id).fetch_history()
        return
    async for execution in client.list_workflows(query or RUNNING):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        yield await handle.fetch_history()


async def replay(
    client: Client,
    *,
    query: str | None = None,
    workflow_ids: Sequence[str] = (),
    save: Path | None = None,
    workflows: Sequence[type] | None = None,
    workflow_runner: WorkflowRunner | None = None,
) -> list[Replayed]:
    """Replay each history against ``workflows`` (WORKFLOWS, this tree's, unless a test
    says), with the client's data converter (its codec opens the payloads)."""
    replayer = Replayer(
        workflows=workflows or WORKFLOWS,
        data_converter=client.data_converter,
        workflow_runner=workflow_runner or SandboxedWorkflowRunner(),
    )
    results = []
    async for history in histories(client, query, workflow_ids):
        if save is not None:
            await write(history, save, client.data_converter.payload_codec)
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        failure = result.replay_failure
        results.append(
            Replayed(
                workflow_id=history.workflow_id,
                run_id=history.run_id,
                workflow_type=workflow_type(history),
                events=len(history.events),
                failure=None if failure is None else f"{type(failure).__name__}: {failure}",
            )
        )
    return results


def workflow_type(history: WorkflowHistory) -> str:
    if not history.events:
        return "?"
    return history.events[0].workflow_execution_started_event_attributes.workflow_type.name


async def write(history: WorkflowHistory, folder: Path, codec: PayloadCodec | None) -> Path:
    """The history as JSON, its payloads opened, in ``folder``; named by workflow and run."""
    document = history.to_json_dict()
    if codec is not None:
        await opened(document, codec)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{history.workflow_id}.{history.run_id}")
    path = folder / f"{name}.json"
    # As WorkflowHistory.to_json writes it: from_json reads it back.
    await asyncio.to_thread(saved, path, json.dumps(document, indent=2))
    return path


def saved(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


async def opened(node: Any, codec: PayloadCodec) -> None:
    """Open, in place, every encrypted payload of a history's JSON (inputs, results,
    failures' encoded attributes, markers' details...), wherever it sits."""
    if isinstance(node, list):
        for item in node:
            await opened(item, codec)
        return
    if not isinstance(node, dict):
        return
    metadata = node.get("metadata")
    if isinstance(metadata, dict) and metadata.get("encoding") == ENCRYPTED:
        payload = json_format.ParseDict(node, Payload())
        (plain,) = await codec.decode([payload])
        node.clear()
        node.update(json_format.MessageToDict(plain))
        return
    for value in node.values():
        await opened(value, codec)
