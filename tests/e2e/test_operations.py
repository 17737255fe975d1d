"""Operating Berth, end to end on one system started as `make run` starts it: a task shows in
the API's and the worker's /metrics (and the Temporal SDK's), in JSON log lines that name its
session, task and step without the prompt's words, and in the Temporal UI's list filtered by
its user (search attributes), with a summary readable without the codec."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session

from config.settings import Settings
from store.db import get_engine
from store.events import EventType
from store.models import SessionRow
from tests.e2e.test_system import read_events, token_for, wait_status
from tests.support.local import LocalSystem, quiet_port
from tests.support.scripted_llm import ScriptedLLM
from workflows import search

METRICS_TOKEN = "scrape-me-please"
# A word only the prompts carry: it must not reach the log at INFO.
PROMPT_WORD = "quetzalcoatl"


@dataclass
class Operated:
    system: LocalSystem
    worker_metrics: str
    temporal_metrics: str
    headers: dict[str, str]
    sid: str
    tasks: list[str]
    llm: ScriptedLLM


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text answer, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= ls)


def run_task(base: str, headers: dict[str, str], sid: str, prompt: str, after: int) -> int:
    """Run a task while a stream follows the log from ``after`` (so its lines reach the
    stream as they are written); the last event's sequence number once it has ended."""
    tid: list[str] = []

    def ended(event: dict[str, Any]) -> bool:
        data = event["data"]
        return (
            event["type"] == EventType.task_status
            and data["task_id"] in tid
            and data["status"] in ("succeeded", "failed", "cancelled")
        )

    with ThreadPoolExecutor(1) as pool:
        following = pool.submit(read_events, base, headers, sid, ended, after)
        time.sleep(1)  # the stream's first read is done: what follows comes live
        task = httpx.post(
            f"{base}/api/sessions/{sid}/tasks", json={"prompt": prompt}, headers=headers
        )
        assert task.status_code == 202, task.text
        tid.append(task.json()["id"])
        seen = following.result(timeout=180)
    return int(seen[-1]["seq"])


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operated]:
    worker_port, temporal_port = quiet_port(), quiet_port()
    with ScriptedLLM(default="a scripted answer") as llm:
        system = LocalSystem.start(
            tmp_path_factory.mktemp("berth-ops"),
            "ops",
            {
                **llm.settings,
                "BERTH_LOG_FORMAT": "json",
                "BERTH_METRICS_TOKEN": METRICS_TOKEN,
                "BERTH_WORKER_METRICS_PORT": str(worker_port),
                "BERTH_TEMPORAL_METRICS_PORT": str(temporal_port),
            },
        )
        try:
            base = system.base
            headers = token_for(base, "ops@example.com")
            sid = httpx.post(f"{base}/api/sessions", json={}, headers=headers).json()["id"]
            wait_status(base, headers, sid, "ready")
            after = run_task(base, headers, sid, f"$ echo {PROMPT_WORD}", 0)
            # Refused by the default policy (inline code): a refusal, and an error.
            run_task(base, headers, sid, f"$ python3 -c 'print(\"{PROMPT_WORD}\")'", after)
            tasks = [
                t["id"]
                for t in httpx.get(f"{base}/api/sessions/{sid}/tasks", headers=headers).json()
            ]
            yield Operated(
                system,
                f"http://127.0.0.1:{worker_port}/metrics",
                f"http://127.0.0.1:{temporal_port}/metrics",
                headers,
                sid,
                tasks,
                llm,
            )
        finally:
            httpx.delete(f"{system.base}/api/sessions/{sid}", headers=headers)
            assert system.stop() == 0, system.log()[-3000:]


def test_the_api_serves_metrics_to_its_token_only(operated: Operated) -> None:
    base = operated.system.base
    assert httpx.get(f"{base}/metrics").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{base}/metrics", headers=wrong).status_code == 401
    # A model call through the API's proxy: counted by provider, with its tokens.
    answer = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "scripted", "messages": [{"role": "user", "content": "hello"}]},
        headers=operated.headers,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    scraped = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    found = samples(scraped.text)
    assert value(found, "berth_sessions", status="ready", template="default") >= 1
    assert value(found, "berth_model_calls_total", cached="false") >= 1
    assert value(found, "berth_model_tokens_total", kind="completion") >= 5
    # The test's stream read the output line as it was written.
    assert value(found, "berth_stream_delay_seconds_count") >= 1
    assert value(found, "berth_stream_delay_seconds_sum") < 30


