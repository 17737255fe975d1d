"""Secrets: a key per purpose (user tokens, guest tokens, Temporal payloads), each rotatable
with a grace period; Temporal payloads encrypted (AES-GCM, key id in the metadata) and
readable by operators only through the codec endpoint."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.protobuf.json_format import MessageToDict
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from websockets.asyncio.client import connect as ws_connect

from berth.host import generated_certificate, make_gateway
from berth.web import create_app
from config.keys import guest_keys, payload_keys, user_keys
from config.settings import Settings
from guest_agent import protocol
from sandboxes.gateway_tls import self_signed
from sandboxes.tokens import guest_token
from store.models import User
from tests.support.local import free_port
from tests.support.world import FAST_PASSWORDS, World, bearer, build
from workflows.client import connect
from workflows.codec import KEY_ID, EncryptionCodec


def settings_for(data: Path, **extra: Any) -> Settings:
    values = {"temporal_address": f"127.0.0.1:{free_port()}", **FAST_PASSWORDS, **extra}
    return Settings(data_dir=data, **values)


def test_each_purpose_has_a_key_of_its_own_from_a_private_secret(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    keys = [ring(settings).current for ring in (user_keys, guest_keys, payload_keys)]
    assert len(set(keys)) == 3
    # The worker's in the data dir, the API's in the folder the API's user owns.
    for path in (
        settings.shared_dir / "user_token_secret",
        tmp_path / "guest_token_secret",
        settings.shared_dir / "payload_secret",
    ):
        assert path.stat().st_mode & 0o777 == 0o600
    assert user_keys(Settings(data_dir=tmp_path)).current == keys[0], "not kept"


def test_a_user_token_outlives_a_rotation_used_within_the_grace_period(tmp_path: Path) -> None:
    def get(settings: Settings, token: str) -> int:
        with TestClient(create_app(settings)) as client:
            return client.get(
                "/api/tokens", headers={"Authorization": f"Bearer {token}"}
            ).status_code

    before = settings_for(tmp_path, user_token_secret="first secret")
    with TestClient(create_app(before)) as client:
        world = build(client.app.state.engine)  # type: ignore[attr-defined]
    used, unused = (bearer(create_app(before).state.engine, before, world.owner) for _ in "ab")
    # Rotating the guest secret leaves user tokens alone.
    assert (
        get(
            settings_for(tmp_path, user_token_secret="first secret", guest_token_secret="new"), used
        )
        == 200
    )
    grace = settings_for(
        tmp_path, user_token_secret="second secret", user_token_previous_secrets=["first secret"]
    )
    assert get(grace, used) == 200  # and it moves to the new key
    after = settings_for(tmp_path, user_token_secret="second secret")
    assert get(after, used) == 200
    assert get(after, unused) == 401  # not used in the grace period: gone with the old key


async def test_a_guest_token_of_the_previous_guest_secret_still_opens_its_link(
    tmp_path: Path,
) -> None:
    old = Settings(data_dir=tmp_path, guest_token_secret="old guest secret")
    rotated = Settings(
        data_dir=tmp_path,
        guest_token_secret="new guest secret",
        guest_token_previous_secrets=["old guest secret"],
    )
    dropped = Settings(data_dir=tmp_path, guest_token_secret="new guest secret")

    async def answer(settings: Settings, token: str) -> str | int | None:
        gateway, port = make_gateway(settings), free_port()
        await gateway.start("127.0.0.1", port)
        try:
            async with ws_connect(f"ws://127.0.0.1:{port}") as ws:
                hello = {"type": protocol.HELLO, "sandbox_id": "sbx", "token": token}
                await ws.send(json.dumps(hello))
                try:
                    return str(json.loads(await ws.recv())["type"])
                except Exception:
                    return ws.close_code
        finally:
            await gateway.stop()

    token = guest_token(guest_keys(old).current, "sbx")
    assert await answer(rotated, token) == protocol.WELCOME
    assert await answer(dropped, token) == protocol.CLOSE_UNAUTHORIZED
    assert (
        await answer(rotated, guest_token(guest_keys(rotated).current, "sbx")) == protocol.WELCOME
    )


async def test_payloads_are_sealed_with_a_named_key_that_rotates(tmp_path: Path) -> None:
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"secret": "hunter2"}')
    old = EncryptionCodec(payload_keys(settings_for(tmp_path, payload_secret="one")))
    [sealed] = await old.encode([plain])
    assert b"hunter2" not in sealed.SerializeToString()
    assert sealed.metadata["encoding"] == b"binary/encrypted" and sealed.metadata[KEY_ID]
    rotated = EncryptionCodec(
        payload_keys(settings_for(tmp_path, payload_secret="two", payload_previous_secrets=["one"]))
    )
    assert await rotated.decode([sealed]) == [plain]
    [resealed] = await rotated.encode([plain])
    assert resealed.metadata[KEY_ID] != sealed.metadata[KEY_ID]
    [refused] = await rotated.decode([plain])
    assert refused.metadata["encoding"] == b"binary/refused-plaintext" and not refused.data
    with pytest.raises(ValueError, match="unknown key"):
        await EncryptionCodec(payload_keys(settings_for(tmp_path, payload_secret="two"))).decode(
            [sealed]
        )
    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(ValueError, match="altered"):
        await rotated.decode([tampered])


Stage = tuple[TestClient, Settings, World]


@pytest.fixture
def stage(temporal_address: str, tmp_path: Path) -> Iterator[Stage]:
    settings = Settings(
        data_dir=tmp_path,
        temporal_address=temporal_address,
        codec_token="codec-token",
        **FAST_PASSWORDS,
    )
    with TestClient(create_app(settings)) as client:
        yield client, settings, build(client.app.state.engine)  # type: ignore[attr-defined]


def auth(stage: Stage, user: User) -> dict[str, str]:
    client, settings, _ = stage
    return {"Authorization": f"Bearer {bearer(client.app.state.engine, settings, user)}"}  # type: ignore[attr-defined]


async def test_temporal_stores_ciphertext_and_the_codec_endpoint_reads_it_to_admins(
    stage: Stage,
) -> None:
    client, settings, world = stage
    secret = f"the session's secret {uuid.uuid4()}"
    berth = await connect(settings)
    handle = await berth.start_workflow(
        "NoSuchWorkflow", {"prompt": secret}, id=f"codec-{uuid.uuid4()}", task_queue="nobody"
    )
    raw = await Client.connect(settings.temporal_target, data_converter=pydantic_data_converter)
    history = await raw.get_workflow_handle(handle.id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    [stored] = started.input.payloads
    assert stored.metadata["encoding"] == b"binary/encrypted"
    assert secret.encode() not in history.events[0].SerializeToString()
    await handle.terminate()

    body = MessageToDict(started.input)
    admin = auth(stage, world.admin)
    decoded = client.post("/codec/decode", json=body, headers=admin)
    assert decoded.status_code == 200
    [payload] = decoded.json()["payloads"]
    assert secret.encode() in base64.b64decode(payload["data"])
    codec_token = {"Authorization": "Bearer codec-token"}
    assert client.post("/codec/decode", json=body, headers=codec_token).status_code == 200
    owner = auth(stage, world.owner)
    assert client.post("/codec/decode", json=body, headers=owner).status_code == 403
    assert client.post("/codec/decode", json=body).status_code == 401
    # Encoding and decoding again gives the same payload back.
    sealed = client.post("/codec/encode", json={"payloads": [payload]}, headers=admin).json()
    assert sealed != {"payloads": [payload]}
    again = client.post("/codec/decode", json=sealed, headers=admin).json()
    assert again == {"payloads": [payload]}
    # The Web UI shows plaintext payloads too (histories of a migration window).
    assert client.post("/codec/decode", json={"payloads": [payload]}, headers=admin).json() == {
        "payloads": [payload]
    }


def test_the_web_ui_may_call_the_codec_and_no_other_site(
    stage: Stage,
) -> None:
    client, settings, _ = stage
    ui = f"http://127.0.0.1:{settings.temporal_ui_port}"
    preflight = client.options(
        "/codec/decode",
        headers={"Origin": ui, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == ui
    assert "x-namespace" in preflight.headers["access-control-allow-headers"]
    evil = client.options("/codec/decode", headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers
    call = client.post(
        "/codec/decode",
        json={"payloads": []},
        headers={"Origin": ui, "Authorization": "Bearer codec-token"},
    )
    assert call.status_code == 200 and call.headers["access-control-allow-origin"] == ui


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as `make run` that drops it")
@pytest.mark.parametrize("planted", ["secret_key", "guest_token_secret", "gateway.crt+gateway.key"])
def test_the_root_worker_takes_no_secret_the_data_dirs_owner_planted(
    tmp_path: Path, planted: str
) -> None:
    """Under `make run` as root the data dir is the API's user's: that user can put a file
    of its own there (or replace root's). A guest-token secret of its choosing would let it
    forge any guest's connection; a gateway key of its choosing, impersonate the gateway."""
    api_user = 65534  # nobody: the data dir's owner, as after the hand-over
    os.chown(tmp_path, api_user, api_user)
    settings = Settings(data_dir=tmp_path)
    for name in planted.split("+"):
        data = self_signed(["127.0.0.1"])[1] if name.endswith(".key") else b"known to the api"
        (tmp_path / name).write_bytes(data)
        os.chown(tmp_path / name, api_user, api_user)
    with pytest.raises(RuntimeError, match="another user could have written"):
        if planted.startswith("gateway"):
            generated_certificate(tmp_path, ["127.0.0.1"])
        else:
            guest_keys(settings)
