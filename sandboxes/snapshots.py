"""Template snapshots: a VM booted once to its agent's snapshot point, its memory and disk
saved, and restored (with a fresh identity) instead of booted for every new VM.

Under TCG a boot takes ~6-7 s; a restore of the saved memory ~1 s. A snapshot is taken per
template image and host, in ``python -m berth prepare`` (and a worker's start), of a VM whose
guest agent has loaded its code and waits, with no identity at all, for one
(guest_agent/identity.py). It is kept beside the image, under a key of everything a saved
machine depends on: the image, QEMU's and libvirt's versions, the host's CPU and how guests
run (KVM or TCG), the domain's template. Any change gives another key: no snapshot fits, and
VMs boot (the fallback) until prepare takes the new one.

A restored VM gets a copy-on-write overlay of its own over the snapshot's disk (which is
never written again), a new name and UUID, a new MAC and address, and over the identity port
its token, sandbox id, hostname, the host's clock and fresh random bytes.

libvirt restores a saved image into the domain its header names, and refuses another XML
whose UUID or MAC differs (its ABI check): it was made for moving one machine, not for
making many. So each restore gets a copy of the saved image whose header carries the new
domain's XML (``retarget``); the memory stream after it is the snapshot's, unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
import socket
import struct
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

import vm_templates
from guest_agent.identity import APPLIED, PORT_NAME, READY
from sandboxes import libvirt_host, vm_image

log = logging.getLogger("berth.libvirt")

# Bumped when what a snapshot holds, or how it is taken, changes.
FORMAT = 1
MEMORY = "memory.save"
DISK = "disk.qcow2"
# libvirt's QEMU save image header (src/qemu/qemu_saveimage.h, version 2): magic, version,
# length of the data after it (the domain XML and a cookie, each NUL-terminated), whether
# the domain ran, compression, the cookie's offset in the data, 14 unused words.
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("<16s5I56x")
SAVE_VERSION = 2
# A snapshot VM's boot, to the snapshot point (TCG boots take ~7 s; more beside others').
READY_TIMEOUT_S = 180.0
CONNECT_TIMEOUT_S = 10.0
ASK_AGAIN_S = 2.0


class SnapshotError(RuntimeError):
    pass


@dataclass(frozen=True)
class Snapshot:
    key: str
    folder: Path

    @property
    def memory(self) -> Path:
        return self.folder / MEMORY

    @property
    def disk(self) -> Path:
        return self.folder / DISK


@functools.cache
def qemu_version() -> str:
    result = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    )
    return result.stdout.splitlines()[0]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def snapshot_key(image: vm_image.Image, accel: str, libvirt_version: int) -> str:
    """What a saved machine of ``image`` depends on, hashed: restored on a host where any of
    it differs, it might not run (a CPU feature gone) or not fit its domain."""
    facts = (
        f"format {FORMAT}",
        image.disk.parent.name,  # the image's own key: template, guest files, kernel
        qemu_version(),
        f"libvirt {libvirt_version}",
        cpu_model(),
        accel,
        vm_templates.fingerprint(vm_templates.ROOT / "domain.xml.j2"),
    )
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:12]


def location(image: vm_image.Image, key: str) -> Snapshot:
    """Beside the image (shared by every install on the host that uses the image)."""
    folder = image.disk.parent
    return Snapshot(key, folder.with_name(f"{folder.name}.snapshot-{key}"))


def find(image: vm_image.Image, key: str) -> Snapshot | None:
    snapshot = location(image, key)
    return snapshot if snapshot.memory.exists() and snapshot.disk.exists() else None


@contextlib.contextmanager
def taking(key: str) -> Iterator[None]:
    """One process at a time takes a given snapshot; the others wait, then find it."""
    libvirt_host.STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (libvirt_host.STATE_DIR / f"snapshot-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- the identity port ---


def port_path(domain: libvirt.virDomain) -> str:
    """The host side of a running domain's identity port (a socket libvirt placed)."""
    root = ET.fromstring(domain.XMLDesc(0))
    for channel in root.iterfind("devices/channel"):
        target, source = channel.find("target"), channel.find("source")
        if target is not None and target.get("name") == PORT_NAME and source is not None:
            path = source.get("path")
            if path:
                return path
    raise SnapshotError(f"domain {domain.name()} has no identity port")


def _connect(path: str, timeout_s: float) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def wait_ready(path: str, timeout_s: float) -> socket.socket:
    """Connected to the port once the guest says it waits at the snapshot point."""
    sock = _connect(path, timeout_s)
    sock.settimeout(timeout_s)
    received = b""
    while READY not in received:
        chunk = sock.recv(4096)
        if not chunk:
            sock.close()
            raise SnapshotError("the guest closed its identity port")
        received += chunk
    return sock


def tell(path: str, env: dict[str, str], token: str, mac: str, timeout_s: float) -> None:
    """Send a restored guest its identity, stamped with the host's time as it goes, again
    every ASK_AGAIN_S until the guest says it applied it (one sent as the VM starts may be
    lost: guest_agent/identity.py)."""
    seed = secrets.token_hex(32)
    deadline = time.monotonic() + timeout_s
    with _connect(path, CONNECT_TIMEOUT_S) as sock:
        heard = b""
        while APPLIED not in heard:
            if time.monotonic() > deadline:
                raise SnapshotError(f"the guest did not take its identity in {timeout_s:.0f} s")
            message: dict[str, Any] = {
                "env": env, "token": token, "mac": mac, "seed": seed, "time_ns": time.time_ns(),
            }  # fmt: skip
            sock.sendall(json.dumps(message).encode() + b"\n")
            sock.settimeout(ASK_AGAIN_S)
            with contextlib.suppress(TimeoutError):
                while APPLIED not in heard:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise SnapshotError("the guest closed its identity port")
                    heard = (heard + chunk)[-64:]


# --- saving and restoring ---


def retarget(saved: Path, out: Path, xml: str) -> None:
    """A copy of the saved image ``saved`` at ``out`` whose header names the domain ``xml``
    (the memory stream after it copied in the kernel, sparse regions and all)."""
    with saved.open("rb") as source:
        magic, version, length, was_running, compressed, cookie_at = SAVE_HEADER.unpack(
            source.read(SAVE_HEADER.size)
        )
        if magic != SAVE_MAGIC or version != SAVE_VERSION or compressed:
            raise SnapshotError(f"{saved} is not an uncompressed libvirt save image (v2)")
        data = source.read(length)
        cookie = data[cookie_at:].split(b"\0", 1)[0] if cookie_at else b""
        body = xml.encode() + b"\0"
        cookie_offset = len(body) if cookie else 0
        if cookie:
            body += cookie + b"\0"
        header = SAVE_HEADER.pack(
            SAVE_MAGIC, SAVE_VERSION, len(body), was_running, 0, cookie_offset
        )
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as target:
            target.write(header + body)
            target.flush()
            offset, size = source.tell(), saved.stat().st_size
            while offset < size:
                copied = os.copy_file_range(source.fileno(), fd, size - offset, offset)
                if copied == 0:
                    raise SnapshotError(f"{saved} ended early")
                offset += copied


def restore(
    conn: libvirt.virConnect, snapshot: Snapshot, domain: libvirt.virDomain, scratch: Path
) -> None:
    """Start the defined, inactive ``domain`` from ``snapshot``'s memory: its own XML (its
    name, UUID, overlay, MAC) in a retargeted copy of the saved image at ``scratch``,
    deleted once read."""
    xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    try:
        retarget(snapshot.memory, scratch, xml)
        conn.restoreFlags(str(scratch), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
    finally:
        scratch.unlink(missing_ok=True)
