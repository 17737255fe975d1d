"""Preferences: validated against the bounds and the configuration (JSON API and the
dashboard's form), applied to new sessions (the workflow's input, read back from Temporal),
and the preferred model used by the planner (the whole system with two scripted providers)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from berth.web import create_app
from config.settings import LLMProvider, Settings
from llm.models import Caller, ChatRequest
from llm.proxy import LLMProxy
from store.events import EventType
from tests.e2e.test_system import read_events, token_for, wait_status
from tests.support.local import LocalSystem
from tests.support.scripted_llm import Reply, ScriptedLLM
from tests.support.world import FAST_PASSWORDS, PASSWORD
from tests.ui.test_dashboard import ORIGIN, log_in
from workflows.client import connect, workflow_id
from workflows.models import SessionInput

PROVIDERS = [
    LLMProvider(name="first", model="alpha", base_url="http://127.0.0.1:9/v1", api_key="k"),
    LLMProvider(name="second", model="beta", base_url="http://127.0.0.1:9/v1", api_key="k"),
]


def settings_for(data: Path, temporal_address: str | None = None) -> Settings:
    return Settings(
        data_dir=data,
        # Unset, nothing listens there: routes that need Temporal say it is down.
        temporal_address=temporal_address or "127.0.0.1:9",
        llm_providers=PROVIDERS,
        session_hibernate_after_s=600,
        session_idle_timeout_s=3600,
        **FAST_PASSWORDS,
    )


def bearer(client: TestClient, email: str = "pat@example.com") -> dict[str, str]:
    credentials = {"email": email, "password": PASSWORD}
    assert client.post("/api/auth/signup", json=credentials).status_code == 201
    token = client.post("/api/auth/token", json=credentials).json()["token"]
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tmp_path)), follow_redirects=False) as client:
        yield client


def test_preferences_start_as_the_defaults_with_the_configured_choices(
    client: TestClient,
) -> None:
    got = client.get("/api/preferences", headers=bearer(client)).json()
    assert {k: got[k] for k in ("template", "model", "hibernate_after_s", "idle_timeout_s")} == {
        "template": None, "model": None, "hibernate_after_s": None, "idle_timeout_s": None,
    }  # fmt: skip
    assert got["defaults"] == {
        "template": "default", "hibernate_after_s": 600.0, "idle_timeout_s": 3600.0,
    }  # fmt: skip
    assert got["models"] == ["alpha", "first", "beta", "second"]
    assert "default" in got["templates"]
    assert client.get("/api/preferences").status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"hibernate_after_s": 59}, "hibernate_after_s"),
        ({"hibernate_after_s": 86401}, "hibernate_after_s"),
        ({"idle_timeout_s": 299}, "idle_timeout_s"),
        ({"idle_timeout_s": 7 * 86400 + 1}, "idle_timeout_s"),
        ({"idle_timeout_s": "soon"}, "idle_timeout_s"),
        ({"template": "nope"}, "template"),
        ({"model": "gpt-nonesuch"}, "model"),
        # Not shorter than the idle timeout given, or than the default one (3600 s).
        ({"hibernate_after_s": 900, "idle_timeout_s": 900}, "hibernate_after_s"),
        ({"hibernate_after_s": 4000}, "hibernate_after_s"),
        # Below the default hibernation (600 s): the session would end before hibernating.
        ({"idle_timeout_s": 300}, "idle_timeout_s"),
    ],
)
def test_refused_preferences_are_problems_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    headers = bearer(client)
    answer = client.put("/api/preferences", json=body, headers=headers)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert [e["loc"] for e in answer.json()["errors"]] == [["body", field]]
    # Nothing was saved.
    assert client.get("/api/preferences", headers=headers).json()["hibernate_after_s"] is None


def test_preferences_are_replaced_whole_and_kept_per_user(client: TestClient) -> None:
    mine, theirs = bearer(client), bearer(client, "other@example.com")
    wanted = {"template": "default", "model": "beta", "hibernate_after_s": 120,
              "idle_timeout_s": 900}  # fmt: skip
    saved = client.put("/api/preferences", json=wanted, headers=mine)
    assert saved.status_code == 200
    assert {k: saved.json()[k] for k in wanted} == wanted
    assert client.get("/api/preferences", headers=theirs).json()["model"] is None
    # A provider's name does as well as its model.
    client.put("/api/preferences", json={"model": "second"}, headers=mine)
    got = client.get("/api/preferences", headers=mine).json()
    assert (got["model"], got["hibernate_after_s"], got["template"]) == ("second", None, None)


def test_the_form_keeps_what_was_typed_and_says_why_with_a_real_status(
    client: TestClient,
) -> None:
    csrf = log_in(client)
    page = client.get("/preferences")
    assert page.status_code == 200
    # Every input has a label of its own and a hint it is described by.
    for name in ("template", "model", "hibernate_after_s", "idle_timeout_s"):
        assert f'<label for="{name}">' in page.text and f'id="{name}" name="{name}"' in page.text
    # The four preferences, and the webhooks section's URL.
    assert page.text.count('aria-describedby="') == 5
    assert '<option value="second">second (beta)</option>' in page.text
    headers = {"HX-Request": "true", "Origin": ORIGIN, "X-CSRF-Token": csrf}
    typed = {"template": "", "model": "second", "hibernate_after_s": "5000",
             "idle_timeout_s": "4000"}  # fmt: skip
    refused = client.post("/ui/preferences", data=typed, headers=headers)
    assert refused.status_code == 422
    assert refused.text.lstrip().startswith('<form id="preferences"')  # the fragment only
    assert 'value="5000"' in refused.text and 'value="4000"' in refused.text
    assert '<option value="second" selected>' in refused.text
    assert re.search(r'id="hibernate_after_s-error" class="error">[^<]*shorter', refused.text)
    assert 'aria-invalid="true"' in refused.text and "Saved" not in refused.text
    typed["hibernate_after_s"] = "abc"
    unparsed = client.post("/ui/preferences", data=typed, headers=headers)
    assert unparsed.status_code == 422 and 'value="abc"' in unparsed.text
    assert "a whole number" in unparsed.text

    typed["hibernate_after_s"] = "1800"
    saved = client.post("/ui/preferences", data=typed, headers=headers)
    assert saved.status_code == 200 and "Saved" in saved.text
    again = client.get("/preferences").text
    assert 'value="1800"' in again and '<option value="second" selected>' in again
    # Without the page's CSRF token, nothing is saved.
    forged = client.post("/ui/preferences", data={"model": "alpha"}, headers={"Origin": ORIGIN})
    assert forged.status_code == 403
    assert '<option value="second" selected>' in client.get("/preferences").text


async def test_a_new_session_starts_with_the_users_preferences(
    temporal_address: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, temporal_address)
    with TestClient(create_app(settings)) as client:
        mine, theirs = bearer(client), bearer(client, "other@example.com")
        wanted = {"template": "default", "model": "beta", "hibernate_after_s": 120,
                  "idle_timeout_s": 900}  # fmt: skip
        assert client.put("/api/preferences", json=wanted, headers=mine).status_code == 200
        # No body: the preferred template.
        preferred = client.post("/api/sessions", headers=mine)
        assert preferred.status_code == 201 and preferred.json()["template"] == "default"
        default = client.post("/api/sessions", json={}, headers=theirs)
        assert default.status_code == 201
    temporal = await connect(settings)

    async def started_with(sid: str) -> SessionInput:
        history = await temporal.get_workflow_handle(workflow_id(sid)).fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        [params] = await temporal.data_converter.decode(started.input.payloads, [SessionInput])
        assert isinstance(params, SessionInput)
        return params

    params = await started_with(preferred.json()["id"])
    assert (params.template, params.model) == ("default", "beta")
    assert (params.hibernate_after_s, params.idle_timeout_s) == (120, 900)
    params = await started_with(default.json()["id"])
    assert params.model is None
    assert (params.hibernate_after_s, params.idle_timeout_s) == (600, 3600)


async def test_the_preferred_provider_goes_first_and_the_others_remain_fallbacks(
    engine: Engine,
) -> None:
    with ScriptedLLM(default="from one") as one, ScriptedLLM(default=Reply(status=500)) as two:
        providers = [
            LLMProvider(name=name, model=f"{name}-model", base_url=f"{s.url}/v1", api_key="k")
            for name, s in (("one", one), ("two", two))
        ]
        proxy = LLMProxy(Settings(llm_providers=providers, llm_retries=0), engine)
        caller = Caller(user_id="u")
        ask = ChatRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.5)
        result = await proxy.complete(ask, caller, prefer="two-model")
        # Two was asked first, failed, and one answered.
        assert (len(two.requests), len(one.requests), result.provider) == (1, 1, "one")
        # An unknown preference (the configuration changed) leaves the configured order.
        assert (await proxy.complete(ask, caller, prefer="gone")).provider == "one"


@pytest.mark.e2e
def test_the_planner_asks_the_preferred_model_first(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    plan = {"steps": [{"kind": "terminal", "command": "echo planned by beta"}]}
    verdict = {"ok": True, "answer": "planned by beta", "reason": "shown"}

    def script(body: dict[str, Any]) -> str:
        checking = body["messages"][0]["content"].startswith("You check the work")
        return json.dumps(verdict if checking else plan)

    with ScriptedLLM(script=script) as alpha, ScriptedLLM(script=script) as beta:
        providers = [
            {"name": "first", "model": "alpha", "base_url": f"{alpha.url}/v1", "api_key": "k"},
            {"name": "second", "model": "beta", "base_url": f"{beta.url}/v1", "api_key": "k"},
        ]
        running = LocalSystem.start(
            tmp_path_factory.mktemp("berth-prefs"),
            "prefs",
            {"BERTH_LLM_PROVIDERS": json.dumps(providers)},
        )
        try:
            base = running.base
            headers = token_for(base, "prefs@example.com")
            put = httpx.put(f"{base}/api/preferences", json={"model": "second"}, headers=headers)
            assert put.status_code == 200, put.text
            sid = httpx.post(f"{base}/api/sessions", headers=headers).json()["id"]
            wait_status(base, headers, sid, "ready")
            task = httpx.post(
                f"{base}/api/sessions/{sid}/tasks",
                json={"prompt": "say who planned this"},
                headers=headers,
            ).json()
            events = read_events(
                base, headers, sid,
                lambda e: e["type"] == EventType.task_status
                and e["data"]["status"] in ("succeeded", "failed"),
            )  # fmt: skip
            status = [e["data"]["status"] for e in events if e["type"] == EventType.task_status]
            assert status[-1] == "succeeded", events
            planned = next(e["data"] for e in events if e["type"] == EventType.task_plan)
            assert (planned["provider"], planned["task_id"]) == ("second", task["id"])
            assert [r["body"]["model"] for r in beta.requests] == ["beta", "beta"]
            assert alpha.requests == []
            httpx.delete(f"{base}/api/sessions/{sid}", headers=headers)
        finally:
            assert running.stop() == 0
