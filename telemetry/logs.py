"""One log format for every Berth process (the supervisor, the worker, the API): text lines,
or JSON lines (BERTH_LOG_FORMAT=json) that a log store can index by what they are about.

What a line is about travels in context variables, set where the work starts (an activity,
an API request) and read by the formatter, so no call site passes ids by hand. Temporal's
own loggers add the workflow or activity they run in, from which the session is read too.
Log messages name ids and states, never a prompt or a secret: the formatter writes the
message and these fields, nothing else of the record.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from telemetry import tracing

Format = Literal["text", "json"]

# What the current work is about: its session, task, step, and trace (request) ids.
FIELDS = ("session", "task", "step", "trace")
_context: ContextVar[Mapping[str, str] | None] = ContextVar("berth_log_context", default=None)
TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"
SESSION_WORKFLOW_PREFIX = "session-"


@contextmanager
def about(**ids: str | int | None) -> Iterator[None]:
    """Lines logged within are about these ids (added to any already set)."""
    known = {k: str(v) for k, v in ids.items() if v is not None and k in FIELDS}
    token = _context.set({**current(), **known})
    try:
        yield
    finally:
        _context.reset(token)


def current() -> Mapping[str, str]:
    return _context.get() or {}


def _temporal(record: logging.LogRecord) -> dict[str, str]:
    """The workflow (and activity) a Temporal logger's record comes from."""
    found: dict[str, str] = {}
    for attribute in ("temporal_workflow", "temporal_activity"):
        info = getattr(record, attribute, None)
        if isinstance(info, Mapping):
            for key in ("workflow_id", "workflow_type", "activity_type"):
                if info.get(key):
                    found[key] = str(info[key])
    workflow = found.get("workflow_id", "")
    if workflow.startswith(SESSION_WORKFLOW_PREFIX):
        found["session"] = workflow.removeprefix(SESSION_WORKFLOW_PREFIX)
    return found


def _trace() -> dict[str, str]:
    """The current span's trace id (an activity's, a workflow's), when traces are on."""
    found = tracing.current_trace_id() if tracing.enabled() else None
    return {"trace": found} if found else {}


class JsonLines(logging.Formatter):
    """A record as one JSON object on one line."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "process": self.process,
            "host": self.host,
            "logger": record.name,
            "message": record.getMessage(),
            **_temporal(record),
            **_trace(),
            **current(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(
    process: str,
    fmt: Format,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    text: str = TEXT,
) -> None:
    """Every logger of this process (uvicorn's and Temporal's too) to ``stream`` (stderr),
    in ``fmt``; ``text`` is the layout of a text line."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines(process) if fmt == "json" else logging.Formatter(text))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
