"""`make run` as root, with a TLS certificate: the API and Temporal run as an unprivileged
user, the worker as root; the API speaks HTTPS only, with HSTS and Secure cookies."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from berth.privileges import interpreter, settle_layout
from config.settings import Settings
from sandboxes.gateway_tls import self_signed
from tests.support.local import LocalSystem, reachable_by_others


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[1])  # the real uid; effective and saved follow it


def pid_of(system: LocalSystem, name: str) -> int:
    return int((system.data / "run" / f"{name}.pid").read_text())


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    secrets = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(["127.0.0.1"])
    (secrets / "api.crt").write_bytes(cert)
    (secrets / "api.key").write_bytes(key)
    (secrets / "api.key").chmod(0o600)  # root's: the API's user gets a copy of its own
    env = {
        "BERTH_TLS_CERT_FILE": str(secrets / "api.crt"),
        "BERTH_TLS_KEY_FILE": str(secrets / "api.key"),
    }
    running = LocalSystem.start(tmp_path_factory.mktemp("privileges"), "priv", env=env)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.e2e
def test_api_and_temporal_run_unprivileged_and_the_worker_as_root(system: LocalSystem) -> None:
    if os.geteuid() != 0:
        pytest.skip("root drops to the API's user only when it has root to drop")
    if not all(reachable_by_others(folder) for folder in interpreter()):
        pytest.skip(f"no other user can run this Python ({interpreter()[1]})")
    assert uid_of(pid_of(system, "api")) != 0
    assert uid_of(pid_of(system, "temporal")) != 0
    assert uid_of(pid_of(system, "api")) == uid_of(pid_of(system, "temporal"))
    assert uid_of(pid_of(system, "worker")) == 0  # Docker, libvirt, iptables
    # The secrets the API needs are its own, in the one folder it owns; the data dir and
    # the guest token secret stay root's.
    api_uid = uid_of(pid_of(system, "api"))
    assert (system.data / "shared" / "payload_secret").stat().st_uid == api_uid
    assert (system.data / "shared" / "berth.db").stat().st_uid == api_uid
    assert (system.data / "guest_token_secret").stat().st_uid == 0
    assert system.data.stat().st_uid == 0 and system.data.stat().st_mode & 0o777 == 0o711


@pytest.mark.e2e
def test_the_api_speaks_https_with_hsts_and_secure_cookies(system: LocalSystem) -> None:
    assert system.base.startswith("https://")
    with httpx.Client(base_url=system.base, verify=system.verify) as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.headers["strict-transport-security"].startswith("max-age=")
        login = client.get("/login")
        assert login.status_code == 200
        assert "secure" in login.headers["set-cookie"].lower()
    # No plain HTTP on the port, and no trust without the certificate.
    with pytest.raises(httpx.HTTPError):
        httpx.get(system.base.replace("https://", "http://") + "/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{system.base}/healthz", timeout=5, verify=ssl.create_default_context())


def test_a_data_dir_of_an_earlier_layout_is_moved_into_the_shared_folder(tmp_path: Path) -> None:
    for name in ("berth.db", "berth.db-wal", "temporal.db", "payload_secret"):
        (tmp_path / name).write_text(name)
    (tmp_path / "artifacts" / "s1").mkdir(parents=True)
    (tmp_path / "guest_token_secret").write_text("root's")
    settings = Settings(data_dir=tmp_path)
    settle_layout(settings)
    shared = settings.shared_dir
    assert sorted(p.name for p in shared.iterdir()) == [
        "artifacts", "berth.db", "berth.db-wal", "payload_secret", "temporal.db",
    ]  # fmt: skip
    assert (shared / "artifacts" / "s1").is_dir()
    assert (shared / "berth.db").read_text() == "berth.db"
    assert (tmp_path / "guest_token_secret").exists()  # root's stays where it was
    settle_layout(settings)  # again: nothing left to move, nothing replaced
    assert (shared / "payload_secret").read_text() == "payload_secret"
