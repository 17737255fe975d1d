"""Latency of Berth's spine: API → Temporal → sandbox → event log → SSE, end to end.

``make bench-spine`` (``python -m berth bench spine``) starts the whole system on free ports
with a fresh data dir, drives it through the JSON API only (plus Temporal's client to count
history events), stops it with SIGTERM, prints a markdown table and writes JSON to ``--out``
(default ``.berth/bench/spine.json``). Every measurement has a time
limit; one that fails or runs out becomes a row that names the metric and says why, and the
exit status is 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from store.events import EventType
from tests.support.local import LocalSystem, python_script

Event = dict[str, Any]
Received = tuple[float, Event]  # (client receive time, event)
NOOP = "$ true"
RATIO = "p50 ratio, 50 streams open / none"
CLOCK = "$ " + python_script(
    "clock.py",
    "import time",
    "for _ in range(200):",
    "    print(time.time(), flush=True)",
    "    time.sleep(0.01)",
)


class BenchError(Exception):
    pass


@dataclass
class Metric:
    name: str
    p50: float | None
    p95: float | None
    unit: str
    target: float | None = None
    on: str = "p50"  # the figure the target is about: p50, p95, or "" for a single value
    n: int = 1
    error: str | None = None

    @property
    def met(self) -> bool | None:
        value = self.p95 if self.on == "p95" else self.p50
        if self.error is not None:
            return False
        return None if self.target is None or value is None else value <= self.target


def timed(
    name: str, seconds: list[float], target_ms: float | None = None, on: str = "p50"
) -> Metric:
    ms = sorted(s * 1000 for s in seconds)
    p95 = statistics.quantiles(ms, n=100, method="inclusive")[94] if len(ms) > 1 else ms[0]
    return Metric(
        name, round(statistics.median(ms), 2), round(p95, 2), "ms", target_ms, on, len(ms)
    )


@contextlib.asynccontextmanager
async def limit(metric: str, seconds: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise BenchError(f"{metric}: no result within {seconds:.0f} s") from None
    except (BenchError, httpx.HTTPError) as exc:
        raise BenchError(f"{metric}: {exc}") from None


class Stream:
    """One SSE connection, read by a task that stamps each event with its receive time."""

    def __init__(self, http: httpx.AsyncClient, sid: str, after: int = 0) -> None:
        self.queue: asyncio.Queue[Received] = asyncio.Queue()
        self.settled = asyncio.Event()  # set once the stream is open, or has failed
        self.error: str | None = None
        self.last_seq = after
        self.task = asyncio.create_task(self.read(http, f"/api/sessions/{sid}/events", after))

    async def read(self, http: httpx.AsyncClient, url: str, after: int) -> None:
        try:
            headers = {"Last-Event-ID": str(after)}
            timeout = httpx.Timeout(10, read=None)
            async with http.stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.status_code != 200:
                    raise BenchError(f"GET {url}: HTTP {response.status_code}")
                self.settled.set()
                fields: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line:
                        name, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        fields[name] = f"{fields[name]}\n{value}" if name in fields else value
                    elif "data" in fields:
                        self.queue.put_nowait((time.time(), json.loads(fields["data"])))
                        fields = {}
                    else:
                        fields = {}
            raise BenchError("the stream ended")
        except Exception as exc:
            self.error = str(exc) or repr(exc)
            self.settled.set()
            self.queue.put_nowait((time.time(), {"type": "stream.error", "data": {}}))

    async def until(self, done: Callable[[Event], bool]) -> list[Received]:
        """Events up to and including the first that ``done`` accepts."""
        seen: list[Received] = []
        while True:
            received = await self.queue.get()
            event = received[1]
            kind, data = event["type"], event["data"]
            if kind == "stream.error":
                raise BenchError(f"the SSE stream failed: {self.error}")
            self.last_seq = event["seq"]
            if (
                kind in (EventType.session_status, EventType.task_status)
                and data.get("status") == "failed"
            ):
                raise BenchError(f"{kind} failed: {data.get('error')}")
            seen.append(received)
            if done(event):
                return seen

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def is_status(kind: str, status: str, task_id: str | None = None) -> Callable[[Event], bool]:
    def check(event: Event) -> bool:
        data = event["data"]
        return (
            event["type"] == kind
            and data.get("status") == status
            and (task_id is None or data.get("task_id") == task_id)
        )

    return check


async def call(http: httpx.AsyncClient, method: str, url: str, expect: int, **kw: Any) -> Any:
    response = await http.request(method, url, **kw)
    if response.status_code != expect:
        raise BenchError(f"{method} {url}: {response.status_code} {response.text[:300]}")
    return response.json()


class Bench:
    def __init__(self, http: httpx.AsyncClient, temporal: Client) -> None:
        self.http, self.temporal = http, temporal
        self.sessions: list[str] = []
        self.main: tuple[str, Stream] | None = None  # the session the task metrics share

    async def measure(self) -> list[Metric]:
        """Every metric, each under its own time limit; one that fails leaves a row saying so."""
        plan: list[tuple[str, float, Callable[[], Awaitable[list[Metric]]]]] = [
            ("session ready", 180, self.session_ready),
            ("no-op task round trip", 120, self.noop_tasks),
            ("step round trip", 90, self.steps),
            ("guest line → SSE client", 60, self.guest_lines),
            ("50 open streams", 120, self.open_streams),
            ("history events per `$` step", 120, self.history),
        ]
        metrics: list[Metric] = []
        for name, seconds, run in plan:
            print(f"measuring {name} ...", flush=True)
            try:
                async with limit(name, seconds):
                    metrics += await run()
            except BenchError as exc:
                print(f"FAILED {exc}", flush=True)
                error = str(exc).removeprefix(f"{name}: ")
                metrics.append(Metric(name, None, None, "", error=error))
        return metrics

    async def session_ready(self) -> list[Metric]:
        ready = []
        for _ in range(5):
            sid, stream, seconds = await self.new_session()
            ready.append(seconds)
            await self.end_session(sid, stream)
        return [timed("session ready (POST → `ready` on SSE)", ready)]

    async def noop_tasks(self) -> list[Metric]:
        sid, stream = await self.main_session()
        noop = [(await self.run_task(sid, stream, NOOP))[0] for _ in range(30)]
        return [timed("no-op task round trip (`$ true`)", noop, 150)]

    async def steps(self) -> list[Metric]:
        sid, stream = await self.main_session()
        _, events = await self.run_task(sid, stream, "\n".join([NOOP] * 50))
        finished = [e for e in events if e["type"] == EventType.step_finished]
        times = [e["received"] for e in sorted(finished, key=lambda e: e["data"]["index"])]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return [timed("step round trip (step.finished → next)", gaps, 50)]

    async def guest_lines(self) -> list[Metric]:
        sid, stream = await self.main_session()
        _, events = await self.run_task(sid, stream, CLOCK)
        lags, pending = [], ""
        for event in (e for e in events if e["type"] == EventType.step_output):
            *lines, pending = (pending + event["data"]["text"]).split("\n")
            lags += [event["received"] - float(line) for line in lines if line.strip()]
        if len(lags) < 200:
            raise BenchError(f"{len(lags)} of 200 lines arrived")
        return [timed("guest line → SSE client", lags, 100, on="p95")]

    async def open_streams(self) -> list[Metric]:
        sid, main = await self.main_session()
        alone = (await self.list_latencies(60))[10:]  # the first 10 warm up
        streams = [Stream(self.http, sid, main.last_seq) for _ in range(50)]
        try:
            await asyncio.gather(*(s.settled.wait() for s in streams))
            failed = [s.error for s in streams if s.error]
            if failed:
                raise BenchError(f"{len(failed)} of 50 SSE streams failed: {failed[0]}")
            await asyncio.sleep(1)  # every stream is following the log by now
            crowded = await self.list_latencies(50)
        finally:
            for stream in streams:
                await stream.close()
        without = timed("GET /api/sessions, no streams open", alone)
        crowd = timed("GET /api/sessions, 50 SSE streams open", crowded)
        ratio = statistics.median(crowded) / statistics.median(alone)
        return [without, crowd, Metric(RATIO, ratio, None, "x", 2, on="")]

    async def history(self) -> list[Metric]:
        """(events of a 41-step task - events of a 1-step task) / 40, in a fresh session."""
        sid, stream, _ = await self.new_session()
        counts = [await self.settled_history(sid)]
        for steps in (1, 41):
            await self.run_task(sid, stream, "\n".join([NOOP] * steps))
            await stream.until(is_status(EventType.session_status, "ready"))
            counts.append(await self.settled_history(sid))
        await self.end_session(sid, stream)
        per_step = ((counts[2] - counts[1]) - (counts[1] - counts[0])) / 40
        return [Metric("history events per `$` step", per_step, None, "", 6, on="")]

    # ---- helpers

    async def new_session(self) -> tuple[str, Stream, float]:
        """A ready session, its stream, and the seconds from POST to `ready` on the stream."""
        start = time.time()
        sid = (await call(self.http, "POST", "/api/sessions", 201, json={}))["id"]
        self.sessions.append(sid)
        stream = Stream(self.http, sid)
        seen = await stream.until(is_status(EventType.session_status, "ready"))
        return sid, stream, seen[-1][0] - start

    async def main_session(self) -> tuple[str, Stream]:
        if self.main is None:
            self.main = (await self.new_session())[:2]
        return self.main

    async def end_session(self, sid: str, stream: Stream) -> None:
        await call(self.http, "DELETE", f"/api/sessions/{sid}", 202)
        await stream.until(is_status(EventType.session_status, "ended"))
        await stream.close()
        self.sessions.remove(sid)

    async def run_task(self, sid: str, stream: Stream, prompt: str) -> tuple[float, list[Event]]:
        """Runs a task; returns the seconds from POST to `succeeded` and its timed events."""
        start = time.time()
        body = {"prompt": prompt}
        tid = (await call(self.http, "POST", f"/api/sessions/{sid}/tasks", 202, json=body))["id"]
        seen = await stream.until(is_status(EventType.task_status, "succeeded", tid))
        mine = [{**e, "received": t} for t, e in seen if e["data"].get("task_id") == tid]
        return seen[-1][0] - start, mine

    async def history_events(self, sid: str) -> int:
        """Events in the workflow's history, over its whole chain of continue-as-new runs."""
        total, run_id = 0, None
        while True:
            handle = self.temporal.get_workflow_handle(f"session-{sid}", run_id=run_id)
            events = (await handle.fetch_history()).events
            total += len(events)
            started = events[0].workflow_execution_started_event_attributes
            run_id = started.continued_execution_run_id
            if not run_id:
                return total

    async def settled_history(self, sid: str) -> int:
        counts = [-1, -2]
        while counts[-1] != counts[-2]:
            await asyncio.sleep(0.5)
            counts.append(await self.history_events(sid))
        return counts[-1]

    async def list_latencies(self, n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await call(self.http, "GET", "/api/sessions", 200)
            samples.append(time.perf_counter() - start)
        return samples

    async def clean_up(self) -> None:
        """Ends the sessions still open, so that no sandbox outlives the benchmark."""
        if self.main is not None:
            await self.main[1].close()
        for sid in list(self.sessions):
            with contextlib.suppress(BenchError, httpx.HTTPError):
                await call(self.http, "DELETE", f"/api/sessions/{sid}", 202)
                for _ in range(120):  # up to a minute for the sandbox to go
                    row = await call(self.http, "GET", f"/api/sessions/{sid}", 200)
                    if row["status"] in ("ended", "failed"):
                        break
                    await asyncio.sleep(0.5)


async def sign_up(http: httpx.AsyncClient, email: str) -> None:
    """A new account, whose token ``http`` sends with every request from now on."""
    credentials = {"email": email, "password": "a long password"}
    await call(http, "POST", "/api/auth/signup", 201, json=credentials)
    token = (await call(http, "POST", "/api/auth/token", 200, json=credentials))["token"]
    http.headers["Authorization"] = f"Bearer {token}"


async def measure(system: LocalSystem) -> list[Metric]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=20)
    async with httpx.AsyncClient(base_url=system.base, timeout=30, limits=limits) as http:
        await sign_up(http, "bench@example.com")
        bench = Bench(http, await system.client())
        try:
            return await bench.measure()
        finally:
            await bench.clean_up()


