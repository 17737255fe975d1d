"""Sandbox templates: one folder each. A template says what its machines contain.

``packages`` lists the Debian packages of the root filesystem; ``python-packages`` the
Python distributions the guest needs beyond Debian's (copied from the backend's own
environment, as the guest's python3 is Debian's 3.11 like the backend's); ``Dockerfile``
layers both and the guest agent on it for the Docker provider (mock mode). VM providers
read the same folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

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
