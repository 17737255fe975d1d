"""Accounts: argon2id hashes that carry their parameters and are raised on login, answers
that do not tell who is registered, counters and lockouts shared by API processes, revocable
tokens kept hashed, admins made from the command line."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from berth.web import create_app
from config.settings import Settings
from store import counters
from store.db import get_engine
from store.models import ApiToken, AuditEntry, Invite, User
from tests.support.local import free_port

PASSWORD = "correct horse battery"
# Cheap hashes for tests that are not about their cost; the parameters live in each hash.
FAST = {"password_time_cost": 1, "password_memory_kib": 1024, "password_parallelism": 1}


def settings_for(data: Path, **extra: Any) -> Settings:
    values = {**FAST, **extra}
    return Settings(data_dir=data, temporal_address=f"127.0.0.1:{free_port()}", **values)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def client(data: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(data))) as client:
        yield client


def sign_up(client: TestClient, email: str, password: str = PASSWORD) -> None:
    answer = client.post("/api/auth/signup", json={"email": email, "password": password})
    assert answer.status_code == 201, answer.text


def log_in(client: TestClient, email: str, password: str = PASSWORD, **extra: str) -> Any:
    return client.post("/api/auth/token", json={"email": email, "password": password, **extra})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def stored_user(data: Path, email: str) -> User:
    with Session(get_engine(settings_for(data).db_url)) as db:
        user = db.exec(select(User).where(User.email == email)).one()
        db.expunge(user)
        return user


def test_passwords_are_argon2id_with_their_parameters(data: Path) -> None:
    with TestClient(create_app(Settings(data_dir=data))) as client:  # the default cost
        sign_up(client, "ann@example.com")
    assert stored_user(data, "ann@example.com").password_hash.startswith(
        "$argon2id$v=19$m=65536,t=3,p=4$"
    )


def test_a_login_raises_weaker_parameters(data: Path) -> None:
    with TestClient(create_app(settings_for(data))) as client:
        sign_up(client, "ann@example.com")
    assert "$m=1024,t=1,p=1$" in stored_user(data, "ann@example.com").password_hash
    stronger = settings_for(data, password_memory_kib=2048, password_time_cost=2)
    with TestClient(create_app(stronger)) as client:
        assert log_in(client, "ann@example.com").status_code == 200
    assert "$m=2048,t=2,p=1$" in stored_user(data, "ann@example.com").password_hash


def test_an_old_scrypt_hash_verifies_once_and_is_rehashed(data: Path, client: TestClient) -> None:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=2**14, r=8, p=1)
    with Session(get_engine(settings_for(data).db_url)) as db:
        db.add(User(email="old@example.com", password_hash=f"scrypt${salt.hex()}${digest.hex()}"))
        db.commit()
    assert log_in(client, "old@example.com", "wrong password").status_code == 401
    assert log_in(client, "old@example.com").status_code == 200
    assert stored_user(data, "old@example.com").password_hash.startswith("$argon2id$")
    assert log_in(client, "old@example.com").status_code == 200


def test_sign_up_does_not_tell_a_taken_email(client: TestClient) -> None:
    first = client.post("/api/auth/signup", json={"email": "ann@example.com", "password": PASSWORD})
    again = client.post(
        "/api/auth/signup", json={"email": "ann@example.com", "password": "another password"}
    )
    assert (first.status_code, first.json()) == (again.status_code, again.json())
    # The first password stays.
    assert log_in(client, "ann@example.com").status_code == 200
    assert log_in(client, "ann@example.com", "another password").status_code == 401


def test_login_answers_an_unknown_email_as_a_wrong_password_after_as_much_work(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sign_up(client, "ann@example.com")
    passwords = client.app.state.passwords  # type: ignore[attr-defined]
    verified: list[str] = []

    class Spy:
        """The real hasher, noting which thread each verification runs on."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def verify(self, stored: str, password: str) -> bool:
            verified.append(threading.current_thread().name)
            return bool(real.verify(stored, password))

    real = passwords.hasher
    monkeypatch.setattr(passwords, "hasher", Spy())
    unknown = log_in(client, "nobody@example.com")
    wrong = log_in(client, "ann@example.com", "wrong password")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
    assert unknown.headers["www-authenticate"] == "Bearer"
    # One argon2 verification each, on the hashing threads, not the shared threadpool.
    assert len(verified) == 2
    assert all(name.startswith("password-hash") for name in verified)


