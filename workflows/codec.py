"""Temporal payloads encrypted with AES-GCM, so workflow inputs, results and histories on the
Temporal server hold no readable data. Each payload names the key that sealed it, so a
rotated key (BERTH_PAYLOAD_PREVIOUS_SECRETS) still opens old histories. Payloads that were
never encrypted (histories from before) pass through as they are."""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from config.keys import Keyring, key_id

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12
# Bound into every ciphertext: a blob sealed for another purpose with the same key fails.
CONTEXT = b"berth temporal payload"


class EncryptionCodec(PayloadCodec):
    def __init__(self, keys: Keyring) -> None:
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
            return payload
        name = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self._ciphers.get(name)
        if cipher is None:
            raise ValueError(f"payload sealed with unknown key {name!r}: was it dropped too soon?")
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            return Payload.FromString(cipher.decrypt(nonce, sealed, CONTEXT))
        except InvalidTag:
            raise ValueError(f"payload does not open with key {name!r}: altered?") from None
