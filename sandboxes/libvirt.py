"""libvirt/QEMU virtual machines as sandboxes: one domain per sandbox.

A domain is restored from its template's snapshot (sandboxes.snapshots) with a fresh
identity, on a qcow2 overlay of its own over the snapshot's disk; where no snapshot fits the
host, it boots the template's image (sandboxes.vm_image) from an overlay on the read-only
base disk, its identity and token on a seed disk. Its Berth metadata
(sandbox, session, host, deployment) lives in the domain's <metadata>, which is what
reconciliation reads after a restart. Guests sit on the host's bridge (libvirt_host) with a
static address chosen here, and dial the guest gateway on the host's side of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import shutil
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import libvirt

import vm_templates
from guest_agent.identity import PORT_NAME, SNAPSHOT_VARIABLE
from sandboxes import libvirt_host, snapshots, vm_image
from sandboxes.gateway import GuestGateway, GuestUnavailable
from sandboxes.models import HostMachine, Machine, MachineUsage, SandboxInfo
from sandboxes.provider import (
    MISSING,
    SANDBOX_ID,
    TOKEN_VARIABLE,
    SandboxHost,
    SandboxProvider,
    machine_name,
)

log = logging.getLogger("berth.libvirt")

NAMESPACE = "https://berth.dev/xmlns/sandbox/1"
PREFIX = "berth"
# The VM a template's snapshot is taken of: not a sandbox (no "berth-" name), never reconciled.
SNAPSHOT_PREFIX = "berthsnap"
BOOTED = "boot"  # a domain's origin (metadata) when it booted, not restored
# Under TCG, QEMU keeps translated guest code here; its default (1 GiB) would be host RAM.
TB_CACHE_MB = 128
HIBERNATED = "hibernated"
DISK = "disk.qcow2"
SYSTEM_DISK = "vda"  # the overlay's target in domain.xml.j2
# A VM's disks hold what its sessions did: for root (and, while it runs, QEMU) alone.
PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700
# Longest a boot holds its slot waiting for the guest (TCG boots take ~10 s).
BOOT_SLOT_S = 60.0
# Longest a restored VM's guest may take to take its identity (~0.1 s when idle).
IDENTITY_TIMEOUT_S = 60.0
STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(vm_templates.ROOT),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _quiet(_context: object, _error: object) -> None:
    """libvirt prints every error to stderr by default; they are raised (and handled) here."""


libvirt.registerErrorHandler(_quiet, None)


class LibvirtError(RuntimeError):
    pass


def qemu_pid(handle: str) -> int:
    """The QEMU process of a running domain (libvirt's pid file)."""
    return int(Path(f"/run/libvirt/qemu/{handle}.pid").read_text().strip())


# Lifecycle events of the domains, by name: (when, what). libvirt delivers them on a thread
# of its own running its default event loop, registered before any connection is opened.
EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "suspended by the guest",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
}
_event_loop = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    global _event_loop_started
    with _event_loop:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """Serializes address choice and domain definition across every process of the host."""
    libvirt_host.STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (libvirt_host.STATE_DIR / "vm.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _metadata(domain: libvirt.virDomain) -> dict[str, str] | None:
    """A Berth domain's metadata, or None for any other domain."""
    try:
        text = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE)
    except libvirt.libvirtError:
        return None
    return {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in ET.fromstring(text)}


def _berth_domains(conn: libvirt.virConnect) -> list[tuple[libvirt.virDomain, dict[str, str]]]:
    """Every Berth domain of the daemon, with its metadata."""
    found = []
    for domain in conn.listAllDomains():
        if domain.name().startswith(f"{PREFIX}-"):
            meta = _metadata(domain)
            if meta is not None:
                found.append((domain, meta))
    return found


def _active(domain: libvirt.virDomain) -> bool:
    """Whether a listed domain runs; False if it is gone since (another install's domains
    on the host come and go at any time)."""
    try:
        return bool(domain.isActive())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return False


def _state(domain: libvirt.virDomain) -> str:
    state, _ = domain.state()
    if state == libvirt.VIR_DOMAIN_SHUTOFF and domain.hasManagedSaveImage():
        return HIBERNATED
    return STATES.get(state, "unknown")


