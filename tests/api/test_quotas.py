"""Per-user limits: LLM spending a day and a month (checked as each call takes its place in
flight) and kept disks (count, bytes, and their removal past the age limit). Each refusal is
a problem document naming the limit, its value, what is used and when it resets; an admin
sets other limits for one user."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from api.deps import COOKIE
from berth.host import make_gateway, make_provider
from berth.web import create_app
from config.settings import Settings
from llm.accounting import next_day, next_month
from sandboxes.kept import KeptDisks
from store import events
from store.db import get_engine
from store.events import EventType, NewEvent
from store.models import SandboxRow, SessionRow, User
from tests.api.test_openai_compat import ask, berth_with
from tests.support.scripted_llm import Reply, ScriptedLLM
from tests.support.world import FAST_PASSWORDS, bearer, make_user

# $1.50 a call: the scripted provider answers with 10 prompt and 5 completion tokens.
PRICES = {"model-0": (100_000.0, 100_000.0)}


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def test_spend_limits_refuse_with_the_limit_and_its_reset(tmp_path: Path) -> None:
    with (
        ScriptedLLM(default=Reply("ok")) as llm,
        berth_with(tmp_path, llm, llm_prices=PRICES, spend_day_usd=2.0) as (base, token),
    ):
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{base}/v1/chat/completions"

        def call(i: int) -> httpx.Response:
            return httpx.post(url, json={"messages": ask(f"{i}")}, headers=headers, timeout=30)

        assert call(1).status_code == 200  # $0 spent today
        assert call(2).status_code == 200  # $1.50: still under $2
        refused = call(3)  # $3 spent
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        body = refused.json()
        ends = next_day(datetime.now(UTC))
        assert body["limit"] == {
            "name": "spend_day_usd", "value": 2.0, "unit": "USD", "used": 3.0,
            "resets_at": iso(ends),
        }  # fmt: skip
        assert "BERTH_SPEND_DAY_USD" in body["detail"] and iso(ends) in body["detail"]
        wait = (ends - datetime.now(UTC)).total_seconds()
        assert abs(int(refused.headers["retry-after"]) - math.ceil(wait)) <= 5

        # An admin lifts the daily limit for this user and sets a monthly one.
        engine = get_engine(f"sqlite:///{tmp_path / 'berth.db'}")
        with Session(engine) as db:
            user = db.exec(select(User)).one()
            user.is_admin = True
            db.add(user)
            db.commit()
            user_id = user.id
        limits = f"{base}/api/admin/users/{user_id}/limits"
        wanted = {"spend_day_usd": 0, "spend_month_usd": 4.0}
        set_ = httpx.put(limits, json=wanted, headers=headers)
        assert set_.status_code == 200, set_.text
        assert set_.json()["spend_day_usd"] == 0 and set_.json()["spend_month_usd"] == 4.0
        assert set_.json()["overrides"]["kept_disks"] is None
        assert call(4).status_code == 200  # $3 of $4 this month
        refused = call(5)
        assert refused.status_code == 429
        assert refused.json()["limit"]["name"] == "spend_month_usd"
        assert refused.json()["limit"]["resets_at"] == iso(next_month(datetime.now(UTC)))
        # Back to the settings' daily limit: null is the setting's.
        httpx.put(limits, json={}, headers=headers)
        assert httpx.get(limits, headers=headers).json()["spend_day_usd"] == 2.0


def test_calls_in_flight_count_at_their_most_against_the_spend_limit(tmp_path: Path) -> None:
    # One call may cost at most 100 tokens at $1 each: $100; the limit is $150. Of calls
    # started together, the first two fit (0, then 100 reserved), the rest are refused.
    with (
        ScriptedLLM(default=Reply("ok", hang_s=1.0)) as slow,
        berth_with(
            tmp_path, slow, llm_prices={"model-0": (0.0, 1_000_000.0)}, llm_max_tokens=100,
            spend_day_usd=150.0,
        ) as (base, token),
    ):  # fmt: skip
        headers = {"Authorization": f"Bearer {token}"}

        def call(i: int) -> int:
            body = {"messages": ask(f"{i}"), "max_tokens": 100}
            url = f"{base}/v1/chat/completions"
            return httpx.post(url, json=body, headers=headers, timeout=30).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = sorted(pool.map(call, range(4)))
        assert statuses == [200, 200, 429, 429]


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    settings = Settings(
        data_dir=tmp_path,
        sandbox_provider="docker",
        kept_disks_per_user=2,
        kept_bytes_per_user=10_000,
        kept_max_age_days=30,
        temporal_address="127.0.0.1:9",  # a refusal is decided before Temporal is asked
        **FAST_PASSWORDS,
    )
    with TestClient(create_app(settings)) as client:
        yield client, settings


def kept_session(settings: Settings, user: User, ended: datetime) -> tuple[str, str]:
    """A session of ``user`` that ended at ``ended`` keeping its sandbox's disk, as the
    worker's events record it: (session id, sandbox id)."""
    engine = get_engine(settings.db_url)
    sandbox_id = uuid.uuid4().hex
    with Session(engine) as db:
        row = SessionRow(user_id=user.id)
        db.add(row)
        db.commit()
        ready = {
            "sandbox_id": sandbox_id, "provider": "docker", "host_id": settings.host_id,
            "template": "default", "handle": f"berth-{sandbox_id}",
        }  # fmt: skip
        drafts: list[tuple[EventType, dict[str, Any]]] = [
            (EventType.sandbox_ready, ready),
            (EventType.sandbox_preserved, {"sandbox_id": sandbox_id}),
            (EventType.session_status, {"status": "ended"}),
        ]
        events.append(db, row.id, [NewEvent(type=kind, data=data) for kind, data in drafts])
        row.ended_at = ended  # as if it ended then
        db.add(row)
        db.commit()
        return row.id, sandbox_id


