"""Traces end to end: a system started as `make run` starts it, with the standard OTEL_*
variables pointing at a collector of the test's own (an OTLP/HTTP receiver keeping the spans
in memory). One task's trace holds the API request that submitted it, the workflow's start
of its step, the RunStep activity and the guest's execution, each the child of the one
before; the worker's log lines about the step name the same trace."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.e2e.test_operations import run_task
from tests.e2e.test_system import token_for, wait_status
from tests.support.local import LocalSystem, quiet_port


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace: str
    span: str
    parent: str
    start_ns: int
    end_ns: int


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver: every span exported to it, in memory."""

    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource.resource.attributes
                 if a.key == "service.name"), "",
            )  # fmt: skip
            for scope in resource.scope_spans:
                with self.lock:
                    self.spans += [
                        Span(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                             s.parent_span_id.hex(), s.start_time_unix_nano, s.end_time_unix_nano)
                        for s in scope.spans
                    ]  # fmt: skip

    def of(self, trace: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace == trace]


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    found = Collector()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            found.take(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    port = quiet_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield found, port
    server.shutdown()


def test_one_task_is_one_trace_from_the_request_to_the_guest(
    collector: tuple[Collector, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    spans, port = collector
    system = LocalSystem.start(
        tmp_path_factory.mktemp("berth-traces"),
        "traces",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "BERTH_LOG_FORMAT": "json",
        },
    )
    try:
        base = system.base
        headers = token_for(base, "traces@example.com")
        sid = httpx.post(f"{base}/api/sessions", json={}, headers=headers).json()["id"]
        wait_status(base, headers, sid, "ready")
        run_task(base, headers, sid, "$ echo traced", 0)
        route = "POST /api/sessions/{sid}/tasks"
        names = {route, "StartActivity:RunStep", "RunActivity:RunStep", "guest.exec"}
        # Exported in batches (every 200 ms here): wait for the step's spans to arrive.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            submitted = [s for s in spans.spans if s.name == route]
            if submitted and names <= {s.name for s in spans.of(submitted[0].trace)}:
                break
            time.sleep(0.5)
        assert len(submitted) == 1, sorted({s.name for s in spans.spans})
        request = submitted[0]
        assert request.service == "berth-api"
        trace = request.trace
        found = {s.name: s for s in spans.of(trace)}
        assert names <= set(found), sorted(found)
        # Each the child of the one before: request -> workflow -> activity -> guest.
        start, run, guest = (found[n] for n in ("StartActivity:RunStep",
                                                "RunActivity:RunStep", "guest.exec"))  # fmt: skip
        assert start.parent == request.span and start.service == "berth-worker"
        assert run.parent == start.span
        assert guest.parent == run.span
        assert run.start_ns <= guest.start_ns <= guest.end_ns <= run.end_ns + 1_000_000_000
        # The task's planning (a local activity of the workflow) is in it too, and the
        # session's own workflow run is a trace of the request that created the session.
        assert any(s.name.startswith("StartWorkflow:SessionWorkflow") for s in spans.spans)
        # The worker's lines about the step carry the trace's id.
        lines = [json.loads(x) for x in system.log().splitlines() if x.startswith("{")]
        assert any(
            p.get("trace") == trace and p["process"] == "worker" and "RunStep" in p["message"]
            for p in lines
        ), [p for p in lines if "RunStep" in p["message"]][:3]
    finally:
        assert system.stop() == 0, system.log()[-3000:]
