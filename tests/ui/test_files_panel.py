"""The files panel's upload (a multipart form, as the browser sends it) reaches the guest's
workspace, and the panel is redrawn saying so: the dashboard's route against a real guest
agent on loopback through the worker's relay."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import Session

from api import accounts
from api.deps import COOKIE
from berth.web import create_app
from config.settings import Settings
from store.models import SandboxRow
from tests.api.test_files import relayed
from tests.support.world import FAST_PASSWORDS, build
from ui import guard


async def test_an_uploaded_form_lands_in_the_workspace(tmp_path: Path) -> None:
    async with relayed(tmp_path) as (relaying, sandbox, workspace):
        settings = Settings(
            data_dir=relaying.data_dir, relay_port=relaying.relay_port, **FAST_PASSWORDS
        )

        def upload() -> str:
            with TestClient(create_app(settings)) as client:
                engine = client.app.state.engine  # type: ignore[attr-defined]
                world = build(engine)
                with Session(engine) as db:
                    db.add(SandboxRow(
                        id=sandbox, session_id=world.session_id, provider="docker",
                        host_id="here", template="default", handle="h",
                    ))  # fmt: skip
                    db.commit()
                    token, secret = accounts.issue_token(db, settings, world.owner, "page")
                client.cookies.set(COOKIE, secret)
                headers = {
                    "Origin": "http://testserver",
                    guard.HEADER: guard.token_for(settings, token.id),
                }
                answer = client.post(
                    f"/ui/sessions/{world.session_id}/files?path=in",
                    headers=headers,
                    files=[("upload", ("a.csv", b"a,b\n", "text/csv")),
                           ("upload", ("b.txt", b"b\n", "text/plain"))],
                )  # fmt: skip
                assert answer.status_code == 200
                return answer.text

        page = await asyncio.to_thread(upload)
        assert "uploaded a.csv (4 bytes); uploaded b.txt (2 bytes)" in page
        assert (workspace / "in" / "a.csv").read_bytes() == b"a,b\n"
        assert 'href="/ui/sessions/' in page and "b.txt" in page
