"""Temporal payloads encrypted with AES-GCM, so workflow inputs, results and histories on the
Temporal server hold no readable data. Each payload names the key that sealed it, so a
rotated key (BERTH_PAYLOAD_PREVIOUS_SECRETS) still opens old histories.

A payload that was never encrypted is refused: whoever reaches the Temporal server could
otherwise send a workflow (another user's session, say) a signal or update of their own
making, as only a holder of the key can seal one. Histories written before encryption hold
such payloads: BERTH_TEMPORAL_ACCEPT_PLAINTEXT lets them through for a migration window,
until those workflows have ended.

The refusal happens when the payload is converted to a value, not in the codec: a codec that
raises fails the whole workflow task, and the workflow would stall on it (so anyone could
stall any session); a value that fails to convert only drops the signal, rejects the update,
fails the query or the activity it came with."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import EncodingPayloadConverter, PayloadCodec

from config.keys import Keyring, key_id

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12
# Bound into every ciphertext: a blob sealed for another purpose with the same key fails.
CONTEXT = b"berth temporal payload"
PLAINTEXT_SETTING = "BERTH_TEMPORAL_ACCEPT_PLAINTEXT"
# What the codec turns a refused payload into: a payload that no value converts from.
REFUSED = "binary/refused-plaintext"


class PlaintextPayload(ValueError):
    """A payload that no holder of the key sealed."""


class RefusedPayloadConverter(EncodingPayloadConverter):
    """Converts no value to a payload, and every refused payload to an error that says why."""

    @property
    def encoding(self) -> str:
        return REFUSED

    def to_payload(self, value: Any) -> Payload | None:
        return None

    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        encoding = payload.metadata.get("refused-encoding", b"").decode(errors="replace")
        raise PlaintextPayload(
            f"refused a payload that is not encrypted (encoding {encoding[:40]!r}): only the "
            f"holders of the payload key may send one; {PLAINTEXT_SETTING}=true lets such "
            "payloads through while histories from before encryption drain"
        )


class PayloadConverter(PydanticPayloadConverter):
    """Pydantic's converter, which also knows refused payloads."""

    def __init__(self) -> None:
        super().__init__()
        self.converters = {**self.converters, REFUSED.encode(): RefusedPayloadConverter()}


class EncryptionCodec(PayloadCodec):
    def __init__(self, keys: Keyring, accept_plaintext: bool = False) -> None:
        self._accept_plaintext = accept_plaintext
        self._current = key_id(keys.current)
        self._ciphers = {key_id(key): AESGCM(key) for key in keys.keys}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._seal(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._open(p) for p in payloads]

    def _seal(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self._current].encrypt(nonce, payload.SerializeToString(), CONTEXT)
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID: self._current.encode()},
            data=nonce + sealed,
        )

    def _open(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            if self._accept_plaintext:
                return payload
            refused = {"refused-encoding": payload.metadata.get("encoding", b"")[:40]}
            return Payload(metadata={"encoding": REFUSED.encode(), **refused})
        name = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self._ciphers.get(name)
        if cipher is None:
            raise ValueError(f"payload sealed with unknown key {name!r}: was it dropped too soon?")
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            return Payload.FromString(cipher.decrypt(nonce, sealed, CONTEXT))
        except InvalidTag:
            raise ValueError(f"payload does not open with key {name!r}: altered?") from None
