"""The JSON log format: one object a line, with the ids of what the line is about (from the
context, or from the Temporal workflow a record comes from), and nothing else of the record."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from telemetry import logs


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("worker", "json", stream=stream)
    yield stream
    logs.configure("test", "text")


def read(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_names_its_process_host_and_the_ids_it_is_about(lines: io.StringIO) -> None:
    log = logging.getLogger("berth.test")
    with logs.about(session="s1", task="t1"), logs.about(step=0, trace=None):
        log.info("step %d ended", 0, extra={"prompt": "never written"})
    log.warning("outside")
    inside, outside = read(lines)
    assert inside["message"] == "step 0 ended" and inside["level"] == "info"
    assert (inside["session"], inside["task"], inside["step"]) == ("s1", "t1", "0")
    assert inside["process"] == "worker" and inside["host"] and inside["ts"].endswith("+00:00")
    assert "trace" not in inside and "prompt" not in json.dumps(inside)
    assert "session" not in outside and outside["level"] == "warning"


def test_the_ids_follow_each_task_of_their_own(lines: io.StringIO) -> None:
    log = logging.getLogger("berth.test")

    async def work(session: str) -> None:
        with logs.about(session=session):
            await asyncio.sleep(0.01)
            log.info("done")

    async def both() -> None:
        await asyncio.gather(work("a"), work("b"))

    asyncio.run(both())
    assert sorted(line["session"] for line in read(lines)) == ["a", "b"]


def test_a_temporal_records_workflow_names_its_session(lines: io.StringIO) -> None:
    workflow = {"workflow_id": "session-abc", "workflow_type": "SessionWorkflow", "attempt": 1}
    logging.getLogger("temporalio.workflow").warning("hm", extra={"temporal_workflow": workflow})
    (line,) = read(lines)
    assert line["session"] == "abc" and line["workflow_type"] == "SessionWorkflow"


def test_an_error_keeps_its_traceback_in_the_line(lines: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("berth.test").exception("failed")
    (line,) = read(lines)
    assert "RuntimeError: boom" in line["error"] and "\n" not in lines.getvalue().strip()
