"""Sessions whose workflow cannot answer, through the API with a real Temporal dev server
and no worker: an update call is bounded (a 503 saying the session is not answering, not a
hang), and DELETE of a session whose workflow is gone ends its row at once, freeing its slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from temporalio.client import Client

from berth.web import create_app
from config.settings import Settings
from tests.support.world import FAST_PASSWORDS, PASSWORD
from workflows.client import workflow_id


@pytest.fixture
def app(tmp_path: Path, temporal_address: str) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path,
        temporal_address=temporal_address,
        # Its own queue, which no worker polls: the workflows start and never run.
        host_id=f"nobody-{tmp_path.name}",
        max_live_sessions=1,
        session_update_timeout_s=2.0,
        **FAST_PASSWORDS,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def signed_in(client: TestClient) -> dict[str, str]:
    credentials = {"email": "ann@example.com", "password": PASSWORD}
    assert client.post("/api/auth/signup", json=credentials).status_code == 201
    token = client.post("/api/auth/token", json=credentials).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def terminate(address: str, session_id: str) -> None:
    async def kill() -> None:
        client = await Client.connect(address)
        await client.get_workflow_handle(workflow_id(session_id)).terminate(reason="test")

    asyncio.run(kill())


@pytest.mark.timeout(90)
def test_an_update_to_a_session_nobody_serves_is_a_503_in_bounded_time(
    app: TestClient,
) -> None:
    headers = signed_in(app)
    sid = app.post("/api/sessions", json={}, headers=headers).json()["id"]
    began = time.monotonic()
    answer = app.post(f"/api/sessions/{sid}/tasks", json={"prompt": "$ true"}, headers=headers)
    waited = time.monotonic() - began
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert int(answer.headers["retry-after"]) > 0
    assert "not answering" in answer.json()["detail"]
    assert 2.0 <= waited < 15.0
    control = app.post(f"/api/sessions/{sid}/tasks/t1/pause", headers=headers)
    assert control.status_code == 503 and "retry-after" in control.headers


def test_delete_of_a_session_whose_workflow_is_gone_ends_it_at_once(
    app: TestClient, temporal_address: str
) -> None:
    headers = signed_in(app)
    sid = app.post("/api/sessions", json={}, headers=headers).json()["id"]
    # The only slot is taken.
    assert app.post("/api/sessions", json={}, headers=headers).status_code == 429
    terminate(temporal_address, sid)

    ended = app.delete(f"/api/sessions/{sid}", headers=headers)
    assert ended.status_code == 202, ended.text
    body = ended.json()
    assert body["status"] == "failed" and body["ended_at"] is not None
    assert "terminated" in body["error"]
    assert app.get(f"/api/sessions/{sid}", headers=headers).json()["status"] == "failed"
    # The log says so too (the dashboard and the stream read it), and the slot is free.
    events = app.get(f"/api/sessions/{sid}/events?after=0", headers=headers)
    assert '"status": "failed"' in events.text or '"status":"failed"' in events.text
    assert app.post("/api/sessions", json={}, headers=headers).status_code == 201
    # Ending it again changes nothing and is no error.
    again = app.delete(f"/api/sessions/{sid}", headers=headers)
    assert again.status_code == 202 and again.json()["status"] == "failed"
