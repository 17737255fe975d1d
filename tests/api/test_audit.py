"""The audit log: append-only in the database itself; an admin reads a session's trail (its
audit entries and the commands its sandbox ran) through the API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from berth.web import create_app
from config.settings import Settings
from store import audit
from tests.support.world import COMMAND, FAST_PASSWORDS, World, bearer, build


def test_the_audit_log_refuses_updates_and_deletes(engine: Engine) -> None:
    with Session(engine) as db:
        entry = audit.record(db, "someone", "login", "someone", {"why": "test"}, ip="10.0.0.1")
        assert entry.id is not None
    for statement in ("UPDATE audit_log SET action = 'nothing'", "DELETE FROM audit_log"):
        with engine.connect() as conn, pytest.raises(DBAPIError, match="append-only"):
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT action FROM audit_log")).scalars().all() == ["login"]


@pytest.fixture
def stage(temporal_address: str, tmp_path: Path) -> Iterator[tuple[TestClient, Settings, World]]:
    settings = Settings(data_dir=tmp_path, temporal_address=temporal_address, **FAST_PASSWORDS)
    with TestClient(create_app(settings)) as client:
        yield client, settings, build(client.app.state.engine)  # type: ignore[attr-defined]


def test_an_admin_reads_a_sessions_trail(stage: tuple[TestClient, Settings, World]) -> None:
    client, settings, world = stage
    engine = client.app.state.engine  # type: ignore[attr-defined]
    owner = {"Authorization": f"Bearer {bearer(engine, settings, world.owner)}"}
    admin = {"Authorization": f"Bearer {bearer(engine, settings, world.admin)}"}
    # A session made and ended through the API (a real Temporal: no worker runs it).
    sid = client.post("/api/sessions", json={}, headers=owner).json()["id"]
    assert client.delete(f"/api/sessions/{sid}", headers=owner).status_code == 202
    trail = client.get(f"/api/admin/audit?session_id={sid}", headers=admin).json()
    assert [(e["action"], e["actor_id"]) for e in trail] == [
        ("session.create", world.owner.id),
        ("session.delete", world.owner.id),
    ]
    assert all(e["ip"] for e in trail)

    # The recorded session's trail holds the command its sandbox ran, in time order.
    with Session(engine) as db:
        audit.record(db, world.owner.id, "session.create", world.session_id)
    trail = client.get(f"/api/admin/audit?session_id={world.session_id}", headers=admin).json()
    commands = [e for e in trail if e["kind"] == "command"]
    assert [c["detail"]["command"] for c in commands] == [COMMAND]
    assert commands[0]["actor_id"] == world.owner.id
    assert [e["at"] for e in trail] == sorted(e["at"] for e in trail)

    # Page by page, the same trail.
    paged: list[dict[str, object]] = []
    url: str | None = f"/api/admin/audit?session_id={world.session_id}&limit=1"
    while url:
        answer = client.get(url, headers=admin)
        paged += answer.json()
        url = answer.links.get("next", {}).get("url")
    assert [(e["kind"], e["id"]) for e in paged] == [(e["kind"], e["id"]) for e in trail]

    # The whole log names admin actions too, reading it included.
    everything = client.get("/api/admin/audit?limit=200", headers=admin).json()
    assert "admin.audit.read" in {e["action"] for e in everything}
    assert client.get("/api/admin/audit?session_id=nope", headers=admin).status_code == 404
