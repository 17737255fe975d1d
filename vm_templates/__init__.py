"""Sandbox templates: one folder each. A template says what its machines contain.

``packages`` lists the Debian packages of the root filesystem; ``python-packages`` the
Python distributions the guest needs beyond Debian's (copied from the backend's own
environment, as the guest's python3 is Debian's 3.11 like the backend's); ``Dockerfile``
layers both and the guest agent on it for the Docker provider (mock mode); ``template.toml``
sizes its VMs and sets their limits and network policy (libvirt provider). ``guest/`` holds
the VMs' init.
"""

from __future__ import annotations

import hashlib
import tomllib
from ipaddress import IPv4Network
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ROOT = Path(__file__).parent
DEFAULT = "default"


def names() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "packages").is_file())


def path(name: str) -> Path:
    if name not in names():
        raise KeyError(f"no sandbox template {name!r}; known: {', '.join(names())}")
    return ROOT / name


def packages(name: str) -> list[str]:
    return _words(path(name) / "packages")


def python_packages(name: str) -> list[str]:
    listed = path(name) / "python-packages"
    return _words(listed) if listed.is_file() else []


def _words(listed: Path) -> list[str]:
    text = listed.read_text()
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
    """Where a guest may connect beyond the guest gateway (always allowed): any public
    address and the host's DNS ("public"), nowhere ("gateway"), or only the networks of
    ``allow`` ("allow")."""

    egress: Literal["public", "gateway", "allow"] = "public"
    allow: list[IPv4Network] = Field(default_factory=list)

    @model_validator(mode="after")
    def _allow_list_goes_with_allow(self) -> NetworkSpec:
        if bool(self.allow) != (self.egress == "allow"):
            raise ValueError('`allow` (a list of networks) goes with egress = "allow" only')
        return self


class TerminalSpec(_Strict):
    """A person's interactive shell on the dashboard. ``obeys_policy``: each line is judged
    by the command policy before it runs (refused lines are dropped); by default the person
    is trusted with their own machine. Either way every line goes to the audit log."""

    obeys_policy: bool = False


class TemplateSpec(_Strict):
    machine: MachineSpec = MachineSpec()
    limits: LimitsSpec = LimitsSpec()
    network: NetworkSpec = NetworkSpec()
    terminal: TerminalSpec = TerminalSpec()


def spec(name: str) -> TemplateSpec:
    """The template's VM spec; defaults where it has no template.toml."""
    file = path(name) / "template.toml"
    if not file.is_file():
        return TemplateSpec()
    return TemplateSpec.model_validate(tomllib.loads(file.read_text()))


def fingerprint(*paths: Path, extra: str = "") -> str:
    """A short hash of files' names and contents (and ``extra``), for image tags that change
    with them."""
    digest = hashlib.sha256(extra.encode())
    for root in paths:
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]
