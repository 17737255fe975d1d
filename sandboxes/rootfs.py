"""A template's root filesystem, debootstrapped once per package list.

The Docker image (mock mode) and the VM disk image both start from this tree, so one
template spec gives both the same system.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import vm_templates

log = logging.getLogger("berth.rootfs")


class RootfsError(RuntimeError):
    pass


def rootfs(template: str, mirror: str, build_dir: Path) -> Path:
    """The template's root filesystem tree under ``build_dir``, built if missing (~1-2 min)."""
    packages_file = vm_templates.path(template) / "packages"
    dest = build_dir / "rootfs" / f"{template}-{vm_templates.fingerprint(packages_file)}"
    if dest.is_dir():
        return dest
    if shutil.which("debootstrap") is None:
        raise RootfsError("debootstrap is not installed: run `make setup`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    draft = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        print(f"debootstrap of template {template!r} (a minute or two)", flush=True)
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(vm_templates.packages(template)),
                "bookworm",
                str(draft),
                mirror,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # Complete trees only ever appear under the final name; a concurrent build's wins.
        with contextlib.suppress(OSError):
            os.rename(draft, dest)
    finally:
        shutil.rmtree(draft, ignore_errors=True)
    return dest


def site_packages(template: str) -> list[importlib.metadata.Distribution]:
    """The template's Python packages (its ``python-packages``: Playwright, for browser
    steps), as installed in this virtualenv: both images take them from here."""
    found = []
    for name in vm_templates.python_packages(template):
        try:
            found.append(importlib.metadata.distribution(name))
        except importlib.metadata.PackageNotFoundError:
            raise RootfsError(
                f"Python package {name} (for the sandbox image) is not installed: run `make setup`"
            ) from None
    return found


def versions(site: list[importlib.metadata.Distribution]) -> str:
    """What an image's cache key says of its Python packages."""
    return " ".join(f"{d.metadata['Name']}=={d.version}" for d in site)


def public(*paths: Path) -> None:
    """Make what the image builder wrote readable inside the machine whatever the builder's
    umask (Berth's processes run with 077): folders 0755, files 0644, or 0755 where the
    owner may run them. Applied to trees as well as files."""
    for top in paths:
        for path in (top, *top.rglob("*")) if top.is_dir() else (top,):
            if path.is_symlink():
                continue
            if path.is_dir():
                path.chmod(0o755)
            else:
                path.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)


def copy_site(site: list[importlib.metadata.Distribution], target: Path) -> None:
    """Copy installed distributions' files, as laid out in site-packages, into ``target``
    (scripts installed elsewhere and bytecode caches left out)."""
    target.mkdir()
    for distribution in site:
        for file in distribution.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue
            destination = target / file
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(str(distribution.locate_file(file))), destination)
    public(target)
