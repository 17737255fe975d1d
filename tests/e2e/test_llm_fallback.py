"""The whole system with two LLM providers, the first one down: prose tasks still plan,
the event stream says which provider answered, the same task again is planned from the
cache, usage shows per task, and the official ``openai`` client talks to Berth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai

from store.events import EventType
from tests.e2e.test_system import DONE, read_events, token_for, wait_status
from tests.support.local import LocalSystem
from tests.support.scripted_llm import Reply, ScriptedLLM

PLAN = json.dumps({"steps": [{"command": "echo planned by the backup"}]})
VERDICT = json.dumps({"ok": True, "answer": "planned by the backup", "reason": "said"})


def backup_model(body: dict[str, Any]) -> str:
    """The backup plans, and checks the result against the goal."""
    verifying = body["messages"][0]["content"].startswith("You check the work")
    return VERDICT if verifying else PLAN


def test_tasks_plan_through_the_fallback_provider_and_the_cache(tmp_path: Path) -> None:
    with ScriptedLLM(default=Reply(status=500)) as down, ScriptedLLM(script=backup_model) as backup:
        providers = [
            {"name": "primary", "model": "big", "base_url": f"{down.url}/v1", "api_key": "k1"},
            {"name": "backup", "model": "small", "base_url": f"{backup.url}/v1", "api_key": "k2"},
        ]
        env = {
            "BERTH_LLM_PROVIDERS": json.dumps(providers),
            "BERTH_LLM_PRICES": json.dumps({"small": [1.0, 2.0]}),
            "BERTH_LLM_BACKOFF_S": "0.05",
        }
        system = LocalSystem.start(tmp_path / "berth", "llm", env=env)
        try:
            base = system.base
            headers = token_for(base, "planner@example.com")
            sid = post(base, "/api/sessions", headers, {}).json()["id"]
            wait_status(base, headers, sid, "ready")

            prompt = {"prompt": "say that the backup planned this"}
            first = post(base, f"/api/sessions/{sid}/tasks", headers, prompt).json()["id"]
            events = read_events(base, headers, sid, DONE)
            (plan,) = [e["data"] for e in events if e["type"] == EventType.task_plan]
            assert plan["provider"] == "backup" and plan["cached"] is False
            output = "".join(
                e["data"]["text"] for e in events if e["type"] == EventType.step_output
            )
            assert output == "planned by the backup\n"

            second = post(base, f"/api/sessions/{sid}/tasks", headers, prompt).json()["id"]
            more = read_events(base, headers, sid, DONE, after=events[-1]["seq"])
            (again,) = [e["data"] for e in more if e["type"] == EventType.task_plan]
            assert again["provider"] == "backup" and again["cached"] is True
            (verified,) = [e["data"] for e in more if e["type"] == EventType.task_verified]
            assert verified["provider"] == "backup" and verified["cached"] is True
            # The first task's plan and verification reached the backup; the second's never
            # reached a provider.
            assert len(backup.requests) == 2
            assert all(r["body"]["temperature"] == 0 for r in backup.requests)

            usage = get(base, "/api/usage", headers)
            by_task = {t["task_id"]: t for t in usage["tasks"]}
            assert by_task[first]["total_tokens"] == 30 and by_task[first]["cost_usd"] > 0
            assert by_task[second]["cached_calls"] == 2 and by_task[second]["total_tokens"] == 0
            detail = get(base, f"/api/sessions/{sid}/tasks/{first}", headers)
            assert detail["llm"]["total_tokens"] == 30

            token = headers["Authorization"].removeprefix("Bearer ")
            llm = openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0)
            reply = llm.chat.completions.create(
                model="berth", messages=[{"role": "user", "content": "plan?"}]
            )
            assert reply.choices[0].message.content == PLAN and reply.model == "small"
            pieces = llm.chat.completions.create(
                model="small", messages=[{"role": "user", "content": "plan?"}], stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == PLAN
        finally:
            assert system.stop() == 0


def post(base: str, path: str, headers: dict[str, str], body: object) -> httpx.Response:
    response = httpx.post(f"{base}{path}", json=body, headers=headers)
    assert response.status_code in (201, 202), response.text
    return response


def get(base: str, path: str, headers: dict[str, str]) -> Any:
    response = httpx.get(f"{base}{path}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()
