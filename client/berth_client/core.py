"""What the sync and async clients share: each API call described once (``Call``), when a
failed one is tried again, and the reading of a Server-Sent Events stream. The two clients
differ only in how they send."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel

from berth_client import errors
from berth_client.models import TASK_FINAL, Event, TaskOut

# A page of a list: the most the API gives at once.
PAGE = 200
# Gaps between tries of a call that may be repeated (seconds); a 429's Retry-After wins.
BACKOFF = (0.5, 1.0, 2.0, 4.0)
# Statuses after which the same request may succeed.
TRANSIENT = (429, 502, 503, 504)
# An idle stream gets a keepalive every 15 s: three missed mean the link is gone.
STREAM_READ_S = 50.0
# Consecutive failed reconnects before a stream gives up.
STREAM_TRIES = 8


@dataclass(frozen=True)
class Call:
    """One API request. ``repeatable``: sending it twice does what sending it once does
    (a read, or a submission carrying its Idempotency-Key), so it is retried after a lost
    answer or a transient status; any other call is retried only when it never left."""

    method: str
    path: str
    body: BaseModel | None = None
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    repeatable: bool = False
    content: bytes | None = None  # a raw body (an upload), sent instead of ``body``

    def json(self) -> Any:
        return None if self.body is None else self.body.model_dump(mode="json", exclude_none=True)


def submission(path: str, body: BaseModel, key: str | None) -> Call:
    """A POST that the server runs once per Idempotency-Key, so it is safe to retry."""
    return Call("POST", path, body, headers={"Idempotency-Key": key or str(uuid.uuid4())},
                repeatable=True)  # fmt: skip


def delay(call: Call, attempt: int, outcome: httpx.Response | Exception) -> float | None:
    """How long to wait before trying ``call`` again after ``outcome`` (its ``attempt``-th
    try, from 0), or None: do not."""
    if attempt >= len(BACKOFF):
        return None
    if isinstance(outcome, httpx.Response):
        if outcome.status_code not in TRANSIENT:
            return None
        # A 429 is a refusal before any work: safe to repeat whatever the call.
        if not call.repeatable and outcome.status_code != 429:
            return None
        return errors.retry_after(outcome) or BACKOFF[attempt]
    never_sent = isinstance(outcome, httpx.ConnectError | httpx.ConnectTimeout)
    if (call.repeatable and isinstance(outcome, httpx.TransportError)) or never_sent:
        return BACKOFF[attempt]
    return None


def checked(response: httpx.Response) -> httpx.Response:
    """The response, or its problem raised."""
    if response.is_error:
        raise errors.from_response(response)
    return response


def next_page(response: httpx.Response) -> str | None:
    """The URL of the list's next page (its Link header), if any."""
    found = response.links.get("next", {}).get("url")
    return str(found) if found else None


class SSEReader:
    """Turns a stream's lines into events (the ``data`` of each message is the event as
    JSON); comments and keepalives give nothing."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return Event.model_validate(json.loads(data))
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


def stream_timeout(http: httpx.Timeout, idle: float | None) -> httpx.Timeout:
    """A stream's: as the client's to connect; to read, ``idle`` (a quiet stream is its end)
    or long enough for keepalives."""
    return httpx.Timeout(http.connect, read=idle or STREAM_READ_S)


def stream_headers(after: int) -> dict[str, str]:
    return {"Last-Event-ID": str(after), "Accept": "text/event-stream"}


def auth_headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": "berth-client/0.1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def is_end(event: Event) -> bool:
    """Whether ``event`` is its task's final status."""
    return event.type == "task.status" and event.data.get("status") in TASK_FINAL


def finished(task: TaskOut, check: bool) -> TaskOut:
    """``task``; with ``check``, TaskFailed unless it succeeded."""
    if check and task.status != "succeeded":
        raise errors.TaskFailed(task)
    return task
