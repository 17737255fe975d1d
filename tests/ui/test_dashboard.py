"""The dashboard's session cookie, CSRF defences (token and origin, login included), security
headers, and how htmx requests are answered (real statuses, HX-Redirect to the login)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from berth.web import create_app
from config.settings import Settings
from store.models import SessionRow, User
from tests.support.local import free_port

ORIGIN = "http://testserver"
EMAIL, PASSWORD = "ann@example.com", "correct horse battery"


def app_for(data: Path, **extra: Any) -> TestClient:
    settings = Settings(
        data_dir=data,
        temporal_address=f"127.0.0.1:{free_port()}",  # nothing there: Temporal is down
        password_time_cost=1,
        password_memory_kib=1024,
        password_parallelism=1,
        **extra,
    )
    return TestClient(create_app(settings), follow_redirects=False)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with app_for(tmp_path) as client:
        yield client


def form_token(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, html
    return found.group(1)


def log_in(client: TestClient, action: str = "signup") -> str:
    """Signs up (or logs in) through the login form; the page's CSRF token for htmx."""
    token = form_token(client.get("/login").text)
    answer = client.post(
        "/login",
        data={"email": EMAIL, "password": PASSWORD, "action": action, "csrf": token},
        headers={"Origin": ORIGIN},
    )
    assert answer.status_code == 303, answer.text
    home = client.get("/")
    assert home.status_code == 200
    found = re.search(r'hx-headers=\'\{"X-CSRF-Token": "([0-9a-f]+)"\}\'', home.text)
    assert found, home.text
    return found.group(1)


def htmx(csrf: str | None, origin: str = ORIGIN) -> dict[str, str]:
    headers = {"HX-Request": "true", "Origin": origin}
    return {**headers, "X-CSRF-Token": csrf} if csrf else headers


def test_the_session_cookie_is_httponly_lax_and_secure_under_tls(tmp_path: Path) -> None:
    with app_for(tmp_path) as client:
        log_in(client)
        token = form_token(client.get("/login").text)
        login = client.post(
            "/login",
            data={"email": EMAIL, "password": PASSWORD, "csrf": token},
            headers={"Origin": ORIGIN},
        )
        cookie = login.headers["set-cookie"]
        assert "berth_token=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert "Secure" not in cookie
    tls = TestClient(client.app, base_url="https://testserver", follow_redirects=False)
    with tls:
        page = tls.get("/login")
        assert "Secure" in page.headers["set-cookie"]
        answer = tls.post(
            "/login",
            data={"email": EMAIL, "password": PASSWORD, "csrf": form_token(page.text)},
            headers={"Origin": "https://testserver"},
        )
        assert answer.status_code == 303
        assert "Secure" in answer.headers["set-cookie"]


def test_login_csrf_is_closed(client: TestClient) -> None:
    # A foreign site's form: no login cookie of this browser, no token it could know.
    forged = client.post(
        "/login",
        data={"email": EMAIL, "password": PASSWORD, "action": "signup", "csrf": "0" * 64},
        headers={"Origin": ORIGIN},
    )
    assert forged.status_code == 403
    assert "berth_token" not in forged.headers.get("set-cookie", "")
    # The right token from another origin is refused too.
    token = form_token(client.get("/login").text)
    elsewhere = client.post(
        "/login",
        data={"email": EMAIL, "password": PASSWORD, "action": "signup", "csrf": token},
        headers={"Origin": "https://evil.example"},
    )
    assert elsewhere.status_code == 403
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        assert db.exec(select(User)).first() is None, "a forged form made an account"


def test_actions_need_the_token_and_the_origin(client: TestClient) -> None:
    csrf = log_in(client)
    assert client.post("/ui/sessions", headers=htmx(None)).status_code == 403
    assert client.post("/ui/sessions", headers=htmx("f" * 64)).status_code == 403
    evil = htmx(csrf, "https://evil.example")
    assert client.post("/ui/sessions", headers=evil).status_code == 403
    no_origin = {k: v for k, v in htmx(csrf).items() if k != "Origin"}
    assert client.post("/ui/sessions", headers=no_origin).status_code == 403
    referer = {**no_origin, "Referer": f"{ORIGIN}/"}
    # Past both checks, the action fails for its own reason, with its real status.
    for headers in (htmx(csrf), referer):
        down = client.post("/ui/sessions", headers=headers)
        assert down.status_code == 503
        assert down.text.startswith('<p class="error">') and "orchestrator" in down.text


