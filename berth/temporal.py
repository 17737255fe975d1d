"""The Temporal client, as the API, the worker and berth.local all make it: payloads go
through the encryption codec, so the server (and its Web UI) sees only ciphertext."""

from __future__ import annotations

import dataclasses

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter

from berth.codec import EncryptionCodec
from berth.keys import payload_keys
from berth.settings import Settings


def data_converter(settings: Settings) -> DataConverter:
    codec = EncryptionCodec(payload_keys(settings))
    return dataclasses.replace(pydantic_data_converter, payload_codec=codec)


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_target,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
    )
