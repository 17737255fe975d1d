"""Hands on the machine in a real browser (Playwright driving Debian's Chromium, headless)
against the whole system as `make run` starts it, its sandboxes Docker containers: upload a
CSV, transform it with a task, download the result; type in the shell, reload, its output
is back; preview a server a task started as a service, share it, revoke the share."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    FilePayload,
    Page,
    expect,
    sync_playwright,
)

from tests.e2e.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PASSWORD, shoot
from tests.support.local import LocalSystem

TABLE = "name,count\nalpha,1\nbeta,2\n"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running = LocalSystem.start(tmp_path_factory.mktemp("berth-hands-ui"), "handsui")
    yield running.base
    assert running.stop() == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def context(browser: Browser, system: str) -> Iterator[BrowserContext]:
    made = browser.new_context(base_url=system, viewport=DESKTOP, accept_downloads=True)
    made.set_default_timeout(30_000)
    yield made
    made.close()


@pytest.fixture(scope="module")
def page(context: BrowserContext) -> Page:
    """Signed up, on a new session's page once its machine is ready."""
    opened = context.new_page()
    opened.goto("/")
    opened.get_by_label("Email").fill("hands@example.com")
    opened.get_by_label("Password").fill(PASSWORD)
    opened.get_by_role("button", name="Sign up").click()
    opened.get_by_role("button", name="Start a session").click()
    expect(opened).to_have_url(re.compile(r"/sessions/[0-9a-f]{32}$"))
    expect(opened.locator("#session-status")).to_have_text("ready", timeout=120_000)
    return opened


def run(page: Page, prompt: str) -> None:
    before = page.locator("article.task").count()
    page.get_by_label("Task", exact=True).fill(prompt)
    page.get_by_role("button", name="Run").click()
    expect(page.locator("article.task")).to_have_count(before + 1)
    tid = (page.locator("article.task").first.get_attribute("id") or "").removeprefix("task-")
    expect(page.locator(f"#task-{tid}-status")).to_have_text("succeeded", timeout=60_000)


def open_files(page: Page) -> None:
    page.locator("#files nav a", has_text="workspace").click()


def test_upload_transform_download(page: Page) -> None:
    files = page.locator("#files")
    expect(files.locator("form.upload")).to_be_visible(timeout=30_000)
    page.set_input_files(
        "#files input[type=file]",
        files=[FilePayload(name="in.csv", mimeType="text/csv", buffer=TABLE.encode())],
    )
    files.locator("form.upload button").click()
    expect(files).to_contain_text("uploaded in.csv", timeout=30_000)
    # A file dropped on the panel is uploaded too.
    expect(files.locator("form.upload")).to_be_visible()
    page.evaluate(
        """() => {
            const moved = new DataTransfer();
            moved.items.add(new File(["dropped\\n"], "dropped.txt", {type: "text/plain"}));
            const panel = document.querySelector("#files .tree");
            panel.dispatchEvent(new DragEvent("dragover", {bubbles: true, dataTransfer: moved}));
            panel.dispatchEvent(new DragEvent("drop", {bubbles: true, dataTransfer: moved}));
        }"""
    )
    expect(page.locator("#files")).to_contain_text("uploaded dropped.txt", timeout=30_000)
    run(page, "$ tr a-z A-Z < in.csv > out.csv")
    open_files(page)
    link = page.locator("#files a.name", has_text="out.csv")
    expect(link).to_be_visible()
    with page.expect_download() as downloading:
        link.click()
    path = downloading.value.path()
    assert path.read_text() == TABLE.upper()
    shoot(page, "session-files")


def test_typed_in_the_shell_and_back_after_a_reload(page: Page) -> None:
    shell = page.locator("#shell")
    expect(shell.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    shell.click()
    page.keyboard.type("echo typed-$((2+3))")
    page.keyboard.press("Enter")
    expect(shell.locator(".xterm-rows")).to_contain_text("typed-5")
    page.reload()
    expect(page.locator("#shell .xterm-rows")).to_contain_text("typed-5", timeout=30_000)
    # Another tab is another shell.
    page.locator("#shell-new-tab").click()
    expect(page.locator("#shell-tabs")).to_contain_text("t2")
    expect(page.locator("#shell")).to_have_attribute("data-tab", "t2")


def test_preview_of_a_service_shared_then_revoked(
    page: Page, browser: Browser, system: str, context: BrowserContext
) -> None:
    run(page, "$ service: python3 -m http.server --bind 127.0.0.1 8125")
    page.reload()
    expect(page.locator("#services")).to_contain_text("running")
    port = page.locator("#previews li[data-port='8125']")
    expect(port).to_be_visible()
    with context.expect_page() as opening:
        port.get_by_role("link", name="port 8125").click()
    preview = opening.value
    expect(preview.locator("body")).to_contain_text("Directory listing")
    preview.close()
    port.get_by_role("button", name="share").click()
    url = page.locator("#share-url").get_attribute("href") or ""
    assert url.startswith("/preview/")
    stranger = browser.new_context(base_url=system)  # no login: the link is the key
    try:
        visit = stranger.new_page()
        answer = visit.goto(url)
        assert answer is not None and answer.status == 200
        expect(visit.locator("body")).to_contain_text("Directory listing")
        page.locator("#previews li[data-share] button", has_text="revoke").click()
        expect(page.locator("#previews")).to_contain_text("revoked")
        answer = visit.goto(url)
        assert answer is not None and answer.status == 403
    finally:
        stranger.close()
    shoot(page, "session-previews")
