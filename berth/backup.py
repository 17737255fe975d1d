"""Backups of an install: ``python -m berth backup DEST`` and ``python -m berth restore SRC``.

A backup is a folder: the embedded Temporal server's database, the app database (SQLite's
online backup API, or ``pg_dump`` for PostgreSQL), the artifacts, the index of the kept disks
(which sandbox's disk, whose session, where on which host: the disks themselves are large and
stay on their hosts), the generated secrets (without the payload secret, Temporal's histories
cannot be read), and a manifest saying what is in it. Both databases are copied while the
system runs, each consistent in itself.

The order makes the two agree as far as they can: Temporal first, then the app database.
Every workflow in the backup had its session row written before it started, so none is
without a row; a session started after Temporal's copy has a row and no workflow, and the
sweeper (workflows/sweeper.py) ends it on the restored system, with the reason. Artifacts
are copied last: each artifact row then has its file (files are written before their rows;
one newer than the database is only an unlisted file).

``restore`` writes into a fresh data dir only (an empty or missing folder) and never into a
database that has tables: it refuses rather than merge two installs. Then, with the embedded
Temporal, it ends every session that was live in the backup: its machine stayed with the old
install (and the backup's picture of its workflow is older than the machine's last state), so
it is neither resumed half-way nor left live. It starts the restored Temporal server on a
loopback port of its own, terminates each such workflow with the reason, and closes its row
through the event log (``session.status`` ended, with the reason), as the sweeper closes a row
whose workflow is gone; a row whose workflow the backup lacks is closed the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL, make_url
from sqlmodel import Session, col, delete, select
from temporalio.service import RPCError, RPCStatusCode

from berth.run import wait_for_port
from config.keys import LEGACY_SECRET_FILE
from config.settings import Settings
from store import events
from store.models import HostRow, SandboxRow, SessionRow, SessionStatus, StreamLease
from workflows import search, sweeper
from workflows.client import connect, workflow_id

FORMAT = 1
MANIFEST = "manifest.json"
TEMPORAL_DB = "temporal.db"
APP_SQLITE = "berth.db"
APP_PGDUMP = "berth.pgdump"
ARTIFACTS = "artifacts"
KEPT_INDEX = "kept-disks.json"
# The secrets Berth generates when none is set (config/keys.py), by the folder they live in:
# the data dir holds root's (the worker's), the shared folder the API's.
SECRETS = {
    "data": ("guest_token_secret", LEGACY_SECRET_FILE),
    "shared": ("user_token_secret", "payload_secret"),
}


class BackupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Report:
    folder: Path
    manifest: dict[str, object]
    ended: tuple[str, ...] = ()  # sessions the restore ended (live in the backup)


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (its WAL included), through the online
    backup API: writers carry on meanwhile."""
    src = sqlite3.connect(source, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """The SQLAlchemy URL as libpq takes it (no ``+driver``) without its password, and the
    environment for pg_dump/pg_restore that carries the password instead: a command line is
    readable by every user of the host (``ps``), an environment by its owner only."""
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    bare = URL.create(
        "postgresql", parsed.username, None, parsed.host, parsed.port, parsed.database,
        parsed.query,
    )  # fmt: skip
    return bare.render_as_string(hide_password=False), env


def _folders(settings: Settings) -> dict[str, Path]:
    return {"data": settings.data_dir, "shared": settings.shared_dir}


def _kept_index(url: str) -> list[dict[str, object]]:
    """The kept disks as the copied database has them."""
    engine = create_engine(url)
    try:
        with Session(engine) as db:
            rows = db.exec(
                select(SandboxRow, SessionRow.user_id)
                .join(SessionRow, col(SessionRow.id) == col(SandboxRow.session_id))
                .where(SandboxRow.status == "preserved")
            ).all()
            return [
                {
                    "sandbox_id": sandbox.id,
                    "session_id": sandbox.session_id,
                    "user_id": user_id,
                    "provider": sandbox.provider,
                    "host_id": sandbox.host_id,
                    "bytes": sandbox.kept_bytes,
                }
                for sandbox, user_id in rows
            ]
    finally:
        engine.dispose()


def backup(settings: Settings, dest: Path) -> Report:
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: a backup goes into a new folder")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Also an empty folder made beforehand (mkdir's mode is not applied to it): the backup
    # holds the secrets and the database, its owner's alone.
    os.chmod(dest, 0o700)
    manifest: dict[str, object] = {
        "format": FORMAT,
        "started_at": datetime.now(UTC).isoformat(),
        "host_id": settings.host_id,
    }
    # 1. Temporal's database, when Berth runs the server (a cluster is backed up as a cluster).
    temporal = settings.shared_dir / TEMPORAL_DB
    if settings.temporal_address is None and temporal.exists():
        _sqlite_copy(temporal, dest / TEMPORAL_DB)
        manifest["temporal"] = TEMPORAL_DB
    # 2. The app database.
    url = settings.db_url
    if make_url(url).get_backend_name() == "sqlite":
        _sqlite_copy(Path(str(make_url(url).database)), dest / APP_SQLITE)
        manifest["database"] = APP_SQLITE
        copied = f"sqlite:///{(dest / APP_SQLITE).resolve()}"
        manifest["kept_disks"] = _kept_index(copied)
    else:
        # One transaction's snapshot; custom format, so pg_restore can take it apart.
        dsn, env = _libpq(url)
        subprocess.run(
            ["pg_dump", "--format=custom", "--no-owner", "--file", str(dest / APP_PGDUMP),
             "--dbname", dsn],
            check=True, env=env,
        )  # fmt: skip
        manifest["database"] = APP_PGDUMP
        # Read from the live database just after its dump: a disk kept in between is listed
        # and not in the dump, which is the safe side (an unknown folder, not a lost one).
        manifest["kept_disks"] = _kept_index(url)
    (dest / KEPT_INDEX).write_text(json.dumps(manifest["kept_disks"], indent=2) + "\n")
    # 3. Artifacts.
    if settings.artifacts_dir.is_dir():
        shutil.copytree(settings.artifacts_dir, dest / ARTIFACTS)
        manifest["artifacts"] = sum(1 for p in (dest / ARTIFACTS).rglob("*") if p.is_file())
    # 4. Generated secrets (set ones live in the operator's configuration, not here).
    secrets: list[str] = []
    for where, names in SECRETS.items():
        for name in names:
            found = _folders(settings)[where] / name
            if found.is_file():
                (dest / "secrets" / where).mkdir(mode=0o700, parents=True, exist_ok=True)
                shutil.copy2(found, dest / "secrets" / where / name)
                secrets.append(f"{where}/{name}")
    manifest["secrets"] = secrets
    manifest["finished_at"] = datetime.now(UTC).isoformat()
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Report(dest, manifest)


def restore(settings: Settings, src: Path) -> Report:
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{src} is not a Berth backup (no {MANIFEST})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"backup format {manifest.get('format')} is not {FORMAT}")
    data = settings.data_dir
    if data.exists() and any(data.iterdir()):
        raise BackupError(f"{data} is not empty: restore into a fresh data dir")
    url = settings.db_url
    sqlite = make_url(url).get_backend_name() == "sqlite"
    if sqlite != (manifest["database"] == APP_SQLITE):
        raise BackupError(
            f"the backup's database is {manifest['database']}; BERTH_DATABASE_URL is "
            f"{'SQLite' if sqlite else 'PostgreSQL'}: restore into the same kind"
        )
    if not sqlite:
        engine = create_engine(url)
        try:
            tables = inspect(engine).get_table_names()
        finally:
            engine.dispose()
        if tables:
            raise BackupError("the database of BERTH_DATABASE_URL has tables: give an empty one")
    settings.shared_dir.mkdir(mode=0o700, parents=True)
    os.chmod(data, 0o700)
    if manifest.get("temporal"):
        shutil.copy2(src / TEMPORAL_DB, settings.shared_dir / TEMPORAL_DB)
    if sqlite:
        shutil.copy2(src / APP_SQLITE, Path(str(make_url(url).database)))
    else:
        dsn, env = _libpq(url)
        subprocess.run(
            ["pg_restore", "--no-owner", "--exit-on-error", "--dbname", dsn,
             str(src / APP_PGDUMP)],
            check=True, env=env,
        )  # fmt: skip
    if (src / ARTIFACTS).is_dir():
        shutil.copytree(src / ARTIFACTS, settings.artifacts_dir)
    folders = _folders(settings)
    for secret in manifest["secrets"]:
        where, name = secret.split("/")
        shutil.copy2(src / "secrets" / where / name, folders[where] / name)
        os.chmod(folders[where] / name, 0o600)
    _forget_live_state(settings)
    ended: tuple[str, ...] = ()
    if manifest.get("temporal") and settings.temporal_address is None:
        reason = (
            f"restored from a backup of {manifest['started_at']}: its machine stayed with "
            "the install the backup was taken from"
        )
        ended = _end_live_sessions(settings, reason)
    return Report(src, manifest, ended)


