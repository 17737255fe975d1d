"""The guest channel over TLS: the guest pins the gateway's certificate and gives its token
to no other."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from websockets.asyncio.server import ServerConnection, serve

from berth.host import gateway_certificate, generated_certificate
from config.settings import Settings
from guest_agent.agent import GuestAgent, GuestConfig
from guest_agent.pinning import UntrustedGateway
from sandboxes.gateway import GuestGateway
from sandboxes.gateway_tls import GatewayCertificate
from sandboxes.models import TerminalStep
from sandboxes.tokens import guest_token
from tests.support.local import free_port

KEY = b"tls-test-key"
SANDBOX = "sbx-tls"


def agent_for(url: str, pin: str | None, workdir: Path) -> GuestAgent:
    return GuestAgent(
        GuestConfig(
            url=url,
            sandbox_id=SANDBOX,
            token=guest_token(KEY, SANDBOX),
            gateway_sha256=pin,
            workdir=str(workdir),
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
        )
    )


def test_generated_once_private_and_naming_the_address(tmp_path: Path) -> None:
    made = generated_certificate(tmp_path, ["10.213.0.1", "gateway.local"])
    again = generated_certificate(tmp_path, ["192.0.2.9"])
    assert again.fingerprint == made.fingerprint
    assert stat.S_IMODE(made.key_file.stat().st_mode) == 0o600
    names = (
        x509.load_pem_x509_certificate(made.cert_file.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.213.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["gateway.local"]


def test_settings_choose_the_certificate(tmp_path: Path) -> None:
    assert gateway_certificate(Settings(data_dir=tmp_path, gateway_tls=False), ["x"]) is None
    own = generated_certificate(tmp_path / "own", ["127.0.0.1"])
    configured = Settings(
        data_dir=tmp_path, gateway_cert_file=own.cert_file, gateway_key_file=own.key_file
    )
    assert gateway_certificate(configured, ["127.0.0.1"]) == own
    assert not (tmp_path / "gateway.crt").exists()  # nothing generated beside it
    with pytest.raises(ValueError, match="both or neither"):
        Settings(data_dir=tmp_path, gateway_cert_file=own.cert_file)


async def test_guest_runs_steps_over_wss(tmp_path: Path) -> None:
    certificate = generated_certificate(tmp_path / "tls", ["127.0.0.1"])
    gateway = GuestGateway(KEY, reconnect_grace_s=5)
    port = free_port()
    await gateway.start("127.0.0.1", port, certificate)
    assert gateway.url("127.0.0.1", port).startswith("wss://")
    agent = agent_for(gateway.url("127.0.0.1", port), certificate.fingerprint, tmp_path)
    task = asyncio.create_task(agent.run_forever())
    lines: list[str] = []

    async def sink(_seq: int, _stream: str, text: str) -> None:
        lines.append(text)

    try:
        await gateway.wait_connected(SANDBOX, 20)
        outcome = await gateway.run(SANDBOX, "e1", TerminalStep(command="echo over-tls"), 20, sink)
        assert outcome.exit_code == 0
        assert "over-tls" in "".join(lines)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await agent.close()
        await gateway.stop()


@contextlib.asynccontextmanager
async def recording_gateway(
    certificate: GatewayCertificate,
) -> AsyncIterator[tuple[str, list[str | bytes], asyncio.Event]]:
    """A wss server that keeps whatever a guest sends it: a gateway that is not the pinned one."""
    received: list[str | bytes] = []
    ended = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                received.append(message)
        finally:
            ended.set()

    port = free_port()
    async with serve(handler, "127.0.0.1", port, ssl=certificate.server_context()):
        yield f"wss://127.0.0.1:{port}/guest", received, ended


async def test_guest_refuses_a_gateway_with_another_certificate(tmp_path: Path) -> None:
    impostor = generated_certificate(tmp_path / "impostor", ["127.0.0.1"])
    pinned = generated_certificate(tmp_path / "real", ["127.0.0.1"])
    async with recording_gateway(impostor) as (url, received, ended):
        agent = agent_for(url, pinned.fingerprint, tmp_path)
        with pytest.raises(UntrustedGateway, match="not the pinned one"):
            await agent.serve_once()
        await asyncio.wait_for(ended.wait(), 10)  # the connection did open, and is closed
        # Without a pin, no certificate is trusted either.
        with pytest.raises(UntrustedGateway, match="no pin"):
            await agent_for(url, None, tmp_path).serve_once()
        assert received == []  # no hello, no token: nothing at all