def test_errors_of_actions_are_fragments_with_real_statuses(client: TestClient) -> None:
    csrf = log_in(client)
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        user = db.exec(select(User)).one()
        row = SessionRow(user_id=user.id)
        db.add(row)
        db.commit()
        sid = row.id
    empty = client.post(f"/ui/sessions/{sid}/tasks", data={"prompt": ""}, headers=htmx(csrf))
    assert empty.status_code == 422 and "Type a task first" in empty.text
    other = client.post("/ui/sessions/nope/tasks", data={"prompt": "$ ls"}, headers=htmx(csrf))
    assert other.status_code == 404 and 'class="error"' in other.text
    missing = client.get("/sessions/nope")
    assert missing.status_code == 404 and "<h1>404</h1>" in missing.text
    # A form the route cannot read is answered in HTML too, not with a JSON document.
    unreadable = client.post("/login", data={"action": "login"}, headers={"Origin": ORIGIN})
    assert unreadable.status_code == 422 and "<h1>422</h1>" in unreadable.text


def test_a_blank_or_oversized_prompt_is_the_forms_error_not_a_workflow_call(
    client: TestClient,
) -> None:
    # Temporal is down: a text that reached the workflow would be answered 503.
    csrf = log_in(client)
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        row = SessionRow(user_id=db.exec(select(User)).one().id)
        db.add(row)
        db.commit()
        sid = row.id
    blank = client.post(f"/ui/sessions/{sid}/tasks", data={"prompt": " \n\t "}, headers=htmx(csrf))
    assert blank.status_code == 422 and "Type a task first" in blank.text
    plan = "\n".join(["$ true"] * 51)
    too_long = client.post(f"/ui/sessions/{sid}/tasks", data={"prompt": plan}, headers=htmx(csrf))
    assert too_long.status_code == 422 and "at most 50 steps" in too_long.text
    change = client.post(
        f"/ui/sessions/{sid}/tasks/t1/modify", data={"instruction": "   "}, headers=htmx(csrf)
    )
    assert change.status_code == 422 and "Say how to change the task" in change.text


def test_a_path_that_matches_no_route_is_answered_as_its_neighbours_are(
    client: TestClient,
) -> None:
    # Under a dashboard page's first segment: an error page; elsewhere a problem document.
    page = client.get("/sessions/nope/nothing-here")
    assert page.status_code == 404 and "<h1>404</h1>" in page.text
    for path in ("/nothing-here", "/api/nothing-here"):
        answer = client.get(path)
        assert answer.status_code == 404
        assert answer.headers["content-type"] == "application/problem+json"


def test_a_lost_login_redirects_htmx_by_header_and_pages_by_303(client: TestClient) -> None:
    answer = client.post("/ui/sessions", headers=htmx(None))
    assert answer.status_code == 401 and answer.headers["hx-redirect"] == "/login"
    page = client.get("/sessions/anything")
    assert page.status_code == 303 and page.headers["location"] == "/login"


def test_logout_revokes_the_dashboard_token(client: TestClient) -> None:
    csrf = log_in(client)
    cookie = client.cookies["berth_token"]
    out = client.post("/logout", data={"csrf": csrf}, headers={"Origin": ORIGIN})
    assert out.status_code == 303
    client.cookies.set("berth_token", cookie)  # a copy kept by whoever stole it
    assert client.get("/").status_code == 303
    as_bearer = {"Authorization": f"Bearer {cookie}"}
    assert client.get("/api/tokens", headers=as_bearer).status_code == 401


def test_pages_forbid_framing_and_foreign_scripts(client: TestClient) -> None:
    for path in ("/login", "/api/sessions", "/static/berth.js"):
        headers = client.get(path).headers
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert headers["x-content-type-options"] == "nosniff"
    # No inline script or handler anywhere in the templates: the policy would block them.
    templates = Path(__file__).parents[2] / "ui" / "templates"
    for template in templates.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)|\bon\w+=|hx-on", text), template.name


def test_closed_sign_up_hides_the_form_and_refuses_a_forged_one(tmp_path: Path) -> None:
    with app_for(tmp_path, signup="closed") as client:
        page = client.get("/login").text
        assert 'value="signup"' not in page and "Sign-up is closed" in page
        answer = client.post(
            "/login",
            data={
                "email": EMAIL,
                "password": PASSWORD,
                "action": "signup",
                "csrf": form_token(page),
            },
            headers={"Origin": ORIGIN},
        )
        assert answer.status_code == 403 and "sign-up is closed" in answer.text


def test_an_invite_link_fills_in_the_sign_up_form(tmp_path: Path) -> None:
    with app_for(tmp_path, signup="invite") as client:
        page = client.get("/login?invite=abc123").text
        assert 'name="invite" value="abc123"' in page and 'value="signup"' in page
        answer = client.post(
            "/login",
            data={
                "email": EMAIL, "password": PASSWORD, "action": "signup",
                "csrf": form_token(page), "invite": "abc123",
            },
            headers={"Origin": ORIGIN},
        )  # fmt: skip
        assert answer.status_code == 403 and "invite" in answer.text
