"""The workspace's files, the whole way from the API's side (api/files.py) through the
worker's relay and the gateway to a real guest agent on loopback (no machine: the agent
works in a temporary folder as itself)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from api import files
from api.deps import Problem
from config.keys import relay_token
from config.settings import Settings
from sandboxes.relay import Relay
from tests.guest_agent.test_agent import guest_link
from tests.support.local import free_port


@contextlib.asynccontextmanager
async def relayed(tmp_path: Path) -> AsyncIterator[tuple[Settings, str, Path]]:
    """Settings that reach a relay in front of a guest serving ``workspace``."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    settings = Settings(data_dir=tmp_path / "data", relay_port=free_port(), _env_file=None)
    async with guest_link(workspace) as link:
        await link.gateway.wait_connected(link.sandbox_id, 5)
        relay = Relay(link.gateway, relay_token(settings))
        await relay.start("127.0.0.1", settings.relay_port)
        try:
            yield settings, link.sandbox_id, workspace
        finally:
            await relay.stop()


async def body(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def read_all(settings: Settings, sandbox: str, path: str) -> bytes:
    return b"".join([chunk async for chunk in files.read(settings, sandbox, path)])


async def test_upload_list_download_delete(tmp_path: Path) -> None:
    async with relayed(tmp_path) as (settings, sandbox, workspace):
        big = os.urandom(700 * 1024)  # several data frames each way
        assert await files.write(
            settings, sandbox, "in/data.bin", body(big[:1000], big[1000:])
        ) == len(big)
        assert (workspace / "in" / "data.bin").read_bytes() == big
        top = await files.listing(settings, sandbox, ".")
        assert [(e.name, e.kind) for e in top.entries] == [("in", "dir")]
        inner = await files.listing(settings, sandbox, "in")
        assert [(e.name, e.size) for e in inner.entries] == [("data.bin", len(big))]
        assert await read_all(settings, sandbox, "in/data.bin") == big
        (workspace / "in" / "note.txt").write_text("hello")
        spool = await files.archive(settings, sandbox, "in")
        with zipfile.ZipFile(io.BytesIO(spool.read())) as zipped:
            assert sorted(zipped.namelist()) == ["data.bin", "note.txt"]
            assert zipped.read("data.bin") == big
        await files.delete(settings, sandbox, "in")
        assert not (workspace / "in").exists()


async def test_paths_outside_the_workspace_are_refused(tmp_path: Path) -> None:
    async with relayed(tmp_path) as (settings, sandbox, workspace):
        (tmp_path / "secret").write_text("no")
        (workspace / "escape").symlink_to(tmp_path / "secret")
        for attempt in ("../secret", "/etc/passwd", "escape"):
            with pytest.raises(Problem) as refused:
                await read_all(settings, sandbox, attempt)
            assert refused.value.status == 403, attempt
            assert "outside the workspace" in refused.value.detail
        with pytest.raises(Problem) as refused:
            await files.write(settings, sandbox, "../planted", body(b"x"))
        assert refused.value.status == 403
        assert not (tmp_path / "planted").exists()
        with pytest.raises(Problem) as refused:
            await files.delete(settings, sandbox, ".")
        assert refused.value.status == 403
        with pytest.raises(Problem) as missing:
            await files.listing(settings, sandbox, "nothing-here")
        assert missing.value.status == 404


async def test_an_oversize_upload_leaves_nothing(tmp_path: Path) -> None:
    async with relayed(tmp_path) as (settings, sandbox, workspace):
        settings.files_max_upload_bytes = 1000
        (workspace / "kept.txt").write_text("before")
        with pytest.raises(Problem) as refused:
            await files.write(settings, sandbox, "kept.txt", body(b"a" * 600, b"b" * 600))
        assert refused.value.status == 413
        assert "BERTH_FILES_MAX_UPLOAD_BYTES" in refused.value.detail
        for _ in range(50):  # the guest drops its draft once the relay tells it
            if [p.name for p in workspace.iterdir()] == ["kept.txt"]:
                break
            await asyncio.sleep(0.05)
        assert [p.name for p in workspace.iterdir()] == ["kept.txt"]
        assert (workspace / "kept.txt").read_text() == "before"


async def test_the_relay_refuses_a_wrong_token(tmp_path: Path) -> None:
    async with relayed(tmp_path) as (settings, sandbox, _workspace):
        wrong = Settings(
            data_dir=tmp_path / "other", relay_port=settings.relay_port, _env_file=None
        )
        with pytest.raises(Problem) as refused:
            await files.listing(wrong, sandbox, ".")
        assert refused.value.status == 503
