"""How a machine restored from a memory snapshot learns who it is.

A template's snapshot (sandboxes/snapshots.py) is taken of a VM whose agent has loaded its
code and then stopped here, at the "snapshot point", before it had any identity: no token,
no address, no sandbox id. Every VM restored from that memory image wakes up at the same
point, so nothing of an earlier VM's identity can leak into it, and it waits for its own.

The identity comes over a virtio-serial port (``PORT_NAME``), not the network or a disk:
the port is a device of the saved machine, so it exists again in every restored one; the
host opens it only after the restore, so the message is sent at the moment the VM runs
(its clock set within milliseconds of the host's); and nothing else in the guest can write
to it (root only). The network cannot carry it (the guest has no address yet, and its old
MAC is the snapshot's, shared by every restore), and a disk the guest read before the save
sits in its page cache, stale.

The exchange: the guest writes ``READY`` (the kernel blocks that write until a host has the
port open), then reads one JSON line: its environment (the seed disk's lines of a booted VM:
sandbox id, gateway URL, address, router, hostname, DNS), its token, its MAC, the host's
time and fresh random bytes. After its first identity the agent keeps waiting on the port
in a thread, so a VM restored from a running machine's memory (a fork) is told a new
identity the same way; that one is applied and the agent exits, to be started again by
init as the new VM (its old link, token and steps are the parent's).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("guest_agent.identity")

PORT_NAME = "org.berth.identity"
READY = b"ready\n"
APPLIED = b"applied\n"
# Set in the seed of the VM a snapshot is taken of: its agent waits at the snapshot point.
SNAPSHOT_VARIABLE = "BERTH_SNAPSHOT"
# Where the VM image keeps busybox (sandboxes/vm_image.py), and the files the VM's rc
# writes at boot (vm_templates/guest/rc): a restored VM's are rewritten here.
BUSYBOX = "/opt/berth/busybox"
ENV_FILE = Path("/run/berth.env")
TOKEN_FILE = Path("/run/berth/token")
RESOLV_CONF = Path("/etc/resolv.conf")
INTERFACE = "eth0"
# linux/random.h: add (and credit) entropy; reseed the kernel's generator from it now.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MAX_MESSAGE = 64 * 1024


def find_port() -> Path | None:
    """The identity port's device, if this machine has one (a VM's; never a container's)."""
    for name in Path("/sys/class/virtio-ports").glob("*/name"):
        try:
            if name.read_text().strip() == PORT_NAME:
                return Path("/dev") / name.parent.name
        except OSError:
            continue
    return None


def _read_line(fd: int) -> bytes | None:
    """One line from the port; None if the host closed it first."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:  # no host on the port (any more)
            return None
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ValueError("identity message too long")
    return data


def receive(port: Path, take: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Say we are ready, wait for the host's message, ``take`` it and say so: blocking, for
    as long as it takes (the VM may be saved and restored meanwhile: the read then ends
    empty, and we ask again). The host sends again until it hears APPLIED: a message sent
    as the restored VM starts may be lost with the port's first connection."""
    fd = os.open(port, os.O_RDWR)
    try:
        while True:
            os.write(fd, READY)  # blocks until a host opens the port
            line = _read_line(fd)
            if line is None:
                time.sleep(0.01)
                continue
            try:
                message: dict[str, Any] = json.loads(line)
            except ValueError:
                log.warning("ignoring a malformed identity message")
                continue
            take(message)
            with contextlib.suppress(OSError):  # the host may have gone meanwhile
                os.write(fd, APPLIED)
            return message
    finally:
        os.close(fd)


def _set_clock(message: dict[str, Any]) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, int(message["time_ns"]))


def apply(message: dict[str, Any]) -> None:
    """Become the VM ``message`` describes: clock first (everything after is timed by it),
    then randomness, network, name, token and environment."""
    _set_clock(message)
    _reseed(bytes.fromhex(message["seed"]))
    env: dict[str, str] = message["env"]
    script = (
        f"{BUSYBOX} ip link set {INTERFACE} down; "
        f"{BUSYBOX} ip link set {INTERFACE} address {message['mac']}; "
        f"{BUSYBOX} ip addr flush dev {INTERFACE}; "
        f"{BUSYBOX} ip addr add {env['BERTH_GUEST_IP']} dev {INTERFACE}; "
        f"{BUSYBOX} ip link set {INTERFACE} up; "
        f"{BUSYBOX} ip route replace default via {env['BERTH_GUEST_ROUTER']}"
    )  # one shell for all: each process costs tens of ms under emulation
    subprocess.run([BUSYBOX, "sh", "-c", script], check=True)
    socket.sethostname(env["BERTH_HOSTNAME"])
    dns = env.get("BERTH_DNS")
    _write(RESOLV_CONF, f"nameserver {dns}\n" if dns else "", 0o644)
    _write(TOKEN_FILE, message["token"] + "\n", 0o400)
    _write(ENV_FILE, "".join(f"{key}={value}\n" for key, value in env.items()), 0o600)
    os.environ.pop(SNAPSHOT_VARIABLE, None)
    os.environ.update(env)


def _reseed(entropy: bytes) -> None:
    """Every restore of one snapshot starts with the same generator state: mix in the
    host's bytes (credited, so the kernel trusts them) and reseed at once, then Python's."""
    with open("/dev/urandom", "wb") as urandom:
        request = struct.pack("ii", 8 * len(entropy), len(entropy)) + entropy
        fcntl.ioctl(urandom, RNDADDENTROPY, request)
        fcntl.ioctl(urandom, RNDRESEEDCRNG)
    random.seed()


def _write(path: Path, text: str, mode: int) -> None:
    draft = path.with_name(f".{path.name}.new")
    draft.unlink(missing_ok=True)
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    draft.replace(path)


def at_snapshot_point() -> None:
    """Wait for this VM's first identity (a snapshot is taken while we wait), and take it."""
    port = find_port()
    if port is None:
        raise SystemExit("guest_agent: snapshot point without an identity port")
    log.info("at the snapshot point")
    receive(port, apply)
    log.info("identity received: %s", os.environ.get("BERTH_SANDBOX_ID"))


def watch_for_new_identity(sandbox_id: str) -> None:
    """In a thread, for the agent's life: a later identity (this machine's memory restored
    as a fork) is applied, then the agent exits so that init starts it again as the new VM."""
    port = find_port()
    if port is None:
        return

    def take(message: dict[str, Any]) -> None:
        if message["env"].get("BERTH_SANDBOX_ID") == sandbox_id:
            _set_clock(message)  # the same VM (woken, rolled back, told twice): its clock
        else:
            apply(message)

    def wait() -> None:
        while True:
            message = receive(port, take)
            if message["env"].get("BERTH_SANDBOX_ID") != sandbox_id:
                break
        log.info("new identity: %s; starting again as it", message["env"]["BERTH_SANDBOX_ID"])
        os._exit(0)

    threading.Thread(target=wait, name="identity", daemon=True).start()
