"""How to reach the workflows: the Temporal client as the API, the dashboard, the worker and
the tests all make it, and the ids the workflows run under.

Payloads go through the encryption codec (workflows/codec.py), so the server (and its Web UI)
sees only ciphertext; so do failures' messages and stack traces (which carry commands and
check details), moved into an encrypted payload by the failure converter. A real cluster or
Temporal Cloud is reached over TLS (mTLS with a client certificate) and/or with an API key,
from the settings. The ids are plain functions: whoever knows a session or a host and a
template finds its workflow without asking anyone."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client, Interceptor
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from activities.models import pool_workflow_id
from config.keys import payload_keys
from config.settings import Settings
from telemetry import tracing
from workflows.codec import EncryptionCodec, PayloadConverter

__all__ = [
    "connect",
    "connect_options",
    "data_converter",
    "pool_workflow_id",
    "workflow_id",
]


class ConnectOptions(TypedDict):
    """What reaching the server takes besides its address and the data converter."""

    namespace: str
    tls: TLSConfig | bool
    api_key: str | None


def data_converter(settings: Settings) -> DataConverter:
    codec = EncryptionCodec(payload_keys(settings), settings.temporal_accept_plaintext)
    return DataConverter(
        payload_converter_class=PayloadConverter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def tls_config(settings: Settings) -> TLSConfig | bool:
    """TLS as the settings ask for it; False (plain gRPC) when none of them does."""
    wanted = settings.temporal_tls or settings.temporal_api_key is not None
    files = (settings.temporal_tls_ca_file, settings.temporal_tls_cert_file)
    if not (wanted or any(files) or settings.temporal_tls_server_name):
        return False
    return TLSConfig(
        server_root_ca_cert=_read(settings.temporal_tls_ca_file),
        domain=settings.temporal_tls_server_name,
        client_cert=_read(settings.temporal_tls_cert_file),
        client_private_key=_read(settings.temporal_tls_key_file),
    )


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None


def connect_options(settings: Settings) -> ConnectOptions:
    return ConnectOptions(
        namespace=settings.temporal_namespace,
        tls=tls_config(settings),
        api_key=settings.temporal_api_key,
    )


class UnknownNamespace(RuntimeError):
    """The settings name a namespace the Temporal server does not have."""


async def connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    """A client of the settings' namespace, which must exist: against a server without it,
    every workflow would look gone, and whoever sweeps rows or machines by their workflows
    (the worker) would end every live session. ``runtime``: the SDK's own (its metrics).

    With traces on, the client and every worker made from it trace workflows and activities
    (the SDK's interceptor: each start, update, workflow run and activity attempt a span,
    their context in the headers); off, no interceptor is added and nothing is spent."""
    interceptors: list[Interceptor] = []
    if tracing.enabled():
        # Imported only then: it loads the OpenTelemetry SDK, which an untraced process skips.
        from temporalio.contrib.opentelemetry import TracingInterceptor

        interceptors.append(TracingInterceptor(tracing.tracer()))
    client = await Client.connect(
        settings.temporal_target,
        data_converter=data_converter(settings),
        runtime=runtime,
        interceptors=interceptors,
        **connect_options(settings),
    )
    try:
        await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=settings.temporal_namespace)
        )
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        raise UnknownNamespace(
            f"the Temporal server at {settings.temporal_target} has no namespace "
            f"{settings.temporal_namespace!r} (BERTH_TEMPORAL_NAMESPACE)"
        ) from exc
    return client


def workflow_id(session_id: str) -> str:
    """The id of a session's workflow (every run of it, across continue-as-new)."""
    return f"session-{session_id}"
