"""Traces: OpenTelemetry spans across the API, the workflows and activities, and the guest.

Off unless the standard ``OTEL_*`` variables name a collector (``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): then each process installs an SDK tracer provider
exporting over OTLP/HTTP in batches (the SDK reads the rest of ``OTEL_*`` itself: headers,
sampler, batch delays). Off, nothing is installed: the API makes no spans, the Temporal
client gets no tracing interceptor, and the helpers below are no-ops.

A span's context travels as a W3C ``traceparent`` string: in the API's response header, in
a task's submission (so the workflow runs the task's activities under the request that asked
for it), and in the guest's ``Exec`` frame. The guest has no OpenTelemetry: it reports when
its command started and ended, and the host records its ``guest.exec`` span from those.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

TRACER = "berth"
ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_propagator = TraceContextTextMapPropagator()
# This process's provider once configured (or a test's); None: traces off.
_provider: trace.TracerProvider | None = None


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether these variables ask for traces: a collector named, and neither the SDK nor
    its trace exporter turned off."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return any(environ.get(name) for name in ENDPOINTS)


def configure(service: str, environ: Mapping[str, str]) -> bool:
    """Install this process's tracer provider (named ``service`` unless OTEL_SERVICE_NAME
    says otherwise) if ``environ`` asks for traces; whether it did."""
    global _provider
    if _provider is not None or not wanted(environ):
        return _provider is not None
    # Imported only when wanted: an untraced process loads none of the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = environ.get("OTEL_SERVICE_NAME") or f"berth-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    # Not the process's global: FastAPI would then trace each request itself, as a second
    # server span of a trace of its own, and the task would follow whichever was current.
    _provider = provider
    return True


def install(provider: trace.TracerProvider | None) -> None:
    """Use ``provider`` (a test's, with an in-memory exporter) as if configured; None: off
    again. The process's global provider is left alone (it can be set only once)."""
    global _provider
    _provider = provider


def enabled() -> bool:
    return _provider is not None


def shutdown() -> None:
    """Send what is batched before the process exits."""
    flush = getattr(_provider, "shutdown", None)
    if callable(flush):
        flush()


def tracer() -> trace.Tracer:
    """Berth's tracer: the configured provider's (a no-op one with traces off)."""
    return (_provider or trace.NoOpTracerProvider()).get_tracer(TRACER)


def traceparent() -> str | None:
    """The current span's context as a W3C traceparent; None without a recording span."""
    if _provider is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), for log lines; None without one."""
    found = trace.get_current_span().get_span_context()
    return format(found.trace_id, "032x") if found.is_valid else None


def extract(header: str | None) -> otel_context.Context:
    """The context a traceparent names (an empty one for None or a malformed header)."""
    return _propagator.extract({"traceparent": header} if header else {})


@contextmanager
def under(header: str | None) -> Iterator[None]:
    """Spans started within are children of the span ``header`` (a traceparent) names;
    nothing changes for None, or when tracing is off."""
    if _provider is None or not header:
        yield
        return
    token = otel_context.attach(extract(header))
    try:
        yield
    finally:
        otel_context.detach(token)


def completed(
    name: str, start_s: float, end_s: float, attributes: Mapping[str, AttributeValue]
) -> None:
    """A span that already happened elsewhere (the guest's command, from its own start and
    end times, wall-clock seconds), a child of the current span."""
    if _provider is None or not trace.get_current_span().get_span_context().is_valid:
        return
    span = tracer().start_span(name, attributes=dict(attributes), start_time=int(start_s * 1e9))
    span.end(end_time=int(max(end_s, start_s) * 1e9))
