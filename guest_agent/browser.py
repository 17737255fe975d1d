"""Browser steps: Playwright driving the machine's Chromium, one page whose context (cookies,
storage) lasts as long as the guest, so the steps of a session share it.

Chromium starts at the first browser step. Every step reports what it did as output lines
and ends with a screenshot of the page, also when its action failed. Importing this module
needs Playwright, which the guest treats as optional (no browser capability without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Browser as Chromium
from playwright.async_api import BrowserContext, Page, Playwright, async_playwright
from playwright.async_api import Error as PlaywrightError

from guest_agent import chromium as wrapper
from guest_agent.execution import Artifact, Execution
from guest_agent.protocol import MAX_ARTIFACT_BYTES, MAX_RESULT_CHARS
from guest_agent.user import StepUser, own_environment

LAUNCH_TIMEOUT_MS = 180_000
# In a machine without a GPU or a way out: no sandbox of its own (the machine is one, and
# Chromium's needs privileges its user lacks), and none of the background traffic that
# would only meet refused connections.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}
# JPEG qualities tried in turn until a screenshot fits an artifact frame.
QUALITIES = (80, 60, 40, 20)
# Page text that a page_text_contains check looks at.
MAX_PAGE_TEXT = 1024 * 1024
# Playwright's messages run to many lines of call log: the first few say it.
ERROR_LINES = 3


@dataclass
class Ran:
    """How a browser step went, for its check and its exit."""

    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    page_text: str | None = None


class Browser:
    def __init__(self, executable: str, user: StepUser | None = None) -> None:
        self.executable = executable
        self.user = user
        self._lock = asyncio.Lock()  # one step at a time drives the page
        self._playwright: Playwright | None = None
        self._chromium: Chromium | None = None
        self._context: BrowserContext | None = None
        self._page: Page | None = None

    async def page(self) -> Page:
        """The session's page: Chromium is started on first use, and again if it died."""
        if self._chromium is None or not self._chromium.is_connected():
            if self._playwright is None:
                self._playwright = await async_playwright().start()
            self._chromium = await self._playwright.chromium.launch(**self._launch())
            self._context = await self._chromium.new_context(
                viewport={"width": VIEWPORT["width"], "height": VIEWPORT["height"]}
            )
            self._page = None
        if self._page is None or self._page.is_closed():
            assert self._context is not None
            self._page = await self._context.new_page()
        return self._page

    def _launch(self) -> dict[str, Any]:
        """How Playwright starts Chromium: through the step user's wrapper if there is one."""
        # A VM under TCG (no KVM) takes its time: ~40 s to a first page, against Playwright's
        # default of 30 s for the launch alone.
        options: dict[str, Any] = {"args": FLAGS, "headless": True, "timeout": LAUNCH_TIMEOUT_MS}
        if self.user is None:
            return {**options, "executable_path": self.executable, "env": own_environment()}
        # The launcher runs as root: what it is told comes from the agent alone.
        return {
            **options,
            "executable_path": str(wrapper.LAUNCHER),
            "env": own_environment(
                BERTH_PYTHON=sys.executable,
                BERTH_AGENT_ROOT=str(Path(wrapper.__file__).parent.parent),
                BERTH_CHROMIUM=self.executable,
                BERTH_GUEST_USER=self.user.name,
            ),
        }

    async def close(self) -> None:
        chromium, playwright = self._chromium, self._playwright
        self._playwright = self._chromium = self._context = self._page = None
        with contextlib.suppress(Exception):  # it may be dead already
            if chromium is not None:
                await chromium.close()
            if playwright is not None:
                await playwright.stop()

    async def run(self, execution: Execution, step: dict[str, Any], want_text: bool) -> Ran:
        """Do the step's action, then screenshot the page; ``want_text`` reads the page's
        text for a check."""
        async with self._lock:
            try:
                page = await self.page()
            except Exception as exc:  # Playwright's driver fails with bare Exceptions too
                await self.close()  # the next step starts afresh
                return Ran(error=f"the browser did not start: {_first_lines(exc)}")
            ran = Ran()
            try:
                await _act(page, execution, step, ran.result)
            except PlaywrightError as exc:
                ran.error = f"{step.get('action')} failed: {_first_lines(exc)}"
                await execution.say(ran.error, "stderr")
            with_page = await _settled(page, execution)
            if with_page:
                ran.result["url"] = page.url
                ran.result["title"] = await page.title()
                if want_text:
                    ran.page_text = (await page.inner_text("body"))[:MAX_PAGE_TEXT]
                await _screenshot(page, execution)
            return ran


async def _act(
    page: Page, execution: Execution, step: dict[str, Any], result: dict[str, Any]
) -> None:
    action = step.get("action")
    timeout = float(step.get("timeout_s") or 30) * 1000
    selector = str(step.get("selector") or "")
    if action == "navigate":
        url = str(step["url"])
        response = await page.goto(url, timeout=timeout)
        status = response.status if response is not None else None
        result["status"] = status
        await execution.say(f"navigate {url} → {status}, title {await page.title()!r}")
    elif action == "click":
        await page.click(selector, timeout=timeout)
        await execution.say(f"click {selector}")
    elif action == "type":
        text = str(step.get("text", ""))
        await page.fill(selector, text, timeout=timeout)
        await execution.say(f"type {len(text)} characters into {selector}")
    elif action == "select":
        chosen = await page.select_option(selector, str(step.get("value")), timeout=timeout)
        await execution.say(f"select {', '.join(chosen) or 'nothing'} in {selector}")
    elif action == "extract":
        text = await page.inner_text(selector or "body", timeout=timeout)
        result["text"] = text[:MAX_RESULT_CHARS]
        await execution.say(text)
    elif action == "wait_for":
        if selector:
            await page.wait_for_selector(selector, state="visible", timeout=timeout)
            await execution.say(f"wait for {selector}: visible")
        else:
            text = str(step.get("text", ""))
            await page.get_by_text(text).first.wait_for(state="visible", timeout=timeout)
            await execution.say(f"wait for text {text!r}: visible")
    elif action == "screenshot":
        await execution.say(f"screenshot of {page.url}")
    else:
        raise PlaywrightError(f"unknown browser action {action!r}")


async def _settled(page: Page, execution: Execution) -> bool:
    """Let a navigation the action started finish, so the URL and text seen afterwards are
    the new page's; False if the page is gone."""
    try:
        await page.wait_for_load_state("load", timeout=10_000)
    except PlaywrightError as exc:
        await execution.say(f"the page did not finish loading: {_first_lines(exc)}", "stderr")
    return not page.is_closed()


async def _screenshot(page: Page, execution: Execution) -> None:
    try:
        for quality in QUALITIES:
            data = await page.screenshot(type="jpeg", quality=quality, timeout=10_000)
            if len(data) <= MAX_ARTIFACT_BYTES:
                execution.artifacts.append(Artifact("screenshot.jpg", "image/jpeg", data))
                return
        await execution.say("no screenshot: too large even at low quality", "stderr")
    except PlaywrightError as exc:
        await execution.say(f"no screenshot: {_first_lines(exc)}", "stderr")


def _first_lines(exc: Exception) -> str:
    return " ".join(str(exc).strip().splitlines()[:ERROR_LINES])
