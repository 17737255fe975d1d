"""What the API tells a caller when something is wrong: enough to act on, nothing more."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from api.deps import Problem, Streams
from berth.web import create_app
from config.settings import Settings
from store.models import SessionRow, User, utcnow
from tests.support.local import free_port


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    # Nothing listens on Temporal's port: the API still serves, and says so.
    settings = Settings(
        data_dir=tmp_path,
        temporal_address=f"127.0.0.1:{free_port()}",
        password_time_cost=1,
        password_memory_kib=1024,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_health_names_what_is_down_and_not_where(client: TestClient) -> None:
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json() == {"status": "unavailable", "database": "ok", "temporal": "unavailable"}
    assert "127.0.0.1" not in answer.text


def test_a_rejected_body_is_not_echoed(client: TestClient) -> None:
    secret = "Qz7-kw"  # too short to be accepted: the answer must not repeat it
    answer = client.post("/api/auth/signup", json={"email": "a@b.c", "password": secret})
    assert answer.status_code == 422
    assert secret not in answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["status"] == 422 and problem["type"] == "about:blank"
    assert [e["loc"] for e in problem["errors"]] == [["body", "password"]]


def test_a_user_holds_at_most_so_many_streams(engine: Engine) -> None:
    count = Streams(engine, most=2)
    first, second = count.take("ann"), count.take("ann")  # taken as asked, before any starts
    with pytest.raises(Problem) as refused:
        count.take("ann")
    assert refused.value.status == 429 and "2 event streams" in refused.value.detail
    count.take("bob")  # another user's streams are their own
    first()
    first()  # given back twice (the body's end and the response's): one place freed
    count.take("ann")
    with pytest.raises(Problem):
        count.take("ann")
    second()


def signed_in(client: TestClient, email: str = "ann@example.com") -> dict[str, str]:
    credentials = {"email": email, "password": "correct horse"}
    assert client.post("/api/auth/signup", json=credentials).status_code == 201
    token = client.post("/api/auth/token", json=credentials).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def is_problem(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = answer.json()
    assert problem["type"] == "about:blank" and problem["status"] == status
    assert problem["title"] and problem["detail"]
    return problem


def test_every_error_is_a_problem_document(client: TestClient) -> None:
    is_problem(client.get("/api/nothing-here"), 404)
    is_problem(client.put("/api/sessions"), 405)
    is_problem(client.get("/api/sessions?limit=0", headers=signed_in(client)), 422)
    is_problem(client.get("/api/sessions/nope", headers=signed_in(client, "bob@example.com")), 404)


def test_a_blank_prompt_is_a_problem_not_a_workflow_call(client: TestClient) -> None:
    # Temporal is down: a prompt that reached the workflow would be answered 503.
    headers = signed_in(client)
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        row = SessionRow(user_id=db.exec(select(User)).one().id)
        db.add(row)
        db.commit()
        sid = row.id
    for blank in ("", "   ", " \n\t "):
        task = client.post(f"/api/sessions/{sid}/tasks", json={"prompt": blank}, headers=headers)
        assert is_problem(task, 422)["errors"][0]["loc"] == ["body", "prompt"]
        change = client.post(
            f"/api/sessions/{sid}/tasks/t1/modify", json={"instruction": blank}, headers=headers
        )
        assert is_problem(change, 422)["errors"][0]["loc"] == ["body", "instruction"]


def test_an_anonymous_caller_learns_nothing_of_the_orchestrator(client: TestClient) -> None:
    # Temporal is down, but the caller is checked first: a 401 that says how to get a token.
    anonymous = client.post("/api/sessions", json={})
    is_problem(anonymous, 401)
    assert anonymous.headers["www-authenticate"] == "Bearer"
    forged = client.get("/api/sessions", headers={"Authorization": "Bearer forged"})
    assert is_problem(forged, 401) and "invalid_token" in forged.headers["www-authenticate"]
    # A signed-in caller hears that it is down, not where it is, and no session is left over.
    headers = signed_in(client)
    down = client.post("/api/sessions", json={}, headers=headers)
    assert "127.0.0.1" not in is_problem(down, 503)["detail"]
    assert client.get("/api/sessions", headers=headers).json() == []


def test_lists_page_with_a_cursor_in_a_link(client: TestClient, tmp_path: Path) -> None:
    headers = signed_in(client)
    user_id = client.get("/api/tokens", headers=headers)  # any authenticated call
    assert user_id.status_code == 200
    engine = client.app.state.engine  # type: ignore[attr-defined]
    with Session(engine) as db:
        owner = db.exec(select(User)).one()
        moment = utcnow()
        # Two share a creation time: the cursor breaks the tie by id.
        for offset in (0, 0, 1, 2, 3):
            db.add(SessionRow(user_id=owner.id, created_at=moment - timedelta(seconds=offset)))
        db.commit()
        expected = [r.id for r in db.exec(select(SessionRow))]
    seen: list[str] = []
    url: str | None = "/api/sessions?limit=2"
    while url:
        answer = client.get(url, headers=headers)
        assert answer.status_code == 200
        seen += [s["id"] for s in answer.json()]
        url = answer.links.get("next", {}).get("url")
    assert len(seen) == 5 and sorted(seen) == sorted(expected)
    times = [
        client.get(f"/api/sessions/{sid}", headers=headers).json()["created_at"] for sid in seen
    ]
    assert times == sorted(times, reverse=True)
    is_problem(client.get("/api/sessions?cursor=bm90IGEgY3Vyc29y", headers=headers), 400)


def test_the_schema_documents_errors_and_media_types(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        if not path.startswith("/api/"):
            continue
        for method, operation in operations.items():
            answers = operation["responses"]
            assert "422" in answers, (method, path)
            errors = {code: a for code, a in answers.items() if code[0] in "45"}
            for code, answer in errors.items():
                assert list(answer["content"]) == ["application/problem+json"], (method, path, code)
            if "security" in operation:  # it takes a token: it may refuse one
                assert "401" in answers, (method, path)
    events = schema["paths"]["/api/sessions/{sid}/events"]["get"]["responses"]
    assert list(events["200"]["content"]) == ["text/event-stream"]


def test_internal_error_text_goes_to_the_log_and_the_caller_gets_its_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        temporal_address=f"127.0.0.1:{free_port()}",
        password_time_cost=1,
        password_memory_kib=1024,
    )
    app = create_app(settings)

    @app.get("/api/crash")
    def crash() -> None:
        raise RuntimeError("docker: stderr of /var/lib/berth/secret-path")

    with TestClient(app, raise_server_exceptions=False) as client:
        crashed = client.get("/api/crash")
        down = client.post("/api/sessions", json={}, headers=signed_in(client))
    problem = is_problem(crashed, 500)
    assert "secret-path" not in crashed.text
    assert problem["error_id"] in problem["detail"]
    unavailable = is_problem(down, 503)
    assert unavailable["error_id"] in unavailable["detail"]
    logged = caplog.text
    assert f"error {problem['error_id']}" in logged and "secret-path" in logged
    assert f"error {unavailable['error_id']}" in logged
