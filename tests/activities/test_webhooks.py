"""Signing, the URL policy (SSRF), and sealed secrets of webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.models import WebhookRequest
from activities.webhooks import (
    Refused,
    WebhookActivities,
    check_address,
    check_url,
    pinned,
    post,
    sign,
)
from config.keys import Keyring, seal, unseal
from sandboxes.gateway_tls import self_signed
from store.db import get_engine, migrate
from store.models import User, WebhookDelivery, WebhookEndpoint


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    header = sign("whsec_x", 1767225600, '{"id":"d1"}')
    expected = hmac.new(b"whsec_x", b'1767225600.{"id":"d1"}', hashlib.sha256).hexdigest()
    assert header == f"t=1767225600,v1={expected}"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/h",
        "file:///etc/passwd",
        "https:///nohost",
        "https://user:pw@example.com/h",
        "https://example.com:99999/h",  # a 422, not the server's error
        "https://example.com:port/h",
        "https://[::1/h",
    ],
)
def test_only_plain_http_urls_are_taken(url: str) -> None:
    with pytest.raises(Refused):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/h",
        "http://localhost/h",
        "http://10.1.2.3/h",
        "http://192.168.0.1/h",
        "http://169.254.169.254/latest/meta-data",  # a cloud's metadata service
        "http://[::1]/h",
        "http://[fe80::1]/h",
        "http://[::ffff:10.0.0.1]/h",
        "http://100.64.0.1/h",
        "http://0.0.0.0/h",
    ],
)
async def test_a_non_public_address_is_refused_unless_allowed(url: str) -> None:
    with pytest.raises(Refused, match="non-public") as refused:
        await check_address(url, allow_private=False)
    # The address is not told (a user would learn what internal names resolve to).
    assert "resolves to a non-public" in str(refused.value)
    await check_address(url, allow_private=True)


async def test_a_public_address_is_taken() -> None:
    await check_address("https://93.184.216.34/hooks", allow_private=False)


def test_a_sealed_secret_opens_with_its_key_also_after_a_rotation() -> None:
    old, new = Keyring((b"k" * 32,)), Keyring((b"n" * 32, b"k" * 32))
    sealed = seal(old, "whsec_secret")
    assert "whsec_secret" not in sealed
    assert unseal(old, sealed) == unseal(new, sealed) == "whsec_secret"
    with pytest.raises(ValueError, match="no longer"):
        unseal(Keyring((b"n" * 32,)), sealed)
    name, _, data = sealed.partition(".")
    altered = f"{name}.{data[:-4]}AAAA"
    with pytest.raises(ValueError):
        unseal(old, altered)


@pytest.mark.parametrize(
    "address",
    [
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo of a client at 10.0.0.1
        "224.0.0.1",  # multicast
        "ff02::1",
        "fec0::1",  # site-local
    ],
)
async def test_ipv6_forms_of_private_addresses_and_multicast_are_refused(address: str) -> None:
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(Refused, match="non-public"):
        await check_address(f"http://{host}/h", allow_private=False)


async def test_a_delivery_connects_to_the_address_checked_not_to_a_rebound_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolves to a public address when checked, then to loopback
    when the HTTP client resolves it again; the delivery must not reach loopback."""
    heard: list[bytes] = []

    async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(1024))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    answers = iter(["93.184.216.34"])  # the first answer public, every later one loopback

    async def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("rebind.example", b"rebind.example"):  # the HTTP client's is bytes
            return await real(host, *args, **kwargs)
        ip = next(answers, "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    engine = get_engine(f"sqlite:///{tmp_path / 'berth.db'}")
    migrate(str(engine.url))
    keys = Keyring((b"k" * 32,))
    with Session(engine) as db:
        user = User(email="a@example.com", password_hash="x")
        db.add(user)
        db.flush()
        endpoint = WebhookEndpoint(
            user_id=user.id,
            url=f"http://rebind.example:{port}/h",
            events=["task.finished"],
            secret=seal(keys, "whsec_x"),
        )
        db.add(endpoint)
        db.flush()
        delivery = WebhookDelivery(
            endpoint_id=endpoint.id, event="task.finished", session_id="s1", body="{}"
        )
        db.add(delivery)
        db.commit()
        delivery_id = delivery.id
    hooks = WebhookActivities(engine, keys, allow_private=False, timeout_s=1)
    try:
        with pytest.raises(ApplicationError):
            await ActivityEnvironment().run(
                hooks.deliver, WebhookRequest(delivery_id=delivery_id, max_attempts=1, timeout_s=1)
            )
    finally:
        server.close()
        await server.wait_closed()
    assert heard == []


def test_a_pinned_request_keeps_the_names_host_header_and_tls_name() -> None:
    target, headers, extensions = pinned("https://hooks.example:8443/h?x=1", "2606:2800::1")
    assert str(target) == "https://[2606:2800::1]:8443/h?x=1"
    assert headers == {"Host": "hooks.example:8443"}
    assert extensions == {"sni_hostname": "hooks.example"}
    assert pinned("http://hooks.example/h", None) == (httpx.URL("http://hooks.example/h"), {}, {})


async def test_an_address_that_refuses_the_connection_gives_way_to_the_next() -> None:
    """As a name's IPv6 address, first, on a server without an IPv6 route."""
    heard: list[bytes] = []

    async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(4096))
        writer.write(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.2", port))  # held, not listening: a connection there is refused
    try:
        async with httpx.AsyncClient(timeout=5) as web:
            url = f"http://hooks.example:{port}/h"
            answer = await post(web, url, ["127.0.0.2", "127.0.0.1"], "{}", {})
        assert answer.status_code == 204 and len(heard) == 1
    finally:
        closed.close()
        server.close()
        await server.wait_closed()


async def test_a_pinned_https_request_is_checked_against_the_names_certificate(
    tmp_path: Path,
) -> None:
    """Connected to the checked address, TLS still names the URL's host (SNI) and its
    certificate must be that host's: a pinned address is no way around the TLS check."""
    cert, key = self_signed(["hooks.example"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    heard: list[bytes] = []

    async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(4096))
        writer.write(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(listener, "127.0.0.1", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=tmp_path / "c.pem")
    try:
        async with httpx.AsyncClient(verify=trusting) as web:
            target, host, extensions = pinned(f"https://hooks.example:{port}/h", "127.0.0.1")
            answer = await web.post(target, content=b"{}", headers=host, extensions=extensions)
            assert answer.status_code == 204
            assert f"Host: hooks.example:{port}".encode() in heard[0]
            target, host, extensions = pinned(f"https://other.example:{port}/h", "127.0.0.1")
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await web.post(target, content=b"{}", headers=host, extensions=extensions)
    finally:
        server.close()
        await server.wait_closed()
