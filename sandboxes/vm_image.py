"""A template's VM image: a base qcow2 disk, a kernel and an initramfs.

The disk is the template's debootstrap root (the same tree as its Docker image) plus the
guest agent, busybox and a tiny init (vm_templates/guest): busybox init mounts what is needed
and starts the agent, with no service manager and no network wait. The kernel is Debian's
cloud kernel, whose virtio drivers are modules: the initramfs (busybox too) loads them,
configures the network and switches to the disk.

Nothing of a VM's identity is in the image. Each domain gets a small read-only "seed" disk of
``KEY=VALUE`` lines (sandbox id, token, gateway URL, its address): unlike the kernel command
line, it never shows in the host's process list, and it is deleted with the VM.

Images are cached under the data dir by a hash of the template, the guest files, the guest
agent's code and the kernel's version; a build writes a draft and renames it when complete.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import guest_agent
import vm_templates
from guest_agent.user import STEP_UID, STEP_USER, WORKSPACE, WORKSPACE_MODE
from sandboxes.rootfs import copy_site, public, rootfs, site_packages, versions

GUEST_FILES = vm_templates.ROOT / "guest"
BUSYBOX = Path("/bin/busybox")
# The initramfs loads these (and what they depend on), in this order: virtio_console for the
# identity port of VMs restored from a snapshot (guest_agent/identity.py); the balloon
# reports the pages the guest frees to the host, which takes them back (domain.xml.j2).
MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_balloon", "button", "evdev",
)  # fmt: skip
PROBE_MARKER = "berth-probe-booted"
# Seed values are sourced by the guest's shell: only characters that need no quoting.
SEED_VALUE = re.compile(r"[A-Za-z0-9._:/@%+=,-]*")
SEED_SIZE = 4096


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path


@dataclass(frozen=True)
class Image:
    """A built template image; every path is read-only once built."""

    template: str
    disk: Path
    kernel: Path
    initrd: Path


def host_kernel() -> Kernel:
    """The newest Debian cloud kernel installed on the host (package linux-image-cloud-amd64)."""
    found = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    if not found:
        raise ImageError("no cloud kernel in /boot: run `make setup` (linux-image-cloud-amd64)")
    vmlinuz = found[-1]
    version = vmlinuz.name.removeprefix("vmlinuz-")
    return Kernel(version, vmlinuz, Path("/lib/modules") / version)


# --- initramfs: a gzip'd "newc" cpio archive, written here so no cpio tool is needed ---


class Cpio:
    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        header = "070701" + "".join(f"{value:08x}" for value in fields)
        self._out.write(header.encode() + name.encode() + b"\0")
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def gzipped(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self._out.getvalue(), compresslevel=6)


def _busybox_cpio(init: bytes) -> Cpio:
    if not BUSYBOX.exists():
        raise ImageError("no /bin/busybox: run `make setup` (busybox-static)")
    archive = Cpio()
    for name in ("bin", "dev", "proc", "sys", "modules"):
        archive.directory(name)
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.file("init", init, 0o755)
    return archive


def probe_initramfs() -> bytes:
    """An initramfs that prints PROBE_MARKER and powers off: does a kernel boot at all?"""
    init = f"#!/bin/busybox sh\n/bin/busybox echo {PROBE_MARKER}\n/bin/busybox poweroff -f\n"
    return _busybox_cpio(init.encode()).gzipped()


def _module_order(kernel: Kernel) -> list[str]:
    """MODULES with their dependencies first, as paths relative to the modules' tree."""
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, needs = line.partition(":")
        deps[path] = needs.split()
    by_name = {Path(path).name.split(".ko")[0].replace("-", "_"): path for path in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path not in order:
            for need in reversed(deps[path]):  # modules.dep lists the deepest last
                visit(need)
            order.append(path)

    for name in MODULES:
        visit(by_name[name])
    return order


def initramfs(kernel: Kernel) -> bytes:
    archive = _busybox_cpio((GUEST_FILES / "init").read_bytes())
    order = _module_order(kernel)
    for path in order:
        archive.file(f"modules/{Path(path).name}", (kernel.modules / path).read_bytes())
    archive.file("modules.order", "\n".join(Path(p).name for p in order).encode())
    return archive.gzipped()


def overlay(base: Path, path: Path) -> None:
    """A qcow2 disk at ``path`` whose reads fall through to ``base`` until written."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(path)],
        check=True,
        capture_output=True,
    )


# --- the seed disk ---


def write_seed(path: Path, values: dict[str, str]) -> None:
    """A raw disk image holding ``values`` as KEY=VALUE lines, readable only by its owner."""
    for key, value in values.items():
        if not SEED_VALUE.fullmatch(value):
            raise ValueError(f"seed value of {key} has characters the guest would misread")
    text = "".join(f"{key}={value}\n" for key, value in values.items()).encode()
    if len(text) > SEED_SIZE:
        raise ValueError("seed values too long")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(text.ljust(SEED_SIZE, b"\0"))


# --- the image ---


def image_key(template: str, kernel: Kernel) -> str:
    digest = vm_templates.fingerprint(
        vm_templates.path(template),
        GUEST_FILES,
        Path(guest_agent.__file__).parent,
        Path(__file__),
        extra=versions(site_packages(template)),
    )
    return hashlib.sha256(f"{digest}:{kernel.version}".encode()).hexdigest()[:12]


def image_dir(images: Path, template: str, kernel: Kernel) -> Path:
    return images / f"{template}-{image_key(template, kernel)}"


def cached_image(images: Path, template: str) -> Image | None:
    folder = image_dir(images, template, host_kernel())
    return _image(template, folder) if folder.is_dir() else None


def _image(template: str, folder: Path) -> Image:
    return Image(template, folder / "base.qcow2", folder / "vmlinuz", folder / "initrd.img")


def _step(message: str) -> None:
    print(f"  {message}", flush=True)


def _guest_tree(root: Path, stage: Path, template: str) -> None:
    """``stage`` = ``root`` (hard links: nothing of it is written) plus Berth's guest files."""
    subprocess.run(["cp", "-al", f"{root}/.", str(stage)], check=True)
    opt = stage / "opt" / "berth"
    opt.mkdir(parents=True)
    shutil.copytree(
        Path(guest_agent.__file__).parent,
        opt / "guest_agent",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    # The template's Python packages (Playwright), on the agent's PYTHONPATH (guest/agent).
    copy_site(site_packages(template), opt / "site")
    shutil.copy(BUSYBOX, opt / "busybox")
    for name in ("rc", "agent"):
        shutil.copy(GUEST_FILES / name, opt / name)
        (opt / name).chmod(0o755)
    power = opt / "acpi" / "PWRF" / "00000080"
    power.parent.mkdir(parents=True)
    shutil.copy(GUEST_FILES / "power-button", power)
    power.chmod(0o755)
    for name, text in (
        ("inittab", (GUEST_FILES / "inittab").read_text()),
        ("hostname", "berth\n"),
        ("resolv.conf", ""),
        ("fstab", ""),
    ):
        target = stage / "etc" / name
        target.unlink(missing_ok=True)  # a hard link into the shared tree: replace, not write
        target.write_text(text)
    (stage / "etc" / "berth-template").write_text(f"{template}\n")
    # The user steps run as (guest_agent/user.py), as in the Docker image.
    for name, line in (
        ("passwd", f"{STEP_USER}:x:{STEP_UID}:{STEP_UID}::{WORKSPACE}:/bin/bash\n"),
        ("group", f"{STEP_USER}:x:{STEP_UID}:\n"),
    ):
        target = stage / "etc" / name
        text = target.read_text() + line
        target.unlink()
        target.write_text(text)
    etc = stage / "etc"
    written = ("inittab", "hostname", "resolv.conf", "fstab", "berth-template", "passwd", "group")
    public(opt, *(etc / name for name in written))
    home = stage / WORKSPACE.lstrip("/")
    home.mkdir()
    home.chmod(WORKSPACE_MODE)
    os.chown(home, STEP_UID, STEP_UID)


def build_image(images: Path, template: str, mirror: str, build_dir: Path) -> Image:
    """The template's image, built if not cached, with progress on stdout."""
    kernel = host_kernel()
    folder = image_dir(images, template, kernel)
    if folder.is_dir():
        return _image(template, folder)
    spec = vm_templates.spec(template)
    started = time.monotonic()
    print(f"building VM image {folder.name} (template {template!r})", flush=True)
    root = rootfs(template, mirror, build_dir)
    images.mkdir(parents=True, exist_ok=True)
    draft = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=images))
    stage = Path(tempfile.mkdtemp(prefix="stage-", dir=build_dir))
    try:
        _step("root filesystem + guest agent + init")
        _guest_tree(root, stage, template)
        _step(f"ext4 filesystem of {spec.machine.disk_gb} GiB")
        raw = draft / "base.raw"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "berth-root", "-d", str(stage), str(raw),
             f"{spec.machine.disk_gb}G"],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        _step("qcow2 base disk")
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(raw), str(draft / "base.qcow2")],
            check=True,
        )
        raw.unlink()
        _step(f"kernel {kernel.version} and initramfs")
        shutil.copy(kernel.vmlinuz, draft / "vmlinuz")
        (draft / "initrd.img").write_bytes(initramfs(kernel))
        (draft / "image.json").write_text(
            json.dumps({"template": template, "kernel": kernel.version, "spec": spec.model_dump()})
        )
        for path in draft.iterdir():
            path.chmod(0o444)  # QEMU (an unprivileged user) reads them; nothing writes them
        draft.chmod(0o755)
        with contextlib.suppress(OSError):
            os.rename(draft, folder)  # a concurrent build's complete image wins
    finally:
        shutil.rmtree(draft, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
    print(f"VM image {folder.name} built in {time.monotonic() - started:.0f} s", flush=True)
    return _image(template, folder)