def test_kept_disks_are_capped_measured_and_removed_past_their_age(
    system: tuple[TestClient, Settings],
) -> None:
    client, settings = system
    engine = get_engine(settings.db_url)
    with Session(engine) as db:
        owner = make_user(db, "keeper@example.com")
        db.expunge(owner)
    headers = {"Authorization": f"Bearer {bearer(engine, settings, owner)}"}
    now = datetime.now(UTC)
    old_id, old_sandbox = kept_session(settings, owner, now - timedelta(days=31))
    new_id, new_sandbox = kept_session(settings, owner, now - timedelta(days=1))
    with Session(engine) as db:
        live = SessionRow(user_id=owner.id)
        db.add(live)
        db.commit()
        live_id = live.id

    # The dates each kept disk will be removed, shown beforehand.
    shown = client.get(f"/api/sessions/{new_id}", headers=headers).json()
    ended = datetime.fromisoformat(shown["ended_at"])
    assert datetime.fromisoformat(shown["kept_until"]) == ended + timedelta(days=30)
    client.cookies.set(COOKIE, headers["Authorization"].removeprefix("Bearer "))
    page = client.get(f"/sessions/{new_id}")
    client.cookies.clear()
    until = datetime.fromisoformat(shown["kept_until"]).strftime("%Y-%m-%d %H:%M")
    assert f"its disk is kept until {until} UTC, then removed" in page.text

    # Two kept of two: a third is refused, saying when the oldest goes.
    refused = client.delete(f"/api/sessions/{live_id}?preserve=true", headers=headers)
    assert refused.status_code == 429, refused.text
    body = refused.json()
    oldest = datetime.fromisoformat(
        client.get(f"/api/sessions/{old_id}", headers=headers).json()["kept_until"]
    )
    assert body["limit"] == {
        "name": "kept_disks_per_user", "value": 2, "unit": "disks", "used": 2,
        "resets_at": iso(oldest),
    }  # fmt: skip
    assert "BERTH_KEPT_DISKS_PER_USER" in body["detail"]

    # The host measures the kept disks and removes the one past its age.
    provider = make_provider(settings, make_gateway(settings))
    for sandbox_id in (old_sandbox, new_sandbox):
        folder = provider.preserved(sandbox_id)
        folder.mkdir(parents=True)
        (folder / "workspace.tar").write_bytes(b"x" * 12_000)
    report = KeptDisks(provider, engine, settings.kept_max_age_days).sweep_once()
    assert report.removed == [old_sandbox] and report.measured == 1
    assert not provider.preserved(old_sandbox).exists()
    assert provider.preserved(new_sandbox).exists()
    with Session(engine) as db:
        assert db.get(SandboxRow, old_sandbox).status == "expired"  # type: ignore[union-attr]
        assert db.get(SandboxRow, new_sandbox).kept_bytes >= 12_000  # type: ignore[union-attr, operator]
        assert not db.get(SessionRow, old_id).preserved  # type: ignore[union-attr]
    gone = client.get(f"/api/sessions/{old_id}", headers=headers).json()
    assert gone["preserved"] is False and gone["kept_until"] is None
    assert client.post(f"/api/sessions/{old_id}/resume", headers=headers).status_code == 409
    with Session(engine) as db:
        said = events.read_after(db, old_id, 0)
    assert said[-1].type == EventType.sandbox_kept_expired
    assert said[-1].data == {"sandbox_id": old_sandbox, "days": 30}

    # One kept now, but its bytes are past the cap.
    refused = client.delete(f"/api/sessions/{live_id}?preserve=true", headers=headers)
    assert refused.status_code == 429
    assert refused.json()["limit"]["name"] == "kept_bytes_per_user"
    assert refused.json()["limit"]["value"] == 10_000
