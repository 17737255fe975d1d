"""What the image builders write is readable inside the machine whatever the builder's umask:
Berth's processes run with 077, and an image built under it had /etc/passwd,
/etc/berth-template and /opt/berth at 0600/0700, so steps (the user berth) could not read them."""

from __future__ import annotations

import importlib.metadata
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxes.rootfs import copy_site, public


@pytest.fixture
def private_umask() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def modes(top: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in (top, *top.rglob("*"))}


def test_copied_packages_are_readable_by_everyone(private_umask: None, tmp_path: Path) -> None:
    copy_site([importlib.metadata.distribution("iniconfig")], tmp_path / "site")
    assert modes(tmp_path / "site") <= {0o755, 0o644}
    assert (tmp_path / "site" / "iniconfig" / "__init__.py").stat().st_mode & 0o004


def test_written_files_and_folders_become_public(private_umask: None, tmp_path: Path) -> None:
    tree = tmp_path / "opt" / "berth"
    (tree / "acpi").mkdir(parents=True)
    (tree / "rc").write_text("#!/bin/sh\n")
    (tree / "rc").chmod(0o700)
    (tmp_path / "berth-template").write_text("default\n")
    public(tree, tmp_path / "berth-template")
    assert stat.S_IMODE(tree.stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "acpi").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "rc").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "berth-template").stat().st_mode) == 0o644
