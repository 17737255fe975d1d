"""Every Prometheus metric of Berth, defined once here and recorded where it happens.

One process registry each (the API's, the worker's): the API serves it at ``/metrics``, a
worker host on BERTH_WORKER_METRICS_PORT. Labels are bounded: templates, providers, activity
names, error kinds, and the sessions whose sandboxes this host runs (removed when they stop).
Nothing here names a user or carries what a user wrote.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# From a warm claim (tens of ms) to a cold VM boot under TCG (minutes).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# A line reaches the browser within tens of ms when all is well.
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

SESSIONS = Gauge(
    "berth_sessions",
    "Sessions by status and template (read from the database)",
    ["status", "template"],
)
POOL_READY = Gauge("berth_pool_ready", "Booted VMs ready in a template's warm pool", ["template"])
POOL_BOOTING = Gauge("berth_pool_booting", "VMs a template's warm pool is booting", ["template"])
POOL_CLAIMS = Counter(
    "berth_pool_claims",
    "Claims of a warm pool's VM: hit (one handed out) or miss",
    ["template", "result"],
)
# Claim (ClaimSandbox), boot (ProvisionSandbox), resume (WakeSandbox, RestoreSandbox),
# hibernate (HibernateSandbox), step (RunStep): one histogram, by activity.
ACTIVITY_SECONDS = Histogram(
    "berth_activity_duration_seconds",
    "How long an activity attempt took, by activity and outcome (ok or the error's kind)",
    ["activity", "outcome"],
    buckets=DURATION_BUCKETS,
)
ERRORS = Counter("berth_errors", "Failures by kind (an activity's error type)", ["kind"])
STREAM_DELAY = Histogram(
    "berth_stream_delay_seconds",
    "From an output line's commit to its Server-Sent Event leaving the API",
    buckets=DELAY_BUCKETS,
)
MODEL_CALLS = Counter(
    "berth_model_calls",
    "LLM calls answered, by provider and whether from the cache",
    ["provider", "cached"],
)
MODEL_TOKENS = Counter("berth_model_tokens", "LLM tokens spent, by provider", ["provider", "kind"])
MODEL_COST = Counter("berth_model_cost_usd", "LLM spend in US dollars, by provider", ["provider"])
MODEL_ERRORS = Counter(
    "berth_model_errors", "LLM provider calls that failed, by provider", ["provider"]
)
POLICY_REFUSALS = Counter(
    "berth_policy_refusals",
    "Terminal commands the command policy refused, by template",
    ["template"],
)
SANDBOX_CPU = Gauge(
    "berth_sandbox_cpu_percent", "A sandbox's CPU use (% of one CPU), last sample", ["session"]
)
SANDBOX_MEMORY = Gauge(
    "berth_sandbox_memory_bytes", "A sandbox's resident memory, last sample", ["session"]
)
SANDBOX_DISK = Gauge(
    "berth_sandbox_disk_bytes",
    "What a VM's own disk holds, last sample (containers write to tmpfs: their memory)",
    ["session"],
)
MIB = 1024 * 1024


def sandbox_usage(samples: Mapping[str, tuple[float, float, float | None]]) -> None:
    """This host's sandboxes' last use, (CPU %, memory MiB, disk MiB or None) by session; a
    session sampled no more (its machine stopped) loses its series."""
    for gauge in (SANDBOX_CPU, SANDBOX_MEMORY, SANDBOX_DISK):
        gauge.clear()
    for session, (cpu, memory_mb, disk_mb) in samples.items():
        SANDBOX_CPU.labels(session).set(cpu)
        SANDBOX_MEMORY.labels(session).set(memory_mb * MIB)
        if disk_mb is not None:
            SANDBOX_DISK.labels(session).set(disk_mb * MIB)


def serve(host: str, port: int) -> None:
    """This process's metrics over HTTP at ``/metrics`` on ``host:port`` (a daemon thread)."""
    start_http_server(port, addr=host)
