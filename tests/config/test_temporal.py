"""The boundary to Temporal: payloads nobody sealed are refused, failures travel encrypted,
and a real cluster or Temporal Cloud is reached over TLS and with an API key."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import TLSConfig
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from config.settings import Settings
from sandboxes.gateway_tls import self_signed
from workflows.client import connect, connect_options, data_converter

SECRET = "check failed: $ cat /home/berth/notes.txt printed hunter2"


@workflow.defn(sandboxed=False)
class Failing:
    @workflow.run
    async def run(self) -> None:
        raise ApplicationError(SECRET, non_retryable=True)


@workflow.defn(sandboxed=False)
class Waiting:
    def __init__(self) -> None:
        self.said: list[str] = []

    @workflow.run
    async def run(self) -> list[str]:
        await workflow.wait_condition(lambda: bool(self.said))
        return self.said

    @workflow.update
    def say(self, words: str) -> str:
        self.said.append(words)
        return words


def settings_for(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(data_dir=tmp_path, payload_secret="temporal test", **extra)


async def test_a_payload_nobody_sealed_is_refused_unless_a_migration_allows_it(
    tmp_path: Path,
) -> None:
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'"take over"')
    strict = data_converter(settings_for(tmp_path))
    with pytest.raises(ValueError, match=r"not encrypted.*BERTH_TEMPORAL_ACCEPT_PLAINTEXT"):
        await strict.decode([plain], [str])
    migrating = data_converter(settings_for(tmp_path, temporal_accept_plaintext=True))
    assert await migrating.decode([plain], [str]) == ["take over"]
    sealed = await strict.encode(["ours"])
    assert await strict.decode(sealed, [str]) == ["ours"]


async def test_a_plaintext_update_from_another_process_does_not_reach_the_workflow(
    temporal_address: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, temporal_address=temporal_address)
    berth = await connect(settings)
    queue = f"codec-{uuid.uuid4()}"
    async with Worker(
        berth, task_queue=queue, workflows=[Waiting], workflow_runner=UnsandboxedWorkflowRunner()
    ):
        handle = await berth.start_workflow(
            Waiting.run, id=f"waiting-{uuid.uuid4()}", task_queue=queue
        )
        intruder = await Client.connect(temporal_address, data_converter=pydantic_data_converter)
        with pytest.raises(Exception):  # noqa: B017 - refused, whatever Temporal calls it
            await intruder.get_workflow_handle(handle.id).execute_update(
                "say", "planted", rpc_timeout=timedelta(seconds=5)
            )
        assert await handle.execute_update(Waiting.say, "ours") == "ours"
        assert await handle.result() == ["ours"]


async def test_a_failure_message_travels_encrypted(temporal_address: str, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, temporal_address=temporal_address)
    berth = await connect(settings)
    queue = f"codec-{uuid.uuid4()}"
    async with Worker(
        berth, task_queue=queue, workflows=[Failing], workflow_runner=UnsandboxedWorkflowRunner()
    ):
        handle = await berth.start_workflow(
            Failing.run, id=f"failing-{uuid.uuid4()}", task_queue=queue
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert isinstance(failed.value.cause, ApplicationError)
    assert failed.value.cause.message == SECRET, "the codec opens it"
    raw = await Client.connect(temporal_address, data_converter=pydantic_data_converter)
    history = await raw.get_workflow_handle(handle.id).fetch_history()
    last = history.events[-1]
    failure = last.workflow_execution_failed_event_attributes.failure
    assert failure.encoded_attributes.metadata["encoding"] == b"binary/encrypted"
    assert b"hunter2" not in last.SerializeToString()
    assert "hunter2" not in failure.message and "hunter2" not in failure.stack_trace


def test_the_client_reaches_a_cluster_over_mtls_with_an_api_key(tmp_path: Path) -> None:
    cert, key = self_signed(["temporal.example"])
    (tmp_path / "ca.pem").write_bytes(cert)
    (tmp_path / "client.pem").write_bytes(cert)
    (tmp_path / "client.key").write_bytes(key)
    settings = settings_for(
        tmp_path,
        temporal_address="temporal.example:7233",
        temporal_namespace="berth.acct",
        temporal_tls_ca_file=tmp_path / "ca.pem",
        temporal_tls_cert_file=tmp_path / "client.pem",
        temporal_tls_key_file=tmp_path / "client.key",
        temporal_tls_server_name="temporal.internal",
        temporal_api_key="key-123",
    )
    options = connect_options(settings)
    assert options["tls"] == TLSConfig(
        server_root_ca_cert=cert,
        domain="temporal.internal",
        client_cert=cert,
        client_private_key=key,
    )
    assert options["api_key"] == "key-123" and options["namespace"] == "berth.acct"
    # An API key alone (Temporal Cloud): TLS with the system's roots.
    cloud = connect_options(settings_for(tmp_path, temporal_api_key="key-123"))
    assert cloud["tls"] == TLSConfig() and cloud["api_key"] == "key-123"
    # Nothing set: plain gRPC to the local dev server, as before.
    assert connect_options(settings_for(tmp_path)) == {
        "namespace": "default",
        "tls": False,
        "api_key": None,
    }
    with pytest.raises(ValueError, match="BERTH_TEMPORAL_TLS_KEY_FILE"):
        settings_for(tmp_path, temporal_tls_cert_file=tmp_path / "client.pem")
