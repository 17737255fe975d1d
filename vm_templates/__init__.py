"""Sandbox templates: one folder each. A template says what its machines contain.

``packages`` lists the Debian packages of the root filesystem; ``Dockerfile`` layers the
guest agent on it for the Docker provider (mock mode); ``template.toml`` sizes its VMs and
sets their limits and network policy (libvirt provider). ``guest/`` holds the VMs' init.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).parent
DEFAULT = "default"


def names() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "packages").is_file())


def path(name: str) -> Path:
    if name not in names():
        raise KeyError(f"no sandbox template {name!r}; known: {', '.join(names())}")
    return ROOT / name


def packages(name: str) -> list[str]:
    text = (path(name) / "packages").read_text()
    return [word for line in text.splitlines() for word in line.split("#", 1)[0].split()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MachineSpec(_Strict):
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mb: int = Field(default=512, ge=128)
    disk_gb: int = Field(default=4, ge=1)


class LimitsSpec(_Strict):
    cpu_percent: int = Field(default=100, ge=1, le=100)
    disk_read_bytes_per_s: int = Field(default=0, ge=0)
    disk_write_bytes_per_s: int = Field(default=0, ge=0)
    disk_iops: int = Field(default=0, ge=0)
    net_kib_per_s: int = Field(default=0, ge=0)


class NetworkSpec(_Strict):
    egress: Literal["public", "gateway"] = "public"


class TemplateSpec(_Strict):
    machine: MachineSpec = MachineSpec()
    limits: LimitsSpec = LimitsSpec()
    network: NetworkSpec = NetworkSpec()


def spec(name: str) -> TemplateSpec:
    """The template's VM spec; defaults where it has no template.toml."""
    file = path(name) / "template.toml"
    if not file.is_file():
        return TemplateSpec()
    return TemplateSpec.model_validate(tomllib.loads(file.read_text()))


def fingerprint(*paths: Path) -> str:
    """A short hash of files' names and contents, for image tags that change with them."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]