def test_failed_logins_lock_out_the_email_from_that_address_in_every_process(
    data: Path,
) -> None:
    settings = settings_for(data, login_max_failures=3)
    with (
        TestClient(create_app(settings), client=("10.0.0.1", 1000)) as one,
        TestClient(create_app(settings), client=("10.0.0.1", 1001)) as two,
        TestClient(create_app(settings), client=("10.0.0.2", 1000)) as elsewhere,
    ):
        sign_up(one, "ann@example.com")
        # Two API processes (two apps on one database) count the same failures.
        assert log_in(one, "ann@example.com", "wrong password 1").status_code == 401
        assert log_in(two, "ann@example.com", "wrong password 2").status_code == 401
        assert log_in(one, "ann@example.com", "wrong password 3").status_code == 401
        locked = log_in(two, "ann@example.com")  # the right password, too late
        assert locked.status_code == 429
        assert int(locked.headers["retry-after"]) > 800
        assert locked.headers["content-type"] == "application/problem+json"
        # An unknown email locks the same way: a lockout tells nothing either.
        for _ in range(3):
            assert log_in(one, "nobody@example.com", "wrong password").status_code == 401
        assert log_in(one, "nobody@example.com", "wrong password").status_code == 429
        # The owner, from another address, is not locked out by the attacker.
        assert log_in(elsewhere, "ann@example.com").status_code == 200


def test_a_success_resets_the_failures(data: Path) -> None:
    with TestClient(create_app(settings_for(data, login_max_failures=2))) as client:
        sign_up(client, "ann@example.com")
        for _ in range(3):
            assert log_in(client, "ann@example.com", "wrong password").status_code == 401
            assert log_in(client, "ann@example.com").status_code == 200


def test_an_address_has_so_many_logins_and_sign_ups(data: Path) -> None:
    settings = settings_for(data, login_max_attempts=3, signup_max_attempts=2)
    with TestClient(create_app(settings)) as client:
        sign_up(client, "ann@example.com")
        sign_up(client, "bob@example.com")
        third = client.post(
            "/api/auth/signup", json={"email": "c@example.com", "password": PASSWORD}
        )
        assert third.status_code == 429
        for _ in range(3):
            assert log_in(client, "ann@example.com").status_code == 200
        assert log_in(client, "bob@example.com").status_code == 429


