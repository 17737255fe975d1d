"""A task's spans in the workflow: with the SDK's tracing interceptor on the client and the
worker, the activities of a task are spans of the trace of the request that submitted it
(its traceparent, carried in the submission), not of the session's creation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from store.events import EventType
from telemetry import tracing
from tests.workflows.test_session import Stubs, end, env, params, until
from workflows.models import TaskRef, TaskSubmission
from workflows.session import SessionWorkflow

__all__ = ["env"]  # the fixture


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)


async def test_a_tasks_activities_are_spans_of_its_requests_trace(
    env: WorkflowEnvironment, spans: InMemorySpanExporter
) -> None:
    config = env.client.config()
    config["interceptors"] = [TracingInterceptor(tracing.tracer())]
    client = Client(**config)
    stubs = Stubs()
    session = params(stubs)
    async with Worker(
        client,
        task_queue=stubs.queue,
        workflows=[SessionWorkflow],
        activities=stubs.all(),
        max_heartbeat_throttle_interval=timedelta(seconds=1),
    ):
        handle = await client.start_workflow(
            SessionWorkflow.run, session, id=f"s-{session.session_id}", task_queue=stubs.queue
        )
        with tracing.tracer().start_as_current_span("POST /api/sessions/{sid}/tasks") as request:
            await handle.execute_update(
                "submit_task",
                TaskSubmission(prompt="$ echo traced", trace=tracing.traceparent()),
                result_type=TaskRef,
            )
        await until(
            lambda: any(
                e.type == EventType.task_status and e.data.get("status") == "succeeded"
                for e in stubs.events
            )
        )
        await end(handle)
    trace = request.get_span_context().trace_id
    found = {s.name: s for s in spans.get_finished_spans() if s.context.trace_id == trace}
    start, run = found["StartActivity:RunStep"], found["RunActivity:RunStep"]
    assert start.parent is not None and start.parent.span_id == request.get_span_context().span_id
    assert run.parent is not None and run.parent.span_id == start.context.span_id
    # The session's own start (and its provisioning) are another trace: the creation's.
    provision = [s for s in spans.get_finished_spans() if s.name == "RunActivity:ProvisionSandbox"]
    assert provision and all(s.context.trace_id != trace for s in provision)
