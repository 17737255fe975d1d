"""Webhooks end to end: a system started as `make run` starts it, and receivers of the test's
own (local HTTP servers). A user's endpoint gets signed deliveries of a real session's
events (ready, a task finished, ended) whose signatures verify with the secret it was shown
once; an endpoint that fails at first is tried again, and its delivery log shows each
attempt."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.e2e.test_operations import run_task
from tests.e2e.test_system import token_for, wait_status
from tests.support.local import LocalSystem, quiet_port

# The receiver at /flaky answers 503 this many times before it takes a delivery.
FLAKY_FAILURES = 2


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """The README's verification, as an integrator writes it."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    timestamp, signature = parts["t"], parts["v1"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, signature)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receivers:
    port: int
    got: list[Received] = field(default_factory=list)
    flaky_answers: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def taken(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path == path]


@pytest.fixture(scope="module")
def receivers() -> Iterator[Receivers]:
    found = Receivers(quiet_port())

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = 200
            with found.lock:
                if self.path == "/flaky":
                    status = 503 if len(found.flaky_answers) < FLAKY_FAILURES else 200
                    found.flaky_answers.append(status)
                if status == 200:
                    found.got.append(Received(self.path, dict(self.headers), body))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", found.port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield found
    server.shutdown()


def until(what: Callable[[], Any], timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError("not within the time")


def test_a_real_task_is_told_signed_and_a_failing_receiver_is_retried(
    receivers: Receivers, tmp_path_factory: pytest.TempPathFactory
) -> None:
    system = LocalSystem.start(
        tmp_path_factory.mktemp("berth-webhooks"),
        "hooks",
        # The receivers are on loopback, which endpoints are refused by default.
        {"BERTH_WEBHOOK_ALLOW_PRIVATE": "true"},
    )
    try:
        base = system.base
        headers = token_for(base, "hooks@example.com")
        made = httpx.post(
            f"{base}/api/webhooks",
            json={
                "url": receivers.url("/good"),
                "events": ["session.ready", "session.ended", "task.finished", "sandbox.died"],
            },
            headers=headers,
        )
        assert made.status_code == 201, made.text
        good = made.json()
        assert good["secret"].startswith("whsec_")
        flaky = httpx.post(
            f"{base}/api/webhooks",
            json={"url": receivers.url("/flaky"), "events": ["task.finished"]},
            headers=headers,
        ).json()
        # The secret is shown once: never in a listing.
        listed = httpx.get(f"{base}/api/webhooks", headers=headers).json()
        assert {w["id"] for w in listed} == {good["id"], flaky["id"]}
        assert all(w["secret"] is None for w in listed)

        sid = httpx.post(f"{base}/api/sessions", json={}, headers=headers).json()["id"]
        wait_status(base, headers, sid, "ready")
        run_task(base, headers, sid, "$ echo hooked", 0)
        assert httpx.delete(f"{base}/api/sessions/{sid}", headers=headers).status_code < 300

        def told() -> dict[str, dict[str, Any]]:
            bodies = [json.loads(r.body) for r in receivers.taken("/good")]
            found = {b["type"]: b for b in bodies}
            wanted = {"session.ready", "task.finished", "session.ended"}
            return found if wanted <= set(found) else {}

        found = until(told)
        for received in receivers.taken("/good"):
            assert verify(good["secret"], received.headers["Berth-Signature"], received.body)
            assert not verify(flaky["secret"], received.headers["Berth-Signature"], received.body)
            body = json.loads(received.body)
            assert received.headers["Berth-Event"] == body["type"]
            assert received.headers["Berth-Delivery"] == body["id"]
            assert body["session_id"] == sid
        assert found["task.finished"]["data"]["status"] == "succeeded"
        assert found["session.ended"]["data"]["status"] == "ended"
        # Each told once, though workers poll and events are recorded with retries.
        types = [json.loads(r.body)["type"] for r in receivers.taken("/good")]
        assert types.count("task.finished") == 1

        # The flaky receiver: refused twice (503), then taken, backing off between.
        (taken,) = until(lambda: receivers.taken("/flaky"))
        assert verify(flaky["secret"], taken.headers["Berth-Signature"], taken.body)
        log = httpx.get(f"{base}/api/webhooks/{flaky['id']}/deliveries", headers=headers).json()
        (delivery,) = log
        assert delivery["state"] == "delivered" and delivery["event"] == "task.finished"
        assert [a["status"] for a in delivery["attempts"]] == [503, 503, 200]
        assert delivery["attempts"][0]["error"] == "answered 503"
        good_log = httpx.get(f"{base}/api/webhooks/{good['id']}/deliveries", headers=headers)
        assert {d["state"] for d in good_log.json()} == {"delivered"}
    finally:
        assert system.stop() == 0, system.log()[-3000:]
