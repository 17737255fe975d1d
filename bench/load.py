"""The local fleet under load: ``make bench-load`` (``python -m berth bench load``).

Starts ``python -m berth run --hosts 2 --api-replicas 2`` (nginx in front, PostgreSQL, Docker
sandboxes) on a fresh data dir and database, and drives it through nginx only:

- one session alone first (three, one after another): the baseline every other figure is
  set beside (the ratio);
- session creation sequential, staggered (``--rate`` a second) and in a burst (all at
  once), the way public sandbox benchmarks measure time to first command: each session is
  asked for its first command (``$ echo``) right after its POST;
- ``--sessions`` live sessions, each with its event stream open, each running a task of
  ``--steps`` ``$`` steps that print the time (``date +%s.%N``; containers share the
  host's clock) at once.

Reports errors, session ready (POST → ``ready`` on the stream), first command (POST →
its task's ``succeeded``), step round trip (one ``step.finished`` to the next), line → SSE
(a printed time to its arrival), each beside the same figure for one session alone, and the
host's CPU and memory at the peak. Prints a markdown table and writes JSON (default
``.berth/bench/load.json``). The counts default to the issue's; on a small machine pass
smaller ones, and the report says what ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.spine import BenchError, Stream, call, is_status, machine, sign_up
from store.events import EventType
from tests.support.local import LocalSystem
from tests.support.postgres import drop_database, fresh_database

FIRST_COMMAND = "$ echo first"
CLOCK_STEP = "$ date +%s.%N"
SESSION_TIMEOUT_S = 600.0
SAMPLE_EVERY_S = 0.5
TASK_TRIES = 6  # a task's submission, and its retries after a 503
BASELINE_RUNS = 3  # lone sessions, one after another: the figures the others are set beside


@dataclass(frozen=True)
class Counts:
    sequential: int = 20
    staggered: int = 100
    rate: float = 10.0  # staggered sessions a second
    burst: int = 100
    sessions: int = 100  # live sessions under load
    steps: int = 20


@dataclass
class Phase:
    """What one phase measured: seconds per sample, by figure."""

    name: str
    n: int
    errors: list[str] = field(default_factory=list)
    retries: int = 0  # task submissions answered 503 and sent again
    samples: dict[str, list[float]] = field(default_factory=dict)
    peak_cpu_percent: float | None = None
    peak_memory_mib: float | None = None
    seconds: float = 0.0

    def add(self, figure: str, values: list[float]) -> None:
        self.samples.setdefault(figure, []).extend(values)


READY = "session ready"
FIRST = "first command"
STEP = "step round trip"
LINE = "line → SSE"


def quantile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ms = sorted(v * 1000 for v in values)
    if len(ms) == 1:
        return ms[0]
    return statistics.quantiles(ms, n=100, method="inclusive")[q - 1]


class HostSampler:
    """The whole host's CPU use (all cores, from /proc/stat) and memory in use (MemTotal -
    MemAvailable), sampled while a phase runs; their peaks."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.memory: list[float] = []

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    @staticmethod
    def _memory_mib() -> float:
        info = {
            line.split(":")[0]: int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
        }
        return (info["MemTotal"] - info["MemAvailable"]) / 1024

    async def run(self, stop: asyncio.Event) -> None:
        busy, total = self._cpu_times()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
            now_busy, now_total = self._cpu_times()
            if now_total > total:
                self.cpu.append(100 * (now_busy - busy) / (now_total - total))
            busy, total = now_busy, now_total
            self.memory.append(self._memory_mib())