def test_an_attempt_within_the_limit_is_judged_by_what_it_saw_when_counted(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempts race across processes: the first is counted, then, before it is judged, three
    more (in other processes) pass the limit and lock the address. The first was within the
    limit: it is let through. Judged by a look after its count, it was refused (in a race
    of eight, one attempt too few got through)."""
    settings = settings_for(data, login_max_attempts=3)
    real_count = counters.count
    others_raced = False

    def count_then_race(db: Session, key: str, window_s: int) -> counters.Counted:
        nonlocal others_raced
        counted = real_count(db, key, window_s)
        if key.startswith("login:") and key.count(":") == 1 and not others_raced:
            others_raced = True
            for _ in range(3):
                real_count(db, key, window_s)
            counters.lock(db, key, settings.lockout_s)
        return counted

    with TestClient(create_app(settings)) as client:
        sign_up(client, "ann@example.com")
        monkeypatch.setattr(counters, "count", count_then_race)
        assert log_in(client, "ann@example.com").status_code == 200
        assert others_raced
        # The lock the others set holds for whoever comes next.
        assert log_in(client, "ann@example.com").status_code == 429


def test_tokens_are_named_listed_revoked_and_kept_hashed(data: Path, client: TestClient) -> None:
    sign_up(client, "ann@example.com")
    login = log_in(client, "ann@example.com", name="laptop").json()
    headers = bearer(login["token"])
    made = client.post("/api/tokens", json={"name": "ci"}, headers=headers)
    assert made.status_code == 201
    ci = made.json()
    listed = client.get("/api/tokens", headers=headers).json()
    assert {t["name"] for t in listed} == {"laptop", "ci"}
    assert all("token" not in t for t in listed)
    with Session(get_engine(settings_for(data).db_url)) as db:
        hashes = [t.token_hash for t in db.exec(select(ApiToken))]
    assert login["token"] not in hashes and ci["token"] not in hashes

    assert client.delete(f"/api/tokens/{ci['id']}", headers=headers).status_code == 204
    assert client.get("/api/tokens", headers=bearer(ci["token"])).status_code == 401
    assert [t["name"] for t in client.get("/api/tokens", headers=headers).json()] == ["laptop"]
    # Logging out revokes the token that asks.
    assert client.post("/api/auth/logout", headers=headers).status_code == 204
    refused = client.get("/api/tokens", headers=headers)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_nobody_revokes_another_users_token(client: TestClient) -> None:
    sign_up(client, "ann@example.com")
    sign_up(client, "bob@example.com")
    ann = log_in(client, "ann@example.com").json()
    bob = bearer(log_in(client, "bob@example.com").json()["token"])
    assert client.delete(f"/api/tokens/{ann['id']}", headers=bob).status_code == 404
    assert client.get("/api/tokens", headers=bearer(ann["token"])).status_code == 200


def test_logins_and_tokens_are_audited(data: Path, client: TestClient) -> None:
    sign_up(client, "ann@example.com")
    log_in(client, "ann@example.com", "wrong password")
    token = log_in(client, "ann@example.com").json()
    client.delete(f"/api/tokens/{token['id']}", headers=bearer(token["token"]))
    with Session(get_engine(settings_for(data).db_url)) as db:
        actions = [e.action for e in db.exec(select(AuditEntry).order_by(AuditEntry.id))]  # type: ignore[arg-type]
    assert actions == ["signup", "login.failed", "login", "token.create", "token.revoke"]


def create_admin(data: Path, *argv: str, password: str = PASSWORD) -> Any:
    cheap = {f"BERTH_{name.upper()}": str(value) for name, value in FAST.items()}
    env = {**os.environ, "BERTH_DATA_DIR": str(data), **cheap}
    return subprocess.run(
        [sys.executable, "-m", "berth", "create-admin", *argv],
        input=f"{password}\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_create_admin_from_the_command_line(data: Path) -> None:
    made = create_admin(data, "root@example.com")
    assert made.returncode == 0, made.stderr
    assert "root@example.com is an admin" in made.stdout
    assert stored_user(data, "root@example.com").is_admin
    with TestClient(create_app(settings_for(data))) as client:
        admin = bearer(log_in(client, "root@example.com").json()["token"])
        sign_up(client, "ann@example.com")
        ann = bearer(log_in(client, "ann@example.com").json()["token"])
        assert client.get("/api/sessions?all=true", headers=admin).status_code == 200
        assert client.get("/api/sessions?all=true", headers=ann).status_code == 403
    short = create_admin(data, "x@example.com", password="short")
    assert short.returncode != 0 and "at least 8 characters" in short.stderr


def test_promoting_a_registered_account_needs_the_flag_and_revokes_its_tokens(
    data: Path,
) -> None:
    """The finding: someone registers the future admin's email first and keeps a token."""
    with TestClient(create_app(settings_for(data))) as client:
        sign_up(client, "root@example.com", "attacker's password")
        kept = bearer(log_in(client, "root@example.com", "attacker's password").json()["token"])
    refused = create_admin(data, "root@example.com")
    assert refused.returncode != 0
    assert "already registered" in refused.stderr and "--promote-existing" in refused.stderr
    assert not stored_user(data, "root@example.com").is_admin
    promoted = create_admin(data, "root@example.com", "--promote-existing")
    assert promoted.returncode == 0, promoted.stderr
    with TestClient(create_app(settings_for(data))) as client:
        assert client.get("/api/sessions?all=true", headers=kept).status_code == 401
        assert log_in(client, "root@example.com", "attacker's password").status_code == 401
        admin = bearer(log_in(client, "root@example.com").json()["token"])
        assert client.get("/api/sessions?all=true", headers=admin).status_code == 200


def test_closed_sign_up_is_refused_and_says_so(data: Path) -> None:
    with TestClient(create_app(settings_for(data, signup="closed"))) as client:
        answer = client.post(
            "/api/auth/signup", json={"email": "ann@example.com", "password": PASSWORD}
        )
        assert answer.status_code == 403
        assert answer.headers["content-type"] == "application/problem+json"
        assert "sign-up is closed" in answer.json()["detail"]
        assert log_in(client, "ann@example.com").status_code == 401


def test_sign_up_by_invite_takes_a_live_single_use_code(data: Path) -> None:
    with TestClient(create_app(settings_for(data, signup="invite"))) as client:
        made = create_admin(data, "root@example.com")
        assert made.returncode == 0, made.stderr
        admin = bearer(log_in(client, "root@example.com").json()["token"])

        def signup(email: str, **extra: str) -> Any:
            body = {"email": email, "password": PASSWORD, **extra}
            return client.post("/api/auth/signup", json=body)

        without = signup("ann@example.com")
        assert without.status_code == 403 and "invite" in without.json()["detail"]
        assert signup("ann@example.com", invite="made-up").status_code == 403
        invite = client.post("/api/admin/invites", headers=admin)
        assert invite.status_code == 201, invite.text
        code = invite.json()["code"]
        assert invite.json()["link"].endswith(f"/login?invite={code}")
        assert signup("ann@example.com", invite=code).status_code == 201
        assert log_in(client, "ann@example.com").status_code == 200
        used = signup("bob@example.com", invite=code)  # single use
        assert used.status_code == 403 and "used already" in used.json()["detail"]
        ann = bearer(log_in(client, "ann@example.com").json()["token"])
        assert client.post("/api/admin/invites", headers=ann).status_code == 403
    with TestClient(create_app(settings_for(data, signup="invite", invite_ttl_hours=1))) as client:
        admin = bearer(log_in(client, "root@example.com").json()["token"])
        code = client.post("/api/admin/invites", headers=admin).json()["code"]
        with Session(get_engine(settings_for(data).db_url)) as db:
            for row in db.exec(select(Invite)):
                row.expires_at = row.created_at  # expired
                db.add(row)
            db.commit()
        late = client.post(
            "/api/auth/signup",
            json={"email": "bob@example.com", "password": PASSWORD, "invite": code},
        )
        assert late.status_code == 403 and "expired" in late.json()["detail"]


def test_a_password_change_revokes_every_other_token_and_session(data: Path) -> None:
    with TestClient(create_app(settings_for(data, login_max_failures=2))) as client:
        sign_up(client, "ann@example.com")
        mine = bearer(log_in(client, "ann@example.com", name="laptop").json()["token"])
        stolen = bearer(log_in(client, "ann@example.com", name="thief").json()["token"])
        new = "a brand new password"
        wrong = client.post(
            "/api/auth/password", json={"current": "not it", "new": new}, headers=mine
        )
        assert wrong.status_code == 403 and "current password" in wrong.json()["detail"]
        assert client.get("/api/tokens", headers=stolen).status_code == 200
        changed = client.post(
            "/api/auth/password", json={"current": PASSWORD, "new": new}, headers=mine
        )
        assert changed.status_code == 204, changed.text
        assert client.get("/api/tokens", headers=stolen).status_code == 401
        assert [t["name"] for t in client.get("/api/tokens", headers=mine).json()] == ["laptop"]
        assert log_in(client, "ann@example.com").status_code == 401
        assert log_in(client, "ann@example.com", new).status_code == 200
        # Guessing the current password with a stolen token locks out like a login does.
        for _ in range(2):
            client.post("/api/auth/password", json={"current": "guess", "new": new}, headers=mine)
        locked = client.post("/api/auth/password", json={"current": new, "new": new}, headers=mine)
        assert locked.status_code == 429
