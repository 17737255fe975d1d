"""What the API tells a caller when something is wrong: enough to act on, nothing more."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.deps import Problem, StreamCount
from berth.local import free_port
from berth.settings import Settings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    # Nothing listens on Temporal's port: the API still serves, and says so.
    settings = Settings(data_dir=tmp_path, temporal_address=f"127.0.0.1:{free_port()}")
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


def test_a_user_holds_at_most_so_many_streams() -> None:
    count = StreamCount(most=2)
    with count.hold("ann"), count.hold("ann"):
        with pytest.raises(Problem) as refused:
            count.check("ann")
        assert refused.value.status == 429 and "2 event streams" in refused.value.detail
        count.check("bob")  # another user's streams are their own
    count.check("ann")  # closed streams free their places