def every_machine(uri: str) -> list[HostMachine]:
    """Every Berth VM of the libvirt daemon at ``uri``, of any install or host."""
    conn = libvirt.open(uri)
    try:
        return [
            HostMachine(
                kind="libvirt",
                name=domain.name(),
                handle=domain.name(),
                sandbox_id=meta.get("id", ""),
                session_id=meta.get("session", ""),
                host_id=meta.get("host", ""),
                install=meta.get("install", ""),
                state=_state(domain),
                address=meta.get("address", ""),
                created_at=datetime.fromisoformat(meta["created"]),
            )
            for domain, meta in _berth_domains(conn)
        ]
    finally:
        conn.close()


def discard(uri: str, machine: HostMachine) -> None:
    """Destroy and undefine a VM found by ``every_machine`` (its saved memory too), lift its
    address's egress rules, and delete its files if its install's data dir is still there.
    For VMs no worker of theirs will end: no graceful power-off."""
    conn = libvirt.open(uri)
    try:
        domain = conn.lookupByName(machine.handle)
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )
    except libvirt.libvirtError:
        if machine.handle in {d.name() for d, _ in _berth_domains(conn)}:
            raise
    finally:
        conn.close()
    if machine.address:
        libvirt_host.lift_restrictions(machine.address)
    if machine.install and SANDBOX_ID.fullmatch(machine.sandbox_id):
        shutil.rmtree(Path(machine.install) / "vms" / machine.sandbox_id, ignore_errors=True)


def _mac(address: ipaddress.IPv4Address) -> str:
    a, b, c, d = address.packed
    return f"52:54:{a:02x}:{b:02x}:{c:02x}:{d:02x}"


def _host_nameserver() -> str | None:
    """The host's first nameserver that a guest could use (not loopback), if any."""
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    if not ipaddress.ip_address(words[1]).is_loopback and ":" not in words[1]:
                        return words[1]
    return None