class Load:
    def __init__(self, http: httpx.AsyncClient, counts: Counts) -> None:
        self.http = http
        self.counts = counts
        self.live: dict[str, Stream] = {}

    async def start_session(self, phase: Phase) -> str | None:
        """A session asked for its first command at once; its ready and first-command
        seconds go to ``phase``. Its stream stays open (in ``live``)."""
        start = time.time()
        try:
            sid: str = (await call(self.http, "POST", "/api/sessions", 201, json={}))["id"]
            stream = Stream(self.http, sid)
            self.live[sid] = stream
            tid = await self.submit(sid, FIRST_COMMAND, phase)
            async with asyncio.timeout(SESSION_TIMEOUT_S):
                seen = await stream.until(is_status(EventType.session_status, "ready"))
                phase.add(READY, [seen[-1][0] - start])
                seen = await stream.until(is_status(EventType.task_status, "succeeded", tid))
                phase.add(FIRST, [seen[-1][0] - start])
        except (BenchError, httpx.HTTPError, TimeoutError, KeyError) as exc:
            phase.errors.append(f"session start: {exc!r}"[:300])
            return None
        return sid

    async def submit(self, sid: str, prompt: str, phase: Phase) -> str:
        """A task's id, once queued. A 503 (the session did not answer within the API's
        bound: its worker is busy) is sent again after its Retry-After, with the same
        Idempotency-Key, as a client should (counted: ``phase.retries``)."""
        key = uuid.uuid4().hex
        url = f"/api/sessions/{sid}/tasks"
        for _ in range(TASK_TRIES - 1):
            answer = await self.http.post(
                url, json={"prompt": prompt}, headers={"Idempotency-Key": key}
            )
            if answer.status_code != 503:
                break
            phase.retries += 1
            await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))
        if answer.status_code != 202:
            raise BenchError(f"POST {url}: {answer.status_code} {answer.text[:300]}")
        tid: str = answer.json()["id"]
        return tid

    async def run_steps(self, sid: str, phase: Phase) -> None:
        """A task of ``steps`` clock steps on a live session: its step round trips and each
        printed time's lag to its arrival."""
        stream = self.live[sid]
        try:
            tid = await self.submit(sid, "\n".join([CLOCK_STEP] * self.counts.steps), phase)
            async with asyncio.timeout(SESSION_TIMEOUT_S):
                seen = await stream.until(is_status(EventType.task_status, "succeeded", tid))
        except (BenchError, httpx.HTTPError, TimeoutError, KeyError) as exc:
            phase.errors.append(f"steps: {exc!r}"[:300])
            return
        mine = [(t, e) for t, e in seen if e["data"].get("task_id") == tid]
        finished = sorted(
            ((e["data"]["index"], t) for t, e in mine if e["type"] == EventType.step_finished)
        )
        phase.add(STEP, [b[1] - a[1] for a, b in itertools.pairwise(finished)])
        lags = []
        for received, event in mine:
            if event["type"] == EventType.step_output:
                for line in event["data"]["text"].split():
                    with contextlib.suppress(ValueError):
                        lags.append(received - float(line))
        phase.add(LINE, lags)
        if len(lags) < self.counts.steps:
            phase.errors.append(f"steps: {len(lags)} of {self.counts.steps} lines arrived")

    async def end_all(self) -> None:
        """End every live session, all at once, and close its stream (errors here are the
        cleanup's, not the measurement's)."""

        async def end(sid: str, stream: Stream) -> None:
            with contextlib.suppress(BenchError, httpx.HTTPError):
                await call(self.http, "DELETE", f"/api/sessions/{sid}", 202)
                for _ in range(120):
                    row = await call(self.http, "GET", f"/api/sessions/{sid}", 200)
                    if row["status"] in ("ended", "failed"):
                        break
                    await asyncio.sleep(0.5)
            await stream.close()

        await asyncio.gather(*(end(sid, stream) for sid, stream in self.live.items()))
        self.live.clear()

    async def phase(self, name: str, n: int, body: Any) -> Phase:
        print(f"measuring {name} (n={n}) ...", flush=True)
        phase = Phase(name, n)
        sampler, stop = HostSampler(), asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        began = time.monotonic()
        try:
            await body(phase)
        finally:
            phase.seconds = round(time.monotonic() - began, 1)
            stop.set()
            await sampling
        phase.peak_cpu_percent = round(max(sampler.cpu, default=0.0), 1)
        phase.peak_memory_mib = round(max(sampler.memory, default=0.0))
        if phase.errors:
            print(f"  {len(phase.errors)} errors, the first: {phase.errors[0]}", flush=True)
        return phase

    async def measure(self) -> list[Phase]:
        c = self.counts

        async def alone(phase: Phase) -> None:
            for _ in range(BASELINE_RUNS):
                sid = await self.start_session(phase)
                if sid is not None:
                    await self.run_steps(sid, phase)
                await self.end_all()

        async def sequential(phase: Phase) -> None:
            for _ in range(c.sequential):
                await self.start_session(phase)
                await self.end_all()

        async def staggered(phase: Phase) -> None:
            starts = []
            for _ in range(c.staggered):
                starts.append(asyncio.create_task(self.start_session(phase)))
                await asyncio.sleep(1 / c.rate)
            await asyncio.gather(*starts)
            await self.end_all()

        async def burst(phase: Phase) -> None:
            await asyncio.gather(*(self.start_session(phase) for _ in range(c.burst)))
            # Kept for the load: its sessions are live, their streams open.

        async def load(phase: Phase) -> None:
            missing = c.sessions - len(self.live)
            if missing > 0:
                await asyncio.gather(*(self.start_session(Phase("top-up", 0)) for _ in
                                       range(missing)))  # fmt: skip
            sids = list(self.live)[: c.sessions]
            await asyncio.gather(*(self.run_steps(sid, phase) for sid in sids))
            await self.end_all()

        phases = [await self.phase("one session alone", BASELINE_RUNS, alone)]
        phases.append(await self.phase("sequential creation", c.sequential, sequential))
        label = f"staggered creation ({c.rate:g}/s)"
        phases.append(await self.phase(label, c.staggered, staggered))
        phases.append(await self.phase("burst creation (all at once)", c.burst, burst))
        label = f"{c.sessions} live sessions x {c.steps} steps, streams open"
        phases.append(await self.phase(label, c.sessions, load))
        return phases


