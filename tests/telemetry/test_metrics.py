"""The per-sandbox gauges: one series per session sampled now, none for a machine that
stopped, and no disk series for a container (its writes count as memory)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from telemetry import metrics


def test_the_sandbox_gauges_follow_the_sampled_sessions_only() -> None:
    metrics.sandbox_usage({"a": (50.0, 100.0, 10.0), "b": (5.0, 1.0, None)})
    value = REGISTRY.get_sample_value
    assert value("berth_sandbox_memory_bytes", {"session": "a"}) == 100 * 1024 * 1024
    assert value("berth_sandbox_disk_bytes", {"session": "a"}) == 10 * 1024 * 1024
    assert value("berth_sandbox_disk_bytes", {"session": "b"}) is None  # a container: no disk
    metrics.sandbox_usage({"b": (5.0, 1.0, None)})  # a's machine stopped
    assert value("berth_sandbox_cpu_percent", {"session": "a"}) is None
    assert value("berth_sandbox_cpu_percent", {"session": "b"}) == 5.0
    metrics.sandbox_usage({})
