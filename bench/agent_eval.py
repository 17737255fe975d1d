"""The agent evaluation: ``make eval-agent`` (``python -m berth eval agent``).

It starts the whole system (``make run``'s, mock mode: Docker sandboxes) on free ports with a
fresh data dir and its own pages (agent_pages.py), then runs every task of agent_tasks.py once
per configured LLM provider (``BERTH_LLM_PROVIDERS``, or ``BERTH_LLM_MODEL``), each in a fresh
session: the task's files are written, the task is given as prose, and once it has ended its
grader runs in the same sandbox. It prints a markdown table and writes JSON (``--out``):
success, steps, revisions, refusals, tokens, cost and wall time per task, and in total per
provider. Not part of ``make test``: it calls real models, which cost money.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.agent_pages import serve
from bench.agent_tasks import GRADER_HEAD, TASKS, EvalTask
from config.settings import Settings
from llm.providers import provider_configs
from sandboxes.docker import NETWORK
from store.events import EventType
from tests.support.local import LocalSystem, free_port

ENDED = ("succeeded", "failed", "cancelled")
TASK_TIMEOUT_S = 600.0
PASSWORD = "correct horse battery"


@dataclass
class Result:
    task: str
    kind: str
    provider: str
    success: bool
    status: str
    steps: int
    revisions: int
    refusals: int
    tokens: int
    cost_usd: float
    wall_s: float
    error: str | None = None


def file_plan(files: dict[str, str]) -> str:
    """A written plan (JSON steps, no model) that writes ``files`` in the workspace."""
    steps = [{"kind": "file", "op": "write", "path": p, "content": c} for p, c in files.items()]
    return json.dumps({"steps": steps})


def grader_plan(task: EvalTask, web: str) -> str:
    """The grader as a written plan: its script written, then run (exit 0: passed)."""
    source = GRADER_HEAD + task.grader.replace("{web}", web) + "\nprint('PASS')\n"
    return json.dumps({"steps": [
        {"kind": "file", "op": "write", "path": ".eval/grade.py", "content": source},
        {"kind": "terminal", "command": "python3 .eval/grade.py",
         "check": {"kind": "output_contains", "value": "PASS"}},
    ]})  # fmt: skip


class Client:
    """One user of the system, through the JSON API only."""

    def __init__(self, base: str, email: str) -> None:
        self.base = base
        self.http = httpx.Client(base_url=f"{base}/api", timeout=60)
        credentials = {"email": email, "password": PASSWORD}
        self.http.post("/auth/signup", json=credentials)
        token = self.http.post("/auth/token", json=credentials).json()["token"]
        self.http.headers["Authorization"] = f"Bearer {token}"

    def prefer(self, model: str) -> None:
        current = self.http.get("/preferences").json()
        current.pop("models", None)
        self.http.put("/preferences", json={**current, "model": model}).raise_for_status()

    def session(self) -> str:
        made = self.http.post("/sessions", json={})
        made.raise_for_status()
        sid: str = made.json()["id"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = self.http.get(f"/sessions/{sid}").json()["status"]
            if status == "ready":
                return sid
            if status in ("failed", "ended"):
                raise RuntimeError(f"session {sid} ended before it was ready: {status}")
            time.sleep(0.5)
        raise TimeoutError(f"session {sid} was not ready in 300 s")

    def task(self, sid: str, prompt: str) -> dict[str, Any]:
        """Submits a task and waits for it to end: its final state."""
        made = self.http.post(f"/sessions/{sid}/tasks", json={"prompt": prompt})
        made.raise_for_status()
        tid = made.json()["id"]
        deadline = time.monotonic() + TASK_TIMEOUT_S
        while time.monotonic() < deadline:
            task: dict[str, Any] = self.http.get(f"/sessions/{sid}/tasks/{tid}").json()
            if task["status"] in ENDED:
                return task
            time.sleep(0.5)
        self.http.post(f"/sessions/{sid}/tasks/{tid}/cancel")
        raise TimeoutError(f"task {tid} did not end in {TASK_TIMEOUT_S:.0f} s")

    def revisions(self, sid: str, tid: str) -> int:
        """The task's revised plans, from the session's event stream (read to its end)."""
        revised = 0
        url = f"/sessions/{sid}/events"
        with self.http.stream("GET", url, headers={"Last-Event-ID": "0"}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                kind, data = event["type"], event["data"]
                if data.get("task_id") != tid:
                    continue
                revised += kind == EventType.task_plan and bool(data.get("revised"))
                if kind == EventType.task_status and data.get("status") in ENDED:
                    break
        return revised

    def end(self, sid: str) -> None:
        self.http.delete(f"/sessions/{sid}")


def run_task(client: Client, task: EvalTask, provider: str, web: str) -> Result:
    """The task in a fresh session: set up, run, graded."""
    sid = client.session()
    try:
        if task.files:
            setup = client.task(sid, file_plan(task.files))
            if setup["status"] != "succeeded":
                raise RuntimeError(f"setting up the task failed: {setup['error']}")
        started = time.monotonic()
        ran = client.task(sid, task.prompt.replace("{web}", web))
        wall = time.monotonic() - started
        graded = client.task(sid, grader_plan(task, web))
        why = "".join(s["output"] for s in graded["steps"][-1:]).strip()
        return Result(
            task=task.name,
            kind=task.kind,
            provider=provider,
            success=graded["status"] == "succeeded",
            status=ran["status"],
            steps=len(ran["steps"]),
            revisions=client.revisions(sid, ran["id"]),
            refusals=sum(s["status"] == "refused" for s in ran["steps"]),
            tokens=ran["llm"]["total_tokens"],
            cost_usd=ran["llm"]["cost_usd"],
            wall_s=round(wall, 2),
            error=None if graded["status"] == "succeeded" else (why or graded["error"]),
        )
    finally:
        client.end(sid)


def failed(task: EvalTask, provider: str, exc: Exception) -> Result:
    return Result(task.name, task.kind, provider, False, "error", 0, 0, 0, 0, 0.0, 0.0, str(exc))


def evaluate(
    base: str, web: str, providers: list[str], tasks: list[EvalTask], log: Callable[[str], None]
) -> list[Result]:
    results: list[Result] = []
    for provider in providers:
        client = Client(base, f"eval-{provider}@example.com".replace(":", "-"))
        client.prefer(provider)
        for task in tasks:
            try:
                result = run_task(client, task, provider, web)
            except Exception as exc:  # one task's failure is its row, not the run's end
                result = failed(task, provider, exc)
            log(f"{provider} {task.name}: {'pass' if result.success else 'FAIL'}")
            results.append(result)
    return results


def totals(results: list[Result]) -> dict[str, dict[str, Any]]:
    """Per provider: the success rate, and the sums."""
    out: dict[str, dict[str, Any]] = {}
    for provider in dict.fromkeys(r.provider for r in results):
        mine = [r for r in results if r.provider == provider]
        out[provider] = {
            "tasks": len(mine),
            "passed": sum(r.success for r in mine),
            "success_rate": round(sum(r.success for r in mine) / len(mine), 3),
            "steps": sum(r.steps for r in mine),
            "revisions": sum(r.revisions for r in mine),
            "refusals": sum(r.refusals for r in mine),
            "tokens": sum(r.tokens for r in mine),
            "cost_usd": round(sum(r.cost_usd for r in mine), 4),
            "wall_s": round(sum(r.wall_s for r in mine), 1),
        }
    return out


def table(results: list[Result]) -> str:
    columns = [
        "provider",
        "task",
        "kind",
        "pass",
        "steps",
        "revisions",
        "refusals",
        "tokens",
        "cost_$",
        "wall_s",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in results:
        lines.append(
            f"| {r.provider} | {r.task} | {r.kind} | {'yes' if r.success else 'no'} | {r.steps} "
            f"| {r.revisions} | {r.refusals} | {r.tokens} | {r.cost_usd:.4f} | {r.wall_s} |"
        )
    for provider, t in totals(results).items():
        lines.append(
            f"| **{provider}** | **total** | | **{t['passed']}/{t['tasks']}** | {t['steps']} "
            f"| {t['revisions']} | {t['refusals']} | {t['tokens']} | {t['cost_usd']:.4f} "
            f"| {t['wall_s']} |"
        )
    return "\n".join(lines)


def report(results: list[Result]) -> dict[str, Any]:
    return {"tasks": [asdict(r) for r in results], "totals": totals(results)}


def bridge_address() -> str:
    """Where Docker sandboxes reach the host: their bridge's gateway."""
    return subprocess.run(
        ["docker", "network", "inspect", NETWORK, "--format",
         "{{(index .IPAM.Config 0).Gateway}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


@contextmanager
def system_with_pages(env: dict[str, str], data: Path) -> Iterator[tuple[str, str]]:
    """The whole system, and the suite's pages where its sandboxes may reach them: the
    API's base URL and the pages'."""
    port = free_port()
    running = LocalSystem.start(data, "eval", {**env, "BERTH_SANDBOX_HOST_PORTS": f"[{port}]"})
    try:
        host = bridge_address()  # the bridge exists once the system has made it
        with serve(host, port):
            yield running.base, f"http://{host}:{port}"
    finally:
        running.stop()


def providers_of(settings: Settings) -> list[str]:
    return [config.name for config in provider_configs(settings)]


def main(out: Path, only: list[str]) -> int:
    providers = providers_of(Settings())
    if not providers:
        print("no LLM provider is configured: set BERTH_LLM_PROVIDERS or BERTH_LLM_MODEL")
        return 2
    tasks = [t for t in TASKS if not only or t.name in only]
    with (
        tempfile.TemporaryDirectory(prefix="berth-eval-") as data,
        system_with_pages({}, Path(data)) as (base, web),
    ):
        results = evaluate(base, web, providers, tasks, lambda line: print(line, flush=True))
    print(table(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report(results), indent=2))
    print(json.dumps(totals(results), indent=2))
    print(f"written to {out}", file=sys.stderr)
    return 0 if results else 1
