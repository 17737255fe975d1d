"""A browser step in a real Docker sandbox: the guest's Chromium opens a page this test
serves on the host (reached through a host port the firewall allows), RunStep stores the
screenshot, and the API serves it to the session's owner and to no one else."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import Session, select
from temporalio.testing import ActivityEnvironment

import vm_templates
from activities.models import StepRequest
from activities.sandbox import SandboxActivities
from berth.host import gateway_certificate, make_gateway, make_provider
from berth.web import create_app
from config.settings import Settings
from sandboxes.docker import DockerProvider
from sandboxes.models import BrowserStep, Check, SandboxInfo
from store import events
from store.artifacts import ArtifactStore
from store.db import get_engine
from store.events import EventType
from store.models import SessionRow, User
from tests.guest_agent.test_browser import serve_pages
from tests.support.local import free_port


def sign_up(client: TestClient, email: str) -> tuple[str, dict[str, str]]:
    """The new user's id and the headers of their token."""
    credentials = {"email": email, "password": "a long password"}
    assert client.post("/api/auth/signup", json=credentials).status_code == 201
    token = client.post("/api/auth/token", json=credentials).json()["token"]
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        user = db.exec(select(User).where(User.email == email)).one()
    return user.id, {"Authorization": f"Bearer {token}"}


async def test_a_browser_step_in_a_sandbox_leaves_a_screenshot_for_its_owner(
    tmp_path: Path,
) -> None:
    page_port = free_port()
    settings = Settings(
        data_dir=tmp_path,
        sandbox_provider="docker",
        host_id=f"steps-{uuid.uuid4().hex[:8]}",
        secret_key="steps-docker-test",
        temporal_address=f"127.0.0.1:{free_port()}",  # nothing there: not needed here
        gateway_port=free_port(),
        sandbox_host_ports=[page_port],
    )
    with TestClient(create_app(settings)) as client:  # migrates the database
        owner_id, owner = sign_up(client, "owner@example.com")
        _, stranger = sign_up(client, "stranger@example.com")
        engine = get_engine(settings.db_url)
        with Session(engine) as db:
            row = SessionRow(user_id=owner_id)
            db.add(row)
            db.commit()
            session_id = row.id
        gateway = make_gateway(settings)
        provider = make_provider(settings, gateway)
        assert isinstance(provider, DockerProvider)
        await provider.prepare()
        certificate = gateway_certificate(settings, [provider.host_address])
        await gateway.start(provider.host_address, settings.gateway_port, certificate)
        sandbox: SandboxInfo | None = None
        try:
            sandbox = await provider.provision(uuid.uuid4().hex, session_id, vm_templates.DEFAULT)
            await provider.wait_connected(sandbox, 60)
            with serve_pages(provider.host_address, page_port) as base:
                step = BrowserStep(
                    action="navigate",
                    url=f"{base}/form",
                    check=Check(kind="page_text_contains", value="Go"),
                )
                with Session(engine) as db:
                    events.record(
                        db, session_id, EventType.task_queued, {"task_id": "t", "prompt": "p"}
                    )
                    plan = {"task_id": "t", "steps": [step.model_dump()]}
                    events.record(db, session_id, EventType.task_plan, plan)
                activities = SandboxActivities(
                    provider,
                    engine,
                    60,
                    ArtifactStore(settings.artifacts_dir, settings.artifact_max_bytes),
                )
                request = StepRequest(
                    sandbox=sandbox, task_id="t", index=0, step=step, timeout_s=90
                )
                env = ActivityEnvironment()
                env.info = dataclasses.replace(env.info, attempt=1)
                outcome = await env.run(activities.run_step, request)
        finally:
            if sandbox is not None:
                await provider.destroy(sandbox)
            await gateway.stop()
            await provider.close()  # its firewall rules, the page's port's included
        assert outcome.ok, outcome
        assert outcome.result is not None and outcome.result.title == "Form"
        assert outcome.check is not None and outcome.check.ok
        (artifact_id,) = outcome.artifacts
        url = f"/api/sessions/{session_id}/artifacts/{artifact_id}"
        served = client.get(url, headers=owner)
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/jpeg"
        assert served.content[:3] == b"\xff\xd8\xff" and len(served.content) > 1000
        assert client.get(url, headers=stranger).status_code == 404
        assert client.get(url).status_code == 401
        assert client.get(f"{url}x", headers=owner).status_code == 404
        task = client.get(f"/api/sessions/{session_id}/tasks/t", headers=owner).json()
        assert task["steps"][0]["artifacts"] == [artifact_id]
