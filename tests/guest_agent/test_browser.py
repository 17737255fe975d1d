"""Browser steps in the guest agent, through the real gateway and protocol, driving the
host's Chromium (/usr/bin/chromium) against pages this test serves on loopback."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from guest_agent.chromium import chromium_path
from sandboxes.gateway import GuestGateway, StepKindUnsupported
from sandboxes.models import BrowserStep, Check, StepOutcome
from tests.guest_agent.test_agent import Collector, guest_link

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no Chromium on this host")

FORM = """<!doctype html><title>Form</title>
<input id="name"> <select id="color"><option value="red">Red</option>
<option value="green">Green</option></select>
<button id="go" onclick="setTimeout(() => { const p = document.createElement('p');
  p.id = 'greeting'; p.textContent = 'Hello, ' + document.getElementById('name').value
  + ' (' + document.getElementById('color').value + ')'; document.body.append(p); }, 300)">
Go</button> <a id="next" href="/next">next</a>"""


class Pages(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/form":
            body, cookie = FORM, "visited=yes"
        elif self.path == "/next":
            # What the browser sent: the cookie /form set, if the context was kept.
            body, cookie = f"<title>Next</title><p>cookie: {self.headers['Cookie']}</p>", None
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        if cookie:
            self.send_header("Set-Cookie", f"{cookie}; Path=/")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@contextlib.contextmanager
def serve_pages(host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    server = ThreadingHTTPServer((host, port), Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Artifacts:
    def __init__(self) -> None:
        self.stored: list[tuple[str, str, bytes]] = []

    async def __call__(self, name: str, media_type: str, data: bytes) -> str:
        self.stored.append((name, media_type, data))
        return f"a{len(self.stored)}"


async def run(
    gateway: GuestGateway, sandbox_id: str, step: BrowserStep, n: list[int]
) -> tuple[StepOutcome, Collector, Artifacts]:
    n[0] += 1
    out, artifacts = Collector(), Artifacts()
    outcome = await gateway.run(sandbox_id, f"b{n[0]}", step, 60, out, 0, artifacts)
    return outcome, out, artifacts


async def test_browser_steps_share_one_page_and_each_returns_a_screenshot(tmp_path: Path) -> None:
    n = [0]
    with serve_pages() as base:
        async with guest_link(tmp_path) as link:
            await link.gateway.wait_connected(link.sandbox_id, 10)
            steps = [
                BrowserStep(
                    action="navigate",
                    url=f"{base}/form",
                    check=Check(kind="url_matches", value=r"/form$"),
                ),
                BrowserStep(action="type", selector="#name", text="Ada"),
                BrowserStep(action="select", selector="#color", value="green"),
                BrowserStep(action="click", selector="#go"),
                BrowserStep(
                    action="wait_for",
                    selector="#greeting",
                    check=Check(kind="page_text_contains", value="Hello, Ada (green)"),
                ),
                BrowserStep(action="extract", selector="#greeting"),
                BrowserStep(
                    action="click", selector="#next", check=Check(kind="url_matches", value="/next")
                ),
                BrowserStep(action="wait_for", text="cookie:"),
                BrowserStep(action="screenshot"),
            ]
            outcomes = [await run(link.gateway, link.sandbox_id, step, n) for step in steps]
    for step, (outcome, _, artifacts) in zip(steps, outcomes, strict=True):
        assert outcome.ok, (step.describe(), outcome)
        (name, media_type, data), *more = artifacts.stored
        assert not more and (name, media_type) == ("screenshot.jpg", "image/jpeg")
        assert data[:3] == b"\xff\xd8\xff" and len(data) > 1000  # a JPEG, not a blank stub
        assert outcome.artifacts == ["a1"]
    navigate, _, _, _, waited, extracted, clicked, _, last = (o for o, _, _ in outcomes)
    assert navigate.result is not None and navigate.result.status == 200
    assert navigate.result.title == "Form"
    assert outcomes[0][1].texts == [f"navigate {base}/form → 200, title 'Form'\n"]
    assert navigate.check is not None and navigate.check.ok
    assert "matches" in navigate.check.detail
    assert waited.check is not None and waited.check.ok
    assert extracted.result is not None and extracted.result.text == "Hello, Ada (green)"
    assert clicked.check is not None and clicked.check.ok
    # One context across steps: the cookie /form set went along to /next.
    assert last.result is not None and last.result.url == f"{base}/next"
    assert last.result.title == "Next"
    text_outcome, out, _ = outcomes[7]
    assert text_outcome.ok and out.texts == ["wait for text 'cookie:': visible\n"]


async def test_failed_checks_and_actions_say_what_they_saw(tmp_path: Path) -> None:
    n = [0]
    with serve_pages() as base:
        async with guest_link(tmp_path) as link:
            await link.gateway.wait_connected(link.sandbox_id, 10)
            absent, _, _ = await run(
                link.gateway,
                link.sandbox_id,
                BrowserStep(
                    action="navigate",
                    url=f"{base}/form",
                    check=Check(kind="page_text_contains", value="Goodbye"),
                ),
                n,
            )
            elsewhere, _, _ = await run(
                link.gateway,
                link.sandbox_id,
                BrowserStep(action="screenshot", check=Check(kind="url_matches", value="/next$")),
                n,
            )
            missing, out, shots = await run(
                link.gateway,
                link.sandbox_id,
                BrowserStep(action="click", selector="#nowhere", timeout_s=0.5),
                n,
            )
            gone, _, _ = await run(
                link.gateway,
                link.sandbox_id,
                BrowserStep(action="navigate", url=f"{base}/missing"),
                n,
            )
    assert absent.exit_code == 0 and not absent.ok
    assert absent.check is not None and not absent.check.ok
    assert absent.check.detail.startswith("'Goodbye' not found in the page text")
    assert elsewhere.check is not None and not elsewhere.check.ok and not elsewhere.ok
    assert f"{base}/form does not match //next$/" in elsewhere.check.detail
    assert missing.exit_code == 1 and not missing.ok
    assert missing.error is not None and missing.error.startswith("click failed: ")
    assert any("#nowhere" in text for text in out.texts)
    assert len(shots.stored) == 1  # a screenshot even so
    # A 404 is an answer, not a failure of the step: the status says it.
    assert gone.ok and gone.result is not None and gone.result.status == 404


async def test_a_guest_without_a_browser_refuses_browser_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTH_CHROMIUM", str(tmp_path / "no-chromium"))
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        assert link.agent.capabilities == ["terminal", "file", "service", "channels"]
        with pytest.raises(StepKindUnsupported, match="does not run browser steps"):
            await link.gateway.run(
                link.sandbox_id,
                "x",
                BrowserStep(action="navigate", url="http://127.0.0.1:9/"),
                10,
                Collector(),
            )


async def test_a_browser_that_does_not_start_fails_the_step_and_the_next_tries_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTH_CHROMIUM", "/bin/false")  # executable, but no browser
    n = [0]
    async with guest_link(tmp_path) as link:
        await link.gateway.wait_connected(link.sandbox_id, 10)
        step = BrowserStep(action="navigate", url="http://127.0.0.1:9/")
        first, _, shots = await run(link.gateway, link.sandbox_id, step, n)
        second, _, _ = await run(link.gateway, link.sandbox_id, step, n)
    for outcome in (first, second):
        assert outcome.exit_code == 1 and not outcome.ok
        assert outcome.error is not None
        assert outcome.error.startswith("the browser did not start: ")
    assert shots.stored == []
