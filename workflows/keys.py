"""The keys of the session workflow's events, which make each one written to the log once.

A key must name the same event in every attempt of the workflow task that records it, and
only that event. A local activity writes the log during the workflow task, before the task
is done: when the task then fails or times out (a worker under load, a sticky queue's
timeout), what it wrote stays, and the next attempt runs again from the history, where
updates, signals and timers may come in another order. A key that counted the run's events
(``run/7``) then named another event in the retry: the retry's ``task.queued`` was taken
for the lost attempt's ``session.status`` and skipped, and every later event of that task
failed its projection (``no task ... in session ...``) at each retry of the batch, for
good. Keyed by what the event says and how many times the run said it before, an event of
the retry is skipped only if the lost attempt wrote that same event.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


class EventKeys:
    """Keys of one run's events. Pure: called from workflow code, the same on replay."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        # How many times each event (by type and content) was said in this run: a run's
        # history is bounded (it continues as new), and so is this.
        self.said: dict[str, int] = {}

    def key(self, type: str, data: dict[str, Any]) -> str:
        content = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
        digest = hashlib.sha256(f"{type}\n{content}".encode()).hexdigest()[:24]
        nth = self.said.get(digest, 0)
        self.said[digest] = nth + 1
        return f"{self.run_id}/{digest}/{nth}"
