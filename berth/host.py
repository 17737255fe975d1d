"""The sandbox host made from the settings: the guest gateway, the provider that the settings
name (with the host value every provider takes), and the gateway's certificate.

This is the one place that turns Settings into sandboxes' pieces: sandboxes/ never reads the
settings, so a provider can be made for any host (the worker, a test, a benchmark) from
plain values.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from urllib.parse import urlsplit

from config.keys import guest_keys, owned
from config.settings import Settings
from sandboxes.docker import DockerProvider
from sandboxes.gateway import GuestGateway
from sandboxes.gateway_tls import CERT_FILE, KEY_FILE, GatewayCertificate, self_signed
from sandboxes.libvirt import LibvirtProvider
from sandboxes.provider import SandboxHost, SandboxProvider


def make_gateway(settings: Settings) -> GuestGateway:
    keys = guest_keys(settings)
    return GuestGateway(
        keys.current,
        reconnect_grace_s=settings.guest_reconnect_grace_s,
        previous_keys=keys.keys[1:],
    )


def sandbox_host(settings: Settings) -> SandboxHost:
    """The host value every provider of these settings takes."""
    return SandboxHost(
        key=guest_keys(settings).current,
        host_id=settings.host_id,
        task_queue=settings.host_task_queue,
        preserved_root=(settings.kept_disks_dir or settings.data_dir / "preserved").resolve(),
        install=str(settings.data_dir.resolve()),
    )


def make_provider(settings: Settings, gateway: GuestGateway) -> SandboxProvider:
    host = sandbox_host(settings)
    match settings.sandbox_provider:
        case "docker":
            return DockerProvider(
                gateway,
                host,
                gateway_port=settings.gateway_port,
                build_dir=settings.data_dir / "build",
                mirror=settings.debian_mirror,
                cpus=settings.sandbox_cpus,
                memory_mb=settings.sandbox_memory_mb,
                pids=settings.sandbox_pids,
                workspace_mb=settings.sandbox_workspace_mb,
                tmp_mb=settings.sandbox_tmp_mb,
                host_ports=tuple(settings.sandbox_host_ports),
                network=settings.docker_network,
                bridge=settings.docker_bridge,
            )
        case "libvirt":
            return LibvirtProvider(
                gateway,
                host,
                gateway_port=settings.gateway_port,
                data_dir=settings.data_dir,
                images_dir=settings.vm_images_dir,
                mirror=settings.debian_mirror,
                uri=settings.libvirt_uri,
                bridge=settings.vm_bridge,
                subnet=settings.vm_subnet,
                shutdown_timeout_s=settings.vm_shutdown_timeout_s,
                max_running=settings.vm_max_running,
                max_booting=settings.vm_max_booting,
                snapshots=settings.vm_snapshots,
                ksm=settings.vm_ksm,
            )


def gateway_certificate(settings: Settings, names: list[str]) -> GatewayCertificate | None:
    """The gateway's certificate: the configured one, else the data dir's (made for
    ``names`` if there is none yet); None when the gateway speaks plain ws."""
    if not settings.gateway_tls:
        return None
    if settings.gateway_cert_file and settings.gateway_key_file:
        return GatewayCertificate(settings.gateway_cert_file, settings.gateway_key_file)
    return generated_certificate(settings.data_dir, names)


def generated_certificate(data_dir: Path, names: list[str]) -> GatewayCertificate:
    """The data dir's gateway certificate, made for ``names`` the first time (under a lock:
    workers of one data dir may start together)."""
    made = GatewayCertificate(data_dir / CERT_FILE, data_dir / KEY_FILE)
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / f"{CERT_FILE}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if made.cert_file.exists() and made.key_file.exists():
            # Another user's (the data dir's owner's) would be a key it knows: guests' pin.
            owned(made.cert_file)
            owned(made.key_file)
            return made
        cert_pem, key_pem = self_signed(names)
        # The key first, private from its creation; the certificate's presence says both are.
        with contextlib.suppress(FileNotFoundError):
            made.key_file.unlink()
        fd = os.open(made.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as sink:
            sink.write(key_pem)
        draft = made.cert_file.with_suffix(".draft")
        draft.write_bytes(cert_pem)
        draft.replace(made.cert_file)
    return made


async def open_host(
    settings: Settings, gateway: GuestGateway, provider: SandboxProvider, host: str | None = None
) -> str:
    """Prepare the sandbox host, then start the gateway over TLS if the settings say so, its
    certificate naming the address guests dial. It listens on ``host``, else the settings'
    gateway_host, else only on that address (the host's on the sandboxes' bridge): not on
    the host's other addresses, where anyone beside the sandboxes could knock. Returns
    where it listens."""
    await provider.prepare()
    address = urlsplit(provider.guest_url()).hostname
    if not address:
        raise ValueError(f"no address in the guests' gateway URL {provider.guest_url()!r}")
    certificate = gateway_certificate(settings, [address])
    listen = host or settings.gateway_host or address
    await gateway.start(listen, settings.gateway_port, certificate)
    return listen
