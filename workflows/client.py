"""How to reach the workflows: the Temporal client as the API, the dashboard, the worker and
the tests all make it, and the ids the workflows run under.

Payloads go through the encryption codec (workflows/codec.py), so the server (and its Web UI)
sees only ciphertext. The ids are plain functions: whoever knows a session or a host and a
template finds its workflow without asking anyone."""

from __future__ import annotations

import dataclasses

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter

from activities.models import pool_workflow_id
from config.keys import payload_keys
from config.settings import Settings
from workflows.codec import EncryptionCodec

__all__ = ["connect", "data_converter", "pool_workflow_id", "workflow_id"]


def data_converter(settings: Settings) -> DataConverter:
    codec = EncryptionCodec(payload_keys(settings))
    return dataclasses.replace(pydantic_data_converter, payload_codec=codec)


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_target,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
    )


def workflow_id(session_id: str) -> str:
    """The id of a session's workflow (every run of it, across continue-as-new)."""
    return f"session-{session_id}"