async def drive(system: LocalSystem, counts: Counts) -> list[Phase]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=system.base, timeout=60, limits=limits) as http:
        await sign_up(http, "load@example.com")
        load = Load(http, counts)
        try:
            return await load.measure()
        finally:
            await load.end_all()


def figures(phases: list[Phase]) -> list[dict[str, Any]]:
    """Each phase's figures beside the lone session's: p50, p95, p99 and the ratios."""
    base = phases[0]
    rows = []
    for phase in phases:
        for figure, values in phase.samples.items():
            row: dict[str, Any] = {"phase": phase.name, "figure": figure, "n": len(values)}
            for q in (50, 95, 99):
                value, alone = quantile(values, q), quantile(base.samples.get(figure, []), q)
                row[f"p{q}_ms"] = None if value is None else round(value, 1)
                ratio = value / alone if value is not None and alone else None
                row[f"p{q}_ratio"] = None if ratio is None else round(ratio, 2)
            rows.append(row)
    return rows


def table(phases: list[Phase], rows: list[dict[str, Any]]) -> str:
    def ms(value: float | None, ratio: float | None, phase: str) -> str:
        if value is None:
            return "-"
        if phase == phases[0].name or ratio is None:
            return f"{value:.0f}"
        return f"{value:.0f} (x{ratio:.2f})"

    lines = [
        "| phase | figure | n | p50 ms (x alone) | p95 ms (x alone) | p99 ms (x alone) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [ms(r[f"p{q}_ms"], r[f"p{q}_ratio"], r["phase"]) for q in (50, 95, 99)]
        lines.append(f"| {r['phase']} | {r['figure']} | {r['n']} | {' | '.join(cells)} |")
    lines += [
        "",
        "| phase | n | errors | 503s retried | seconds | peak host CPU | peak host memory in use |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in phases:
        lines.append(
            f"| {p.name} | {p.n} | {len(p.errors)} | {p.retries} | {p.seconds:.0f} | "
            f"{p.peak_cpu_percent:.0f}% | {p.peak_memory_mib:.0f} MiB |"
        )
    return "\n".join(lines)


def bench(out: Path, counts: Counts) -> int:
    """Start the fleet, measure, print the table, write ``out``; 1 on any error."""
    began, started = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}; date: {started}", flush=True)
    print(f"counts: {asdict(counts)}", flush=True)
    url = fresh_database()
    if url is None:
        print("bench-load needs PostgreSQL on 127.0.0.1:5432", file=sys.stderr)
        return 1
    live = max(counts.burst, counts.sessions) + 10
    env = {
        "BERTH_DATABASE_URL": url,
        # One user drives it all: its own limits must not be what is measured.
        "BERTH_MAX_LIVE_SESSIONS": str(live),
        "BERTH_MAX_STREAMS_PER_USER": str(2 * live),
    }
    data = Path(tempfile.mkdtemp(prefix="berth-bench-load-"))
    try:
        system = LocalSystem.start(data, "load", env, 420, hosts=2, api_replicas=2)
    except RuntimeError as exc:
        print(f"bench-load failed: {exc}", file=sys.stderr)
        drop_database(url)
        return 1
    print(f"fleet up at {system.base} after {time.monotonic() - began:.0f} s", flush=True)
    phases: list[Phase] = []
    try:
        phases = asyncio.run(drive(system, counts))
    except Exception as exc:  # signing up failed: nothing to measure
        print(f"bench-load failed: {exc!r}", file=sys.stderr)
    finally:
        code = system.stop()
        drop_database(url)
    errors = sum(len(p.errors) for p in phases)
    if code != 0 or not phases or errors:
        print(f"`berth run` exited with {code}; its data dir and log: {system.data}")
    else:
        shutil.rmtree(system.data, ignore_errors=True)
    if not phases:
        return 1
    rows = figures(phases)
    print(table(phases, rows))
    duration = time.monotonic() - began
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": started,
        "machine": info,
        "seconds": round(duration),
        "counts": asdict(counts),
        "fleet": {"hosts": 2, "api_replicas": 2, "database": "postgresql", "sandboxes": "docker"},
        "figures": rows,
        "phases": [
            {k: v for k, v in asdict(p).items() if k != "samples"} | {"errors": p.errors[:20]}
            for p in phases
        ],
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out} (took {duration:.0f} s)")
    return 1 if errors else 0
