"""The dashboard's API tokens page: list, create (the secret shown once), revoke; the
dashboard's own login is one of them, and revoking it logs the browser out."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlmodel import Session, select

from api import accounts
from store.models import ApiToken, User
from tests.support.world import make_user
from tests.ui.test_dashboard import ORIGIN, client, log_in

__all__ = ["client"]  # the fixture


def actions(csrf: str) -> dict[str, str]:
    return {"HX-Request": "true", "Origin": ORIGIN, "X-CSRF-Token": csrf}


def rows(html: str) -> list[str]:
    """The table's rows, as their text without tags and extra spaces."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    found = re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)
    return [" ".join(re.sub(r"<[^>]+>", " ", row).split()) for row in found]


def test_a_token_is_made_shown_once_used_and_revoked(client: TestClient) -> None:
    csrf = log_in(client)
    page = client.get("/tokens")
    assert page.status_code == 200
    [login] = rows(page.text)
    assert login.startswith("dashboard this browser's login") and "never" not in login

    made = client.post("/ui/tokens", data={"name": "backup script"}, headers=actions(csrf))
    assert made.status_code == 200 and made.text.lstrip().startswith('<div id="tokens">')
    secret = re.search(r'class="secret" readonly value="([^"]+)"', made.text)
    assert secret, made.text
    assert [r.split(" 20")[0] for r in rows(made.text)] == [
        "backup script", "dashboard this browser's login"
    ]  # fmt: skip
    assert "backup script" in rows(made.text)[0] and "never" in rows(made.text)[0]
    # Never shown again.
    assert secret.group(1) not in client.get("/tokens").text
    api = {"Authorization": f"Bearer {secret.group(1)}"}
    listed = client.get("/api/tokens", headers=api)
    assert listed.status_code == 200
    mine = next(t for t in listed.json() if t["name"] == "backup script")
    assert mine["last_used_at"] is not None
    assert "never" not in rows(client.get("/tokens").text)[0]

    revoked = client.post(f"/ui/tokens/{mine['id']}/revoke", headers=actions(csrf))
    assert revoked.status_code == 200
    assert [r.split(" 20")[0] for r in rows(revoked.text)] == ["dashboard this browser's login"]
    assert client.get("/api/tokens", headers=api).status_code == 401


def test_a_refused_name_keeps_what_was_typed(client: TestClient) -> None:
    csrf = log_in(client)
    empty = client.post("/ui/tokens", data={"name": "  "}, headers=actions(csrf))
    assert empty.status_code == 422 and 'id="name-error" class="error">needed' in empty.text
    long = "x" * 101
    too_long = client.post("/ui/tokens", data={"name": long}, headers=actions(csrf))
    assert too_long.status_code == 422 and f'value="{long}"' in too_long.text
    assert "at most 100 characters" in too_long.text and "secret" not in too_long.text
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        assert len(db.exec(select(ApiToken)).all()) == 1  # the login's only


def test_revoking_this_browsers_login_logs_it_out(client: TestClient) -> None:
    csrf = log_in(client)
    other_login = log_in(client, action="login")  # this browser logs in again
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        tokens = db.exec(select(ApiToken).order_by(ApiToken.created_at)).all()  # type: ignore[arg-type]
    first, current = tokens
    page = client.get("/tokens").text
    assert "a dashboard login" in page and "this browser's login" in page
    # Another login of the user's is revoked without logging this one out.
    gone = client.post(f"/ui/tokens/{first.id}/revoke", headers=actions(other_login))
    assert gone.status_code == 200 and "a dashboard login" not in gone.text
    out = client.post(f"/ui/tokens/{current.id}/revoke", headers=actions(other_login))
    assert out.status_code == 200 and out.headers["hx-redirect"] == "/login"
    assert 'berth_token=""' in out.headers["set-cookie"]
    assert csrf != other_login


def test_another_users_token_is_not_found(client: TestClient) -> None:
    csrf = log_in(client)
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        stranger: User = make_user(db, "stranger@example.com")
        settings = client.app.state.settings  # type: ignore[attr-defined]
        theirs, _ = accounts.issue_token(db, settings, stranger, "theirs")
    answer = client.post(f"/ui/tokens/{theirs.id}/revoke", headers=actions(csrf))
    assert answer.status_code == 404 and 'class="error"' in answer.text
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        assert db.get(ApiToken, theirs.id).revoked_at is None  # type: ignore[union-attr]