class LibvirtProvider(SandboxProvider):
    name = "libvirt"
    boots_from_kept = True

    def __init__(
        self,
        gateway: GuestGateway,
        host: SandboxHost,
        *,
        gateway_port: int,
        data_dir: Path,
        images_dir: Path,
        mirror: str,
        uri: str,
        bridge: str,
        subnet: str,
        shutdown_timeout_s: float,
        max_running: int,
        max_booting: int,
        snapshots: bool = True,
        ksm: bool = True,
    ) -> None:
        super().__init__(gateway, host)
        self.ksm = ksm
        self.gateway_port = gateway_port
        self.data_dir = data_dir.resolve()
        self.images = images_dir.resolve()
        self.mirror = mirror
        self.uri = uri
        self.bridge = bridge
        self.subnet = ipaddress.IPv4Network(subnet)
        self.shutdown_timeout_s = shutdown_timeout_s
        self.max_running = max_running
        self.boots = asyncio.Semaphore(max_booting)
        # Whether new VMs are restored from their template's snapshot (taken by prepare()).
        self.snapshots = snapshots
        self.host: libvirt_host.Host | None = None
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()
        self.last_event: dict[str, tuple[datetime, str]] = {}
        # Each running domain's last CPU time sample (monotonic s, ns), for its CPU use.
        self._cpu_samples: dict[str, tuple[float, int]] = {}

    @property
    def vms(self) -> Path:
        return self.data_dir / "vms"

    def vm_dir(self, sandbox_id: str) -> Path:
        return self.vms / sandbox_id

    # --- host ---

    async def prepare(self) -> None:
        await asyncio.to_thread(self._prepare)

    def _prepare(self) -> None:
        nameserver = _host_nameserver()
        self.host = libvirt_host.prepare_host(
            self.bridge, str(self.subnet), self.gateway_port, nameserver, self.ksm
        )
        self._reachable_by_qemu(self.vms)
        # Made under umask 077 (berth/cli.py) the image cache would be closed to QEMU.
        self._reachable_by_qemu(self.images)
        for template in vm_templates.names():
            self.build_image(template)
            if self.snapshots:
                try:
                    self.take_snapshot(template)
                except (libvirt.libvirtError, snapshots.SnapshotError, OSError) as exc:
                    log.warning("no snapshot of template %s (its VMs boot): %s", template, exc)

    async def close(self) -> None:
        await asyncio.to_thread(libvirt_host.close_host, self.gateway_port)

    def spec(self, template: str) -> vm_templates.TemplateSpec:
        return vm_templates.spec(template)

    def build_image(self, template: str) -> vm_image.Image:
        return vm_image.build_image(self.images, template, self.mirror, self.data_dir / "build")

    def snapshot_key(self, template: str) -> str:
        assert self.host, "prepare() first"
        image = self.build_image(template)
        return snapshots.snapshot_key(image, self.host.accel, self.conn.getLibVersion())

    def snapshot(self, template: str) -> snapshots.Snapshot | None:
        """The template's snapshot that fits this host, if it was taken."""
        if not self.snapshots:
            return None
        return snapshots.find(self.build_image(template), self.snapshot_key(template))

    def take_snapshot(self, template: str) -> snapshots.Snapshot:
        """Boot a VM of the template to its agent's snapshot point and save it (memory and
        disk), unless this host has it already. The VM has no identity: its address is one
        no sandbox gets (the subnet's last but one), and it never sends from it."""
        image = self.build_image(template)
        key = self.snapshot_key(template)
        with snapshots.taking(key):
            found = snapshots.find(image, key)
            if found is not None:
                return found
            target = snapshots.location(image, key)
            name = f"{SNAPSHOT_PREFIX}-{key}"
            with contextlib.suppress(libvirt.libvirtError):  # left by a process that died
                self.conn.lookupByName(name).destroy()
            started = time.monotonic()
            draft = target.folder.with_name(f".{target.folder.name}-{uuid.uuid4().hex[:8]}")
            draft.mkdir()
            draft.chmod(0o755)  # under the umask of 077 (berth/cli.py) QEMU could not enter
            try:
                overlay, seed = draft / snapshots.DISK, draft / "seed.raw"
                vm_image.overlay(image.disk, overlay)
                values = {SNAPSHOT_VARIABLE: "1", "BERTH_HOSTNAME": SNAPSHOT_PREFIX}
                vm_image.write_seed(seed, values)
                address = self.subnet.broadcast_address - 2
                spec = self.spec(template)
                origin = f"snapshot {key}"
                xml = self.domain_xml(
                    "", "", template, address, spec, image, overlay, seed, name=name, origin=origin
                )
                domain = self.conn.createXML(xml, 0)
                try:
                    port = snapshots.port_path(domain)
                    with snapshots.wait_ready(port, snapshots.READY_TIMEOUT_S):
                        domain.save(str(draft / snapshots.MEMORY))
                except BaseException:
                    with contextlib.suppress(libvirt.libvirtError):
                        domain.destroy()
                    raise
                seed.unlink()
                (draft / "console.log").unlink(missing_ok=True)
                for path in draft.iterdir():
                    path.chmod(0o444)  # never written again: every restored VM's backing disk
                draft.rename(target.folder)
            finally:
                shutil.rmtree(draft, ignore_errors=True)
            log.info(
                "snapshot %s of template %s taken in %.1f s",
                key, template, time.monotonic() - started,
            )  # fmt: skip
            return target

    def _reachable_by_qemu(self, folder: Path) -> None:
        """QEMU runs as an unprivileged user: it must be able to walk down to the VMs' files
        (search only: other users cannot list the folders)."""
        folder.mkdir(parents=True, exist_ok=True)
        ours = (self.data_dir, self.images.parent)
        for path in (folder, *folder.parents):
            if not path.stat().st_mode & 0o001:
                if any(path.is_relative_to(root) for root in ours):
                    path.chmod(path.stat().st_mode | 0o011)
                else:
                    raise LibvirtError(
                        f"{path} is not searchable by other users, so QEMU cannot reach "
                        f"{folder}: choose a data dir elsewhere"
                    )

    @property
    def conn(self) -> libvirt.virConnect:
        """One connection, shared by the threads the provider's calls run in."""
        with self._conn_lock:
            if self._conn is None or not self._conn.isAlive():
                _ensure_event_loop()
                conn = libvirt.open(self.uri)
                conn.setKeepAlive(5, 3)
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
                self._conn = conn
            return self._conn

    def _on_lifecycle(
        self, _conn: libvirt.virConnect, domain: libvirt.virDomain, event: int, detail: int, _: None
    ) -> None:
        name = domain.name()
        if not name.startswith(f"{PREFIX}-"):
            return
        if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
            self.last_event.pop(name, None)  # gone for good: nothing more to tell
            return
        what = EVENTS.get(event, f"event {event}")
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            what = f"stopped ({STOPPED_DETAILS.get(detail, detail)})"
        self.last_event[name] = (datetime.now(UTC), what)
        unexpected = event == libvirt.VIR_DOMAIN_EVENT_CRASHED or (
            event == libvirt.VIR_DOMAIN_EVENT_STOPPED
            and detail
            in (libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED)
        )
        (log.warning if unexpected else log.debug)("domain %s: %s", name, what)

    def guest_url(self) -> str:
        assert self.host, "prepare() first"
        return self.gateway.url(self.host.router, self.gateway_port)

    def accel(self) -> str:
        assert self.host, "prepare() first"
        return self.host.accel

    # --- machines ---

    def _domain(self, handle: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(handle)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def address(self, handle: str) -> str:
        """The VM's address on the bridge (its metadata's; empty for no such VM)."""
        domain = self._domain(handle)
        meta = _metadata(domain) if domain is not None else None
        return (meta or {}).get("address", "")

    def origin(self, handle: str) -> str:
        """How the VM started: "boot", or "snapshot KEY" (restored); empty for no such VM."""
        domain = self._domain(handle)
        meta = _metadata(domain) if domain is not None else None
        return (meta or {}).get("origin", "")

    def _berth_domains(self) -> list[tuple[libvirt.virDomain, dict[str, str]]]:
        return _berth_domains(self.conn)

    def _ours(self, meta: dict[str, str]) -> bool:
        return meta.get("host") == self.host_id and meta.get("deployment") == self.deployment

    async def create(
        self, sandbox_id: str, session_id: str, template: str, env: dict[str, str]
    ) -> str:
        """Define and start the domain; a boot holds one of the host's boot slots until its
        guest has connected (or BOOT_SLOT_S passed), so boots never crowd the CPUs."""
        async with self.boots:
            creating = asyncio.ensure_future(
                asyncio.to_thread(self._create, sandbox_id, session_id, template, env)
            )
            try:
                handle, booted = await asyncio.shield(creating)
            except asyncio.CancelledError:
                # The thread carries on regardless: the domain exists (or not) once it is
                # done, so that whoever removes it after the cancel finds it.
                await asyncio.wait([creating])
                raise
            if booted:
                with contextlib.suppress(GuestUnavailable):  # the caller's own wait says so
                    await self.gateway.wait_connected(sandbox_id, BOOT_SLOT_S)
        return handle

    def _create(
        self, sandbox_id: str, session_id: str, template: str, env: dict[str, str]
    ) -> tuple[str, bool]:
        """The domain's name, and whether it was started now: restored from the template's
        snapshot where one fits, else (or if the restore fails) booted."""
        name = machine_name(sandbox_id)
        with host_lock():
            domain = self._domain(name)
            fresh = domain is None
            snapshot = None
            if domain is None:
                # A preserved session's disk, brought back, is not the snapshot's: it boots.
                if not (self.vm_dir(sandbox_id) / DISK).exists():
                    snapshot = self.snapshot(template)
                domain = self._define(sandbox_id, session_id, template, env, snapshot)
            else:
                log.info("sandbox %s: reusing domain %s", sandbox_id, name)
        if domain.isActive():
            return name, False
        started = time.monotonic()
        if snapshot is not None:
            try:
                self.restore_with_identity(domain, snapshot, env)
                log.info(
                    "sandbox %s: restored from snapshot %s in %.2f s",
                    sandbox_id, snapshot.key, time.monotonic() - started,
                )  # fmt: skip
                return name, True
            except (libvirt.libvirtError, snapshots.SnapshotError, OSError) as exc:
                log.warning("sandbox %s: restore failed, booting instead: %s", sandbox_id, exc)
                self._remove(name)
                with host_lock():
                    domain = self._define(sandbox_id, session_id, template, env, None)
                started = time.monotonic()
        try:
            domain.create()  # resumes from a managed save, if there is one
        except libvirt.libvirtError:
            if fresh:  # a retry starts from scratch rather than from this one's remains
                self._remove(name)
            raise
        log.info("sandbox %s: domain started in %.2f s", sandbox_id, time.monotonic() - started)
        return name, True

    def restore_with_identity(
        self, domain: libvirt.virDomain, snapshot: snapshots.Snapshot, env: dict[str, str]
    ) -> None:
        """Start the defined, inactive ``domain`` (its overlay over ``snapshot``'s disk) from
        the snapshot's memory, and tell its guest who it now is: the sandbox, token, address,
        MAC and hostname of ``domain`` (its metadata) and ``env``, with the host's clock and
        fresh random bytes. The guest then dials the gateway as itself. Raises on any failure;
        the domain is left for the caller to remove.

        The one way a saved VM becomes a new one here: new sessions' VMs (from the template's
        snapshot) and, with another snapshot, forks."""
        meta = _metadata(domain) or {}
        address = ipaddress.IPv4Address(meta["address"])
        spec = self.spec(meta["template"])
        folder = self.vm_dir(meta["id"])
        started = time.monotonic()
        snapshots.restore(self.conn, snapshot, domain, folder / "restore.save")
        restored = time.monotonic()
        values = self.seed_values(env, address, spec)
        token = values.pop(TOKEN_VARIABLE)
        port = snapshots.port_path(domain)
        snapshots.tell(port, values, token, _mac(address), IDENTITY_TIMEOUT_S)
        log.info(
            "domain %s: memory restored in %.2f s, identity taken in %.2f s",
            domain.name(), restored - started, time.monotonic() - restored,
        )  # fmt: skip

    def _define(
        self,
        sandbox_id: str,
        session_id: str,
        template: str,
        env: dict[str, str],
        snapshot: snapshots.Snapshot | None,
    ) -> libvirt.virDomain:
        """The domain, defined (not started): its overlay over ``snapshot``'s disk, if given
        (it is then to be restored from it), else over the template's base disk."""
        domains = self._berth_domains()
        if sum(_active(domain) for domain, _ in domains) >= self.max_running:
            raise LibvirtError(f"this host already runs {self.max_running} VMs (its cap)")
        used = {meta.get("address") for _, meta in domains}
        assert self.host, "prepare() first"
        router = ipaddress.IPv4Address(self.host.router)
        reserved = {router, self.subnet.broadcast_address - 2}  # the snapshot VM's
        address = next(
            (a for a in self.subnet.hosts() if a not in reserved and str(a) not in used), None
        )
        if address is None:
            raise LibvirtError(f"no free guest address left in {self.subnet}")
        spec = self.spec(template)
        image = self.build_image(template)
        folder = self.vm_dir(sandbox_id)
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o711)
        overlay, seed = folder / DISK, folder / "seed.raw"
        if not overlay.exists():  # else a preserved session's disk, brought back
            vm_image.overlay(snapshot.disk if snapshot else image.disk, overlay)
        vm_image.write_seed(seed, self.seed_values(env, address, spec))
        for disk in (overlay, seed):
            disk.chmod(PRIVATE_FILE)  # libvirt gives them to QEMU's user while the VM runs
        if spec.network.egress != "public":
            libvirt_host.restrict_egress(str(address), [str(n) for n in spec.network.allow])
        xml = self.domain_xml(
            sandbox_id, session_id, template, address, spec, image, overlay, seed,
            origin=f"snapshot {snapshot.key}" if snapshot else BOOTED,
            # A restored domain's saved image names it by UUID (snapshots.restore).
            domain_uuid=str(uuid.uuid4()) if snapshot else "",
        )  # fmt: skip
        return self.conn.defineXML(xml)

    def domain_xml(
        self,
        sandbox_id: str,
        session_id: str,
        template: str,
        address: ipaddress.IPv4Address,
        spec: vm_templates.TemplateSpec,
        image: vm_image.Image,
        overlay: Path,
        seed: Path,
        *,
        name: str = "",
        origin: str = BOOTED,
        domain_uuid: str = "",
    ) -> str:
        """A domain's definition: its machine, disks, identity port, and its port on the
        bridge, bound to its MAC and ``address``. Named after the sandbox unless ``name`` is
        given; ``origin``: booted, or which snapshot it is restored from."""
        assert self.host, "prepare() first"
        return _templates.get_template("domain.xml.j2").render(
            domain_type="kvm" if self.host.accel == "kvm" else "qemu",
            bandwidth=self.host.bandwidth_limits,
            name=name or machine_name(sandbox_id),
            uuid=domain_uuid,
            namespace=NAMESPACE,
            sandbox_id=sandbox_id,
            session_id=session_id,
            host_id=self.host_id,
            deployment=self.deployment,
            install=self.install,
            template=template,
            address=str(address),
            created=datetime.now(UTC).isoformat(),
            origin=origin,
            spec=spec,
            image=image,
            tb_cache_mb=TB_CACHE_MB,
            overlay=overlay,
            seed=seed,
            console=overlay.parent / "console.log",
            bridge=self.bridge,
            mac=_mac(address),
            identity_port=PORT_NAME,
        )

    def seed_values(
        self, env: dict[str, str], address: ipaddress.IPv4Address, spec: vm_templates.TemplateSpec
    ) -> dict[str, str]:
        """The seed disk's contents (a restored VM's identity message's too): the guest
        agent's ``env``, the guest's network."""
        assert self.host, "prepare() first"
        values = {
            **env,
            "BERTH_GUEST_IP": f"{address}/{self.subnet.prefixlen}",
            "BERTH_GUEST_ROUTER": self.host.router,
            "BERTH_HOSTNAME": f"berth-{env['BERTH_SANDBOX_ID'][:12]}",
        }
        nameserver = _host_nameserver()
        if nameserver and spec.network.egress == "public":
            values["BERTH_DNS"] = nameserver
        return values

    async def machines(self) -> list[Machine]:
        return await asyncio.to_thread(self._machines)

    def _machines(self) -> list[Machine]:
        return [
            Machine(
                sandbox_id=meta["id"],
                session_id=meta["session"],
                handle=domain.name(),
                state=self._state(domain),
                created_at=datetime.fromisoformat(meta["created"]),
            )
            for domain, meta in self._berth_domains()
            if self._ours(meta)
        ]

    def _state(self, domain: libvirt.virDomain) -> str:
        return _state(domain)

    async def remove(self, handle: str) -> None:
        await asyncio.to_thread(self._remove, handle)

    async def keep(self, sandbox: SandboxInfo, folder: Path) -> None:
        await asyncio.to_thread(self._remove, sandbox.handle, folder / DISK)

    async def bring_back(self, sandbox: SandboxInfo, folder: Path, timeout_s: float) -> None:
        """The kept overlay, copied (sparse) to be the new domain's disk: the original stays
        until the new machine is up, so a failed boot loses nothing."""
        disk = self.vm_dir(sandbox.id) / DISK
        if disk.exists():
            return  # an earlier attempt's copy
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.parent.chmod(0o711)
        draft = disk.with_suffix(".part")
        copy = await asyncio.create_subprocess_exec(
            "cp", "--sparse=always", "--reflink=auto", str(folder / DISK), str(draft)
        )
        if await copy.wait() != 0:
            raise LibvirtError(f"could not copy the kept disk of {folder.name}")
        draft.chmod(PRIVATE_FILE)
        draft.replace(disk)

    async def save_checkpoint(self, sandbox: SandboxInfo, folder: Path, memory: bool) -> bool:
        """The overlay copied while the guest is paused, its writes flushed first: a layer
        of its own over the template's image (as a kept disk is), which a rollback or a
        fork boots from. The memory is not kept (yet): a rollback boots the disk."""
        await self.in_guest(sandbox, "sync")
        await asyncio.to_thread(self._save_disk, sandbox, folder)
        return False

    def _save_disk(self, sandbox: SandboxInfo, folder: Path) -> None:
        domain = self._domain(sandbox.handle)
        if domain is None:
            raise LibvirtError(f"domain {sandbox.handle} is gone")
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(PRIVATE_FOLDER)
        draft = folder / f"{DISK}.part"
        domain.suspend()
        try:
            copied = subprocess.run(
                ["cp", "--sparse=always", "--reflink=auto",
                 str(self.vm_dir(sandbox.id) / DISK), str(draft)],
                capture_output=True, text=True,
            )  # fmt: skip
        finally:
            domain.resume()
        if copied.returncode != 0:
            raise LibvirtError(f"could not copy the disk: {copied.stderr.strip()}")
        draft.chmod(PRIVATE_FILE)
        draft.replace(folder / DISK)

    async def usage(self, machines: list[Machine]) -> dict[str, MachineUsage]:
        return await asyncio.to_thread(self._usage, [m for m in machines if m.state == "running"])

    def _usage(self, machines: list[Machine]) -> dict[str, MachineUsage]:
        """CPU from the domains' CPU time since the last sample, memory as QEMU's RSS."""
        found: dict[str, MachineUsage] = {}
        now = time.monotonic()
        for machine in machines:
            domain = self._domain(machine.handle)
            if domain is None:
                continue
            try:
                cpu_ns = domain.getCPUStats(True)[0]["cpu_time"]
                rss_kib = domain.memoryStats().get("rss", 0)
            except libvirt.libvirtError:
                continue  # it ended meanwhile
            disk_mb = None
            with contextlib.suppress(libvirt.libvirtError):
                disk_mb = domain.blockInfo(SYSTEM_DISK)[1] / 2**20  # the overlay's allocation
            before = self._cpu_samples.get(machine.sandbox_id)
            self._cpu_samples[machine.sandbox_id] = (now, cpu_ns)
            if before is not None and now > before[0]:
                percent = 100 * (cpu_ns - before[1]) / 1e9 / (now - before[0])
                found[machine.sandbox_id] = MachineUsage(
                    cpu_percent=percent, memory_mb=rss_kib / 1024, disk_mb=disk_mb
                )
        for gone in set(self._cpu_samples) - {m.sandbox_id for m in machines}:
            del self._cpu_samples[gone]
        return found

    def _remove(self, handle: str, keep: Path | None = None) -> None:
        """ACPI shutdown, destroy past the deadline, undefine, then the VM's files; the
        overlay moved to ``keep`` first, if given (a preserved session's disk)."""
        domain = self._domain(handle)
        if domain is not None:
            meta = _metadata(domain) or {}
            if domain.isActive():
                with contextlib.suppress(libvirt.libvirtError):
                    domain.shutdown()
                deadline = time.monotonic() + self.shutdown_timeout_s
                while domain.isActive() and time.monotonic() < deadline:
                    time.sleep(0.1)
                if domain.isActive():
                    with contextlib.suppress(libvirt.libvirtError):  # it may just have ended
                        domain.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                domain.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                )
            if self._domain(handle) is not None:
                raise LibvirtError(f"could not undefine domain {handle}")
            if meta.get("address"):
                libvirt_host.lift_restrictions(meta["address"])
        folder = self.vm_dir(handle.removeprefix(f"{PREFIX}-"))
        if keep is not None and (folder / DISK).exists():
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.parent.chmod(PRIVATE_FOLDER)
            (folder / DISK).chmod(PRIVATE_FILE)
            (folder / DISK).replace(keep)
        elif keep is not None and not keep.exists():
            raise LibvirtError(f"domain {handle} is gone, its disk not kept")
        shutil.rmtree(folder, ignore_errors=True)

    async def suspend(self, handle: str) -> None:
        await asyncio.to_thread(self._suspend, handle)

    def _suspend(self, handle: str) -> None:
        """Managed save: the guest's RAM goes to a file, QEMU ends; the overlay stays."""
        domain = self._domain(handle)
        if domain is None:
            raise LibvirtError(f"no domain {handle} to suspend")
        if domain.isActive():
            started = time.monotonic()
            domain.managedSave(0)
            log.info("domain %s saved in %.2f s", handle, time.monotonic() - started)

    async def resume(self, handle: str) -> None:
        await asyncio.to_thread(self._resume, handle)

    def _resume(self, handle: str) -> None:
        domain = self._domain(handle)
        if domain is None:
            raise LibvirtError(f"no domain {handle} to resume")
        state, _ = domain.state()
        if state == libvirt.VIR_DOMAIN_PAUSED:
            domain.resume()
        elif not domain.isActive():
            started = time.monotonic()
            domain.create()  # from the managed save image
            log.info("domain %s restored in %.2f s", handle, time.monotonic() - started)

    async def assign(self, handle: str, session_id: str) -> None:
        await asyncio.to_thread(self._assign, handle, session_id)

    def _assign(self, handle: str, session_id: str) -> None:
        domain = self._domain(handle)
        meta = _metadata(domain) if domain is not None else None
        if domain is None or meta is None:
            raise LibvirtError(f"no Berth domain {handle} to assign")
        meta["session"] = session_id
        element = ET.Element("sandbox")
        for key, value in meta.items():
            ET.SubElement(element, key).text = value
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if domain.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        domain.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            ET.tostring(element, encoding="unicode"),
            PREFIX,
            NAMESPACE,
            flags,
        )

    async def is_running(self, handle: str) -> tuple[bool, str]:
        return await asyncio.to_thread(self._is_running, handle)

    def _is_running(self, handle: str) -> tuple[bool, str]:
        """The domain's state, and its last lifecycle event since this worker started."""
        domain = self._domain(handle)
        if domain is None:
            return False, MISSING
        state = self._state(domain)
        event = self.last_event.get(handle)
        detail = f"{state}; last event {event[1]} at {event[0]:%H:%M:%S}" if event else state
        return state == "running", detail