def test_the_worker_counts_the_task_its_steps_and_its_refusal(operated: Operated) -> None:
    found = samples(httpx.get(operated.worker_metrics).text)
    steps = value(found, "berth_activity_duration_seconds_count", activity="RunStep", outcome="ok")
    assert steps >= 1
    assert value(found, "berth_activity_duration_seconds_count", activity="ProvisionSandbox") >= 1
    assert value(found, "berth_activity_duration_seconds_sum", activity="RunStep") > 0
    assert value(found, "berth_policy_refusals_total", template="default") >= 1
    assert value(found, "berth_errors_total", kind="CommandRefused") >= 1
    # The SDK's own metrics, on their own port.
    sdk = httpx.get(operated.temporal_metrics).text
    assert any(f.name.startswith("temporal_") for f in text_string_to_metric_families(sdk))


def test_the_sandbox_use_is_a_gauge_of_its_session(operated: Operated) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = samples(httpx.get(operated.worker_metrics).text)
        if value(found, "berth_sandbox_memory_bytes", session=operated.sid) > 0:
            return
        time.sleep(1)
    raise AssertionError("the sandbox's use was never sampled into its gauge")


def test_every_process_logs_json_lines_with_the_ids_and_no_prompt(operated: Operated) -> None:
    lines = [line for line in operated.system.log().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    assert {"run", "worker", "api"} <= {p["process"] for p in parsed}
    assert all({"ts", "level", "process", "host", "message"} <= set(p) for p in parsed)
    refused, ran = operated.tasks[1], operated.tasks[0]
    step_lines = [p for p in parsed if p.get("task") == ran and p.get("session") == operated.sid]
    assert any("RunStep" in p["message"] and p.get("step") == "0" for p in step_lines)
    assert any(
        p.get("task") == refused and p["level"] == "warning" and "CommandRefused" in p["message"]
        for p in parsed
    )
    assert any(p.get("trace") and "/api/sessions" in p["message"] for p in parsed)
    # Whatever else printed (a child's stray output) is not a log line of ours.
    at_info = [line for line in lines if line.startswith("{") and '"level": "info"' in line]
    assert not [line for line in at_info if PROMPT_WORD in line]
    # No secret at any level: the scraper's token, the provider's key, the user's token.
    token = operated.headers["Authorization"].removeprefix("Bearer ")
    for secret in (METRICS_TOKEN, operated.llm.settings["OPENAI_API_KEY"], token):
        assert secret not in operated.system.log()


def test_the_temporal_ui_finds_the_session_by_its_user_without_the_codec(
    operated: Operated,
) -> None:
    with Session(get_engine(Settings(data_dir=operated.system.data).db_url)) as db:
        row = db.get(SessionRow, operated.sid)
        assert row is not None
        user = row.user_id

    async def ask() -> tuple[list[str], Any]:
        client = await operated.system.client()
        found = [w.id async for w in client.list_workflows(f'BerthUser="{user}"')]
        return found, await client.get_workflow_handle(f"session-{operated.sid}").describe()

    found, described = asyncio.run(ask())
    assert found == [f"session-{operated.sid}"]
    attributes = described.typed_search_attributes
    assert attributes.get(search.STATUS) == "ready"
    assert attributes.get(search.TEMPLATE) == "default"
    assert attributes.get(search.HOST).startswith("ops")
    # Plain JSON, not the codec's ciphertext: the session and its state, nothing the user wrote.
    metadata = described.raw_description.execution_config.user_metadata
    for payload in (metadata.summary, metadata.details):
        assert payload.metadata["encoding"] == b"json/plain"
        text = json.loads(payload.data)
        assert operated.sid in text and PROMPT_WORD not in text
