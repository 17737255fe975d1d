"""The provider that the settings name."""

from __future__ import annotations

from urllib.parse import urlsplit

from config.keys import guest_keys
from config.settings import Settings
from sandboxes.docker import DockerProvider
from sandboxes.gateway import GuestGateway
from sandboxes.gateway_tls import GatewayCertificate, generated_certificate
from sandboxes.libvirt import LibvirtProvider
from sandboxes.provider import SandboxProvider


def make_gateway(settings: Settings) -> GuestGateway:
    keys = guest_keys(settings)
    return GuestGateway(
        keys.current,
        reconnect_grace_s=settings.guest_reconnect_grace_s,
        previous_keys=keys.keys[1:],
    )


def make_provider(settings: Settings, gateway: GuestGateway) -> SandboxProvider:
    host = (
        gateway,
        guest_keys(settings).current,
        settings.host_id,
        settings.host_task_queue,
        settings.data_dir.resolve() / "preserved",
    )
    match settings.sandbox_provider:
        case "docker":
            return DockerProvider(
                *host,
                gateway_port=settings.gateway_port,
                build_dir=settings.data_dir / "build",
                mirror=settings.debian_mirror,
                cpus=settings.sandbox_cpus,
                memory_mb=settings.sandbox_memory_mb,
                pids=settings.sandbox_pids,
                workspace_mb=settings.sandbox_workspace_mb,
                tmp_mb=settings.sandbox_tmp_mb,
                host_ports=tuple(settings.sandbox_host_ports),
            )
        case "libvirt":
            return LibvirtProvider(
                *host,
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
            )


def gateway_certificate(settings: Settings, names: list[str]) -> GatewayCertificate | None:
    """The gateway's certificate: the configured one, else the data dir's (made for
    ``names`` if there is none yet); None when the gateway speaks plain ws."""
    if not settings.gateway_tls:
        return None
    if settings.gateway_cert_file and settings.gateway_key_file:
        return GatewayCertificate(settings.gateway_cert_file, settings.gateway_key_file)
    return generated_certificate(settings.data_dir, names)


async def open_host(
    settings: Settings, gateway: GuestGateway, provider: SandboxProvider, host: str | None = None
) -> None:
    """Prepare the sandbox host, then start the gateway (on ``host``, else the settings'
    gateway_host) over TLS if the settings say so, its certificate naming the address
    guests dial."""
    await provider.prepare()
    address = urlsplit(provider.guest_url()).hostname
    certificate = gateway_certificate(settings, [address] if address else [])
    await gateway.start(host or settings.gateway_host, settings.gateway_port, certificate)
