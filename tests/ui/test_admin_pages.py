"""The admins' page: warm pools (from Temporal), every user's sessions newest first with
links to their workflows in the Temporal Web UI, the audit log's newest entries; 403 to
anyone else."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api import accounts
from api.deps import COOKIE
from berth.web import create_app
from config.settings import Settings
from store import audit
from store.models import SessionRow, User, utcnow
from tests.support.world import FAST_PASSWORDS, World, build


def sign_in(client: TestClient, user: User) -> None:
    settings = client.app.state.settings  # type: ignore[attr-defined]
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        _, secret = accounts.issue_token(db, settings, user, "dashboard")
    client.cookies.set(COOKIE, secret)


def staged(settings: Settings) -> Iterator[tuple[TestClient, World]]:
    with TestClient(create_app(settings), follow_redirects=False) as client:
        world = build(client.app.state.engine)  # type: ignore[attr-defined]
        yield client, world


@pytest.fixture
def stage(temporal_address: str, tmp_path: Path) -> Iterator[tuple[TestClient, World]]:
    settings = Settings(data_dir=tmp_path, temporal_address=temporal_address, **FAST_PASSWORDS)
    yield from staged(settings)


def test_admins_see_every_session_newest_first_with_its_workflow(
    stage: tuple[TestClient, World],
) -> None:
    client, world = stage
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        later = SessionRow(
            user_id=world.other.id, template="default", created_at=utcnow() + timedelta(hours=1)
        )
        db.add(later)
        db.commit()
        newest = later.id
    sign_in(client, world.admin)
    page = client.get("/admin")
    assert page.status_code == 200, page.text
    links = re.findall(
        r'href="(http://127\.0\.0\.1:8233/namespaces/default/workflows/[^"]+)"', page.text
    )
    assert links == [
        f"http://127.0.0.1:8233/namespaces/default/workflows/session-{newest}",
        f"http://127.0.0.1:8233/namespaces/default/workflows/session-{world.session_id}",
    ]
    sessions = page.text.split("<h1>All sessions</h1>", 1)[1].split("</table>", 1)[0]
    assert sessions.index(world.other.id) < sessions.index(world.owner.id)
    assert f'<a href="/sessions/{world.session_id}">' in sessions
    # No pool runs on this Temporal: each template says so, the page still answers.
    assert re.search(
        r'<th scope="row">default</th>\s*<td colspan="6" class="muted">no warm pool', page.text
    )


def test_the_audit_log_shows_its_newest_entries_and_the_read_is_audited(
    stage: tuple[TestClient, World],
) -> None:
    client, world = stage
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        audit.record(db, world.owner.id, "token.create", "t-older", ip="10.0.0.1")
    sign_in(client, world.admin)  # itself audited: a token made
    log = client.get("/admin").text.split("<h1>Audit log</h1>", 1)[1]
    body = log.split("<tbody>", 1)[1]
    rows = [
        [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)
    ]
    # Newest first: this very read, then what came before it (When, Actor, Action, Target).
    assert [row[1:4] for row in rows[:3]] == [
        [world.admin.id, "admin.page.read", ""],
        [world.admin.id, "token.create", rows[1][3]],
        [world.owner.id, "token.create", "t-older"],
    ]
    assert rows[2][4] == "10.0.0.1"


def test_anyone_but_an_admin_is_refused(stage: tuple[TestClient, World]) -> None:
    client, world = stage
    for user in (world.owner, world.other):
        sign_in(client, user)
        refused = client.get("/admin")
        assert refused.status_code == 403 and "only an admin" in refused.text
        assert world.session_id not in refused.text


def test_the_links_follow_the_configured_web_ui_and_a_down_temporal_is_said(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        temporal_address="127.0.0.1:9",  # nothing there
        temporal_ui_url="https://temporal.example/ui/",
        temporal_namespace="berth prod",
        **FAST_PASSWORDS,
    )
    for client, world in staged(settings):
        sign_in(client, world.admin)
        page = client.get("/admin")
        assert page.status_code == 200
        expected = f"https://temporal.example/ui/namespaces/berth%20prod/workflows/session-{world.session_id}"
        assert f'href="{expected}"' in page.text
        assert "the orchestrator is unavailable" in page.text


def test_a_session_page_links_admins_to_its_workflow_and_owners_not(
    stage: tuple[TestClient, World],
) -> None:
    client, world = stage
    link = f"http://127.0.0.1:8233/namespaces/default/workflows/session-{world.session_id}"
    sign_in(client, world.admin)
    assert link in client.get(f"/sessions/{world.session_id}").text
    client.cookies.clear()
    sign_in(client, world.owner)
    page = client.get(f"/sessions/{world.session_id}")
    assert page.status_code == 200 and "Temporal Web UI" not in page.text