def _forget_live_state(settings: Settings) -> None:
    """The host registry and the open streams are what was running then, not data: a host
    the backup knew would be placed sessions on (it is not this install's) until it read
    lost. Each host registers again when its worker starts."""
    engine = create_engine(settings.db_url)
    try:
        with Session(engine) as db:
            db.exec(delete(HostRow))
            db.exec(delete(StreamLease))
            db.commit()
    finally:
        engine.dispose()


def _live_sessions(settings: Settings) -> list[str]:
    engine = create_engine(settings.db_url)
    try:
        with Session(engine) as db:
            live = select(SessionRow.id).where(
                col(SessionRow.status).not_in(list(events.FINAL_STATUSES))
            )
            return list(db.exec(live).all())
    finally:
        engine.dispose()


def _end_live_sessions(settings: Settings, reason: str) -> tuple[str, ...]:
    """End the sessions live in the restored database, their workflows in the restored
    Temporal database first (with the embedded server, started here for the purpose)."""
    live = _live_sessions(settings)
    if not live:
        return ()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "temporal"), "server", "start-dev", "--headless",
         "--db-filename", str((settings.shared_dir / TEMPORAL_DB).resolve()),
         "--ip", "127.0.0.1", "--port", str(port), "--log-level", "error",
         *search.dev_server_flags()],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port("temporal", "127.0.0.1", port, server, timeout_s=60)
        local = settings.model_copy(update={"temporal_address": f"127.0.0.1:{port}"})
        asyncio.run(_terminate(local, live, reason))
    finally:
        server.terminate()
        server.wait(30)
    engine = create_engine(settings.db_url)
    try:
        with Session(engine) as db:
            for session_id in live:
                sweeper.close_row(db, session_id, sweeper.Outcome(SessionStatus.ended, reason))
    finally:
        engine.dispose()
    return tuple(live)


async def _terminate(settings: Settings, sessions: list[str], reason: str) -> None:
    client = await connect(settings)
    for session_id in sessions:
        try:
            await client.get_workflow_handle(workflow_id(session_id)).terminate(reason=reason)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:  # the backup lacks it: nothing to end
                raise