def machine() -> dict[str, Any]:
    models = [
        line.partition(":")[2].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return {
        "nproc": os.cpu_count(),
        "cpu": models[0] if models else "unknown",
        "load": round(os.getloadavg()[0], 2),  # other work on the machine skews the figures
    }


def table(metrics: list[Metric]) -> str:
    rows = ["| metric | p50 | p95 | target | met? |", "| --- | --- | --- | --- | --- |"]
    for m in metrics:
        unit = {"ms": " ms"}.get(m.unit, m.unit)
        p50, p95 = ("-" if v is None else f"{v:.1f}{unit}" for v in (m.p50, m.p95))
        target = "-" if m.target is None else f"{m.on} ≤ {m.target:g}{unit}".strip()
        met = {None: "-", True: "yes", False: "**no**"}[m.met]
        name = f"{m.name}, n={m.n}" if m.n > 1 else m.name
        row = f"| {name} | {p50} | {p95} | {target} | {met} |"
        rows.append(row if m.error is None else f"| {name} | - | - | - | **failed**: {m.error} |")
    return "\n".join(rows)


def bench(out: Path) -> int:
    """Measure, print the table, write the results to ``out``; 1 if any measurement failed."""
    began, started = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}; date: {started}", flush=True)
    try:
        system = LocalSystem.start(Path(tempfile.mkdtemp(prefix="berth-bench-")), "bench")
    except RuntimeError as exc:
        print(f"bench-spine failed: {exc}", file=sys.stderr)
        return 1
    print(f"system up at {system.base} after {time.monotonic() - began:.0f} s", flush=True)
    metrics: list[Metric] = []
    try:
        metrics = asyncio.run(measure(system))
    except Exception as exc:  # signing up or connecting failed: nothing to measure
        print(f"bench-spine failed: {exc!r}", file=sys.stderr)
    finally:
        code = system.stop()
    if code != 0 or not metrics or any(m.error for m in metrics):
        print(f"`berth run` exited with {code}; its data dir and log: {system.data}")
    else:
        shutil.rmtree(system.data, ignore_errors=True)
    if not metrics:
        return 1
    duration = time.monotonic() - began
    print(table(metrics))
    ratio = next((m for m in metrics if m.name == RATIO), None)
    if ratio is not None and ratio.met:
        print("50 open streams do not slow other requests")
    elif ratio is not None:
        print(f"50 open streams slow other requests: x{ratio.p50:.1f}")
    write_report(out, metrics, info, started, duration)
    return 1 if any(m.error for m in metrics) else 0


def write_report(
    out: Path, metrics: list[Metric], info: dict[str, Any], started: str, duration: float
) -> None:
    """The results as JSON in ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results = [{**asdict(m), "met": m.met} for m in metrics]
    report = {"date": started, "machine": info, "seconds": round(duration), "metrics": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out} (took {duration:.0f} s)")
