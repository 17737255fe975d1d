"""What binds a guest to its own sandbox, checked without machines: its token opens a link
only while its sandbox lives, the gateway listens only where guests dial it, and a VM's port
on the bridge is bound to its MAC and address (the libvirt tests try the same from inside a
real VM)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import vm_templates
from berth.host import make_provider, open_host
from config.settings import Settings
from guest_agent import protocol
from sandboxes import libvirt_host
from sandboxes.gateway import GuestGateway
from sandboxes.libvirt import LibvirtProvider
from sandboxes.provider import SandboxHost
from sandboxes.tokens import guest_token
from sandboxes.vm_image import Image
from tests.activities.test_run_step import LinkOnly
from tests.support.local import free_port

KEY = b"bounds-test-key"


async def hello(url: str, sandbox_id: str) -> str | int | None:
    """The gateway's answer to a guest saying hello with the sandbox's real token: the
    welcome's type, or the code it closed the link with."""
    async with connect(url) as ws:
        token = guest_token(KEY, sandbox_id)
        await ws.send(
            json.dumps({"type": protocol.HELLO, "sandbox_id": sandbox_id, "token": token})
        )
        try:
            return str(json.loads(await ws.recv())["type"])
        except ConnectionClosed:
            return ws.close_code


async def test_a_token_opens_a_link_only_while_its_sandbox_lives() -> None:
    running = {"live", "destroyed"}  # what the provider says of the machines

    async def alive(sandbox_id: str) -> bool:
        if sandbox_id == "unsure":
            raise RuntimeError("the hypervisor did not answer")
        return sandbox_id in running

    gateway, port = GuestGateway(KEY), free_port()
    gateway.alive = alive
    await gateway.start("127.0.0.1", port)
    url = f"ws://127.0.0.1:{port}/guest"
    try:
        assert await hello(url, "live") == protocol.WELCOME
        # No machine for it (never made here, or gone since), or no answer on it: refused.
        assert await hello(url, "gone") == protocol.CLOSE_UNAUTHORIZED
        assert await hello(url, "unsure") == protocol.CLOSE_UNAUTHORIZED
        # A sandbox being destroyed: its live link is cut, and its machine, still shutting
        # down, lets no guest in again with its token.
        async with connect(url) as ws:
            token = guest_token(KEY, "destroyed")
            await ws.send(
                json.dumps({"type": protocol.HELLO, "sandbox_id": "destroyed", "token": token})
            )
            assert json.loads(await ws.recv())["type"] == protocol.WELCOME
            await gateway.wait_connected("destroyed", 5)
            gateway.forget("destroyed")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert await hello(url, "destroyed") == protocol.CLOSE_UNAUTHORIZED
        # Made again under the same id (a retried provisioning): its guest is let in.
        gateway.admit("destroyed")
        assert await hello(url, "destroyed") == protocol.WELCOME
    finally:
        await gateway.stop()


async def test_a_providers_machines_decide_whose_guest_is_let_in(tmp_path: Path) -> None:
    class Machines(LinkOnly):
        async def is_running(self, handle: str) -> tuple[bool, str]:
            return handle == "berth-running", "running"

    gateway, port = GuestGateway(KEY), free_port()
    Machines(gateway, SandboxHost(KEY, "h", "q", tmp_path))
    await gateway.start("127.0.0.1", port)
    try:
        assert await hello(f"ws://127.0.0.1:{port}/guest", "running") == protocol.WELCOME
        assert await hello(f"ws://127.0.0.1:{port}/guest", "ended") == protocol.CLOSE_UNAUTHORIZED
    finally:
        await gateway.stop()


async def test_the_gateway_listens_only_where_guests_dial(tmp_path: Path) -> None:
    port = free_port()

    class Bridged(LinkOnly):
        """Guests that reach the host at 127.0.0.2 (as a bridge's address would be)."""

        def guest_url(self) -> str:
            return self.gateway.url("127.0.0.2", port)

    settings = Settings(data_dir=tmp_path, gateway_port=port, gateway_tls=False)
    assert settings.gateway_host == ""  # the default
    gateway = GuestGateway(KEY)
    provider = Bridged(gateway, SandboxHost(KEY, "h", "q", tmp_path))
    assert await open_host(settings, gateway, provider) == "127.0.0.2"
    try:
        socket.create_connection(("127.0.0.2", port), timeout=3).close()
        # The host's other addresses have nothing there.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=3)
    finally:
        await gateway.stop()


def test_a_vm_is_bound_to_its_mac_and_address_on_the_bridge(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, sandbox_provider="libvirt")
    provider = make_provider(settings, GuestGateway(KEY))
    assert isinstance(provider, LibvirtProvider)
    provider.host = libvirt_host.Host("tcg", "10.213.0.1", bandwidth_limits=False)
    address = ipaddress.IPv4Address("10.213.0.7")
    image = Image("default", tmp_path / "base.qcow2", tmp_path / "vmlinuz", tmp_path / "initrd")
    spec = vm_templates.spec(vm_templates.DEFAULT)
    xml = provider.domain_xml(
        "sbx", "ses", "default", address, spec, image, tmp_path / "disk.qcow2", tmp_path / "seed"
    )
    (interface,) = ET.fromstring(xml).findall("devices/interface")
    assert interface.find("source").get("bridge") == settings.vm_bridge  # type: ignore[union-attr]
    assert interface.find("mac").get("address") == "52:54:0a:d5:00:07"  # type: ignore[union-attr]
    assert interface.find("port").get("isolated") == "yes"  # type: ignore[union-attr]
    # libvirt's clean-traffic: its MAC and this address only (ARP included); no IPv6, no
    # other Ethernet types.
    (bound,) = interface.findall("filterref")
    assert bound.get("filter") == "clean-traffic"
    assert {p.get("name"): p.get("value") for p in bound.findall("parameter")} == {
        "IP": "10.213.0.7"
    }
