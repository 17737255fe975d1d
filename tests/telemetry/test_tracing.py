"""Traces within one process, against an in-memory exporter: the API's request span and the
traceparent it answers with, a task's context carried as a string and taken up again, the
guest's execution recorded from its own times, the ids on log lines, and nothing at all
with traces off."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from api.trace import TraceIds
from telemetry import logs, tracing

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)


def app(seen: list[str | None]) -> TraceIds:
    async def task(request: Request) -> PlainTextResponse:
        seen.append(tracing.traceparent())  # what a submitted task would carry
        return PlainTextResponse("ok")

    return TraceIds(Starlette(routes=[Route("/api/sessions/{sid}/tasks", task, methods=["POST"])]))


async def post(application: TraceIds, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/api/sessions/s1/tasks", headers=headers)


def test_the_variables_ask_for_traces_only_with_a_collector() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert not tracing.wanted({})
    assert tracing.wanted(endpoint)
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not tracing.wanted({**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({**endpoint, "OTEL_TRACES_EXPORTER": "none"})


async def test_a_request_is_a_server_span_under_its_callers_context(
    spans: InMemorySpanExporter,
) -> None:
    seen: list[str | None] = []
    answer = await post(app(seen), {"traceparent": CALLER})
    (span,) = [s for s in spans.get_finished_spans() if s.name.startswith("POST")]
    assert span.name == "POST /api/sessions/{sid}/tasks"
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 200
    assert format(span.context.trace_id, "032x") == CALLER.split("-")[1]
    assert span.parent is not None and format(span.parent.span_id, "016x") == CALLER.split("-")[2]
    # The answer, and what the task would carry, name this span.
    own = f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"
    assert answer.headers["traceparent"] == own == seen[0]


async def test_a_task_context_carried_as_text_parents_later_spans(
    spans: InMemorySpanExporter,
) -> None:
    seen: list[str | None] = []
    await post(app(seen), {})
    request = next(s for s in spans.get_finished_spans() if s.name.startswith("POST"))
    # Later, elsewhere (the workflow running the task): its spans join the request's trace.
    with tracing.under(seen[0]), tracing.tracer().start_as_current_span("RunStep") as step:
        tracing.completed("guest.exec", 1000.0, 1002.5, {"berth.step.kind": "terminal"})
    guest = next(s for s in spans.get_finished_spans() if s.name == "guest.exec")
    assert step.get_span_context().trace_id == request.context.trace_id
    assert guest.parent is not None and guest.parent.span_id == step.get_span_context().span_id
    assert (guest.start_time, guest.end_time) == (1_000_000_000_000, 1_002_500_000_000)


async def test_off_nothing_is_traced_and_ids_are_still_sent() -> None:
    seen: list[str | None] = []
    answer = await post(app(seen), {"traceparent": CALLER})
    assert seen == [None]
    assert answer.headers["traceparent"].split("-")[1] == CALLER.split("-")[1]
    with tracing.under(CALLER):
        assert tracing.traceparent() is None


def test_a_log_line_within_a_span_names_its_trace(spans: InMemorySpanExporter) -> None:
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logs.JsonLines("worker"))
    logger = logging.getLogger("test.tracing")
    logger.addHandler(handler)
    try:
        with tracing.tracer().start_as_current_span("RunActivity:RunStep") as span:
            logger.warning("step ran")
    finally:
        logger.removeHandler(handler)
    line = json.loads(sink.getvalue())
    assert line["trace"] == format(span.get_span_context().trace_id, "032x")
