"""A template's root filesystem, debootstrapped once per package list.

The Docker image (mock mode) and the VM disk image both start from this tree, so one
template spec gives both the same system.
"""

from __future__ import annotations

import contextlib
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
