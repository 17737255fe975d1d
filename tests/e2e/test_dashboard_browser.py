"""The dashboard in a real browser: Playwright driving Debian's Chromium, headless, against
the whole system started as `make run` starts it (its planner a scripted model on loopback,
its sandboxes Docker containers). Screenshots at desktop and phone sizes go to
test-artifacts/ (BERTH_TEST_ARTIFACTS elsewhere)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Request,
    ViewportSize,
    expect,
    sync_playwright,
)

from tests.e2e.test_agent import Agent, title_task
from tests.support.local import LocalSystem, free_port, python_script
from tests.support.scripted_llm import ScriptedLLM

CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the rest keep it off the (closed) network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=375, height=812)
PASSWORD = "correct horse battery"
SLOW = 40  # lines the slow command prints, 0.15 s apart
ARTIFACTS = Path(
    os.environ.get("BERTH_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


@pytest.fixture(scope="module")
def agent() -> Agent:
    return Agent()


@pytest.fixture(scope="module")
def page_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, agent: Agent, page_port: int) -> Iterator[str]:
    with ScriptedLLM(script=agent) as llm:
        running = LocalSystem.start(
            tmp_path_factory.mktemp("berth-ui"),
            "ui",
            {
                "BERTH_SANDBOX_PROVIDER": "docker",
                **llm.settings,
                "BERTH_SESSION_HIBERNATE_AFTER_S": "4",
                # Streams end this often and the pages reconnect: drops, on purpose.
                "BERTH_STREAM_LIFETIME_S": "2",
                "BERTH_SANDBOX_HOST_PORTS": f"[{page_port}]",
            },
        )
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
    made = browser.new_context(base_url=system, viewport=DESKTOP)
    made.set_default_timeout(30_000)
    yield made
    made.close()


@pytest.fixture(scope="module")
def console() -> list[str]:
    """The page's console errors: none but those a test causes on purpose (and removes)."""
    return []


# What htmx logs when an EventSource reconnects (here every 2 s, on purpose).
RECONNECTED = "Event"


@pytest.fixture(scope="module")
def page(context: BrowserContext, console: list[str]) -> Iterator[Page]:
    opened = context.new_page()
    opened.on(
        "console",
        lambda m: console.append(m.text) if m.type == "error" and m.text != RECONNECTED else None,
    )
    opened.on("pageerror", lambda e: console.append(str(e)))
    yield opened
    assert console == []


def shoot(page: Page, name: str) -> None:
    """The page at desktop and at phone size, saved as test artifacts; nothing may stick out
    sideways on the phone."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}-1280x800.png")
    page.set_viewport_size(PHONE)
    page.screenshot(path=ARTIFACTS / f"{name}-375x812.png", full_page=True)
    overflow = page.evaluate("document.documentElement.scrollWidth")
    page.set_viewport_size(DESKTOP)
    assert overflow <= PHONE["width"], f"{name}: {overflow} px wide at phone size"


def run(page: Page, prompt: str) -> str:
    """Types a task and runs it; the new task's id."""
    before = page.locator("article.task").count()
    page.get_by_label("Task", exact=True).fill(prompt)
    page.get_by_role("button", name="Run").click()
    expect(page.locator("article.task")).to_have_count(before + 1)
    task = page.locator("article.task").first
    return (task.get_attribute("id") or "").removeprefix("task-")


def status_of(page: Page, tid: str) -> Locator:
    return page.locator(f"#task-{tid}-status")


def terminal(page: Page) -> str:
    return page.locator("#terminal").inner_text()


@pytest.fixture(scope="module")
def session(page: Page) -> str:
    """Signs up through the form and starts a session; its page is open."""
    page.goto("/")
    expect(page).to_have_url(re.compile("/login$"))
    page.get_by_label("Email").fill("ui@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", name="Sessions")).to_be_visible()
    shoot(page, "home-empty")
    page.get_by_role("button", name="Start a session").click()
    expect(page).to_have_url(re.compile(r"/sessions/[0-9a-f]{32}$"))
    expect(page.locator("#session-status")).to_have_text("ready", timeout=120_000)
    return page.url.rsplit("/", 1)[1]


def test_a_command_streams_in_and_a_reload_mid_stream_has_no_gap_or_duplicate(
    page: Page, session: str
) -> None:
    script = python_script(
        "slow.py", "import time", f"for i in range({SLOW}):", "    print(f'line-{i}', flush=True)",
        "    time.sleep(0.15)",
    )  # fmt: skip
    streams: list[int] = []  # the event each stream (re)connection goes on after

    def connected(request: Request) -> None:
        if "/events?" in request.url:
            after = int(request.url.rsplit("after=", 1)[1])
            resumed = int(request.all_headers().get("last-event-id", 0))
            streams.append(max(after, resumed))

    page.on("request", connected)
    tid = run(page, f"$ {script}")
    expect(page.locator("#terminal")).to_contain_text("line-3")
    assert "line-29" not in terminal(page), "the output came all at once, not streamed"
    page.reload()  # mid-stream: the page is drawn as of now, the stream goes on from there
    expect(page.locator("#terminal")).to_contain_text("line-12")
    expect(status_of(page, tid)).to_have_text("succeeded")
    lines = re.findall(r"line-\d+", terminal(page))
    assert lines == [f"line-{i}" for i in range(SLOW)]
    # The system ends streams after 2 s (BERTH_STREAM_LIFETIME_S): the page reconnected,
    # each time after the last event it had.
    assert len(streams) >= 2 and streams == sorted(streams) and streams[-1] > streams[0], streams
    expect(page.locator(f"#step-{tid}-0")).to_contain_text("succeeded")
    shoot(page, "session-command")


def test_fast_output_arrives_in_few_updates(page: Page, session: str) -> None:
    page.evaluate(
        "window.updates = 0;"
        "document.addEventListener('htmx:sseMessage', () => { window.updates += 1; });"
    )
    tid = run(page, "$ seq 1 5000")
    expect(status_of(page, tid)).to_have_text("succeeded")
    expect(page.locator("#terminal")).to_contain_text("4999\n5000")
    updates = page.evaluate("window.updates")
    # 5,000 lines, a handful of status changes: coalesced into batches, not a swap per line.
    assert 0 < updates < 50, updates
    text = terminal(page)
    assert text.count("\n5000\n") == 1 and "\n2500\n" in text


def test_a_task_that_falls_short_shows_why(page: Page, session: str, agent: Agent) -> None:
    agent.plans["unreachable"] = [
        {"steps": [{"kind": "terminal", "command": "echo trying"}]},
        {"steps": []},  # nothing more to try
    ]
    agent.verdicts["unreachable"] = [{"ok": False, "reason": "the moon is not in /tmp"}]
    tid = run(page, "unreachable: find the moon in /tmp")
    expect(status_of(page, tid)).to_have_text("failed", timeout=60_000)
    expect(page.locator(f"#task-{tid}-result .error")).to_contain_text("the moon is not in /tmp")


def test_a_browser_task_shows_its_plan_check_and_screenshot(
    page: Page, session: str, agent: Agent, page_port: int
) -> None:
    with title_task(agent, page_port) as prompt:
        tid = run(page, prompt)
        expect(status_of(page, tid)).to_have_text("succeeded", timeout=90_000)
    step = page.locator(f"#step-{tid}-0")
    expect(step).to_contain_text("navigate")
    expect(step).to_contain_text("success when page text contains")
    expect(step.locator(".check.ok")).to_be_visible()
    expect(page.locator(f"#task-{tid}-result .answer")).to_have_text("Form")
    large = page.locator("#shot-large img")
    expect(large).to_be_visible()
    assert large.evaluate("img => img.complete && img.naturalWidth > 0")
    expect(page.locator("#shots a[data-shot]")).to_have_count(1)
    shoot(page, "session-browser")


def test_a_failed_step_replans_and_the_revision_is_marked(
    page: Page, session: str, agent: Agent
) -> None:
    agent.plans["count"] = [
        {"steps": [{"kind": "terminal", "command": "ls /nowhere"}]},
        {"steps": [{"kind": "terminal", "command": "ls /",
                    "check": {"kind": "output_contains", "value": "etc"}}]},
    ]  # fmt: skip
    agent.verdicts["count"] = [{"ok": True, "answer": "listed", "reason": "ok"}]
    tid = run(page, "count: list the root directory")
    expect(status_of(page, tid)).to_have_text("succeeded", timeout=60_000)
    plan = page.locator(f"#task-{tid}-plan")
    expect(plan.locator(".st-failed")).to_have_count(1)
    expect(plan.locator(".revision")).to_contain_text("plan revised")
    page.reload()  # the same, drawn by the server
    expect(page.locator(f"#task-{tid}-plan .revision")).to_contain_text("plan revised")


def test_pause_resume_and_modify_a_running_task(page: Page, session: str, agent: Agent) -> None:
    nap = {"kind": "terminal", "command": "sleep 2"}
    agent.plans["naps"] = [{"steps": [nap, nap, nap]}]
    agent.verdicts["naps"] = [{"ok": True, "answer": "rested", "reason": "slept"}]
    tid = run(page, "naps: sleep a little, three times")
    expect(status_of(page, tid)).to_have_text("running", timeout=30_000)
    task = page.locator(f"#task-{tid}")
    task.get_by_role("button", name="Pause").click()
    expect(status_of(page, tid)).to_have_text("paused", timeout=30_000)
    task.get_by_label("Change this task").fill("and then say hello")
    task.get_by_role("button", name="Modify").click()
    expect(page.locator("#log")).to_contain_text("modified: and then say hello")
    task.get_by_role("button", name="Resume").click()
    expect(status_of(page, tid)).to_have_text("succeeded", timeout=60_000)
    planned = [a for a in agent.asked["naps"] if a.startswith(("plan", "verify"))]
    assert any("and then say hello" in a for a in planned)


def test_cancel_a_running_command(page: Page, session: str) -> None:
    tid = run(page, "$ sleep 60")
    expect(page.locator(f"#step-{tid}-0")).to_contain_text("running")
    page.locator(f"#task-{tid}-controls").get_by_role("button", name="Cancel").click()
    expect(status_of(page, tid)).to_have_text("cancelled", timeout=30_000)
    expect(page.locator(f"#step-{tid}-0")).to_contain_text("cancelled")


def test_a_refused_task_form_keeps_what_was_typed(
    page: Page, session: str, console: list[str]
) -> None:
    page.get_by_label("Task", exact=True).fill("   ")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#task-result .error")).to_contain_text("Type a task first")
    assert page.get_by_label("Task", exact=True).input_value() == "   "
    # The browser logs the 422 (and htmx its response error): expected here.
    assert console and all("422" in line or "Response Status Error" in line for line in console)
    console.clear()


def test_an_idle_session_hibernates_and_wakes_for_the_next_task(page: Page, session: str) -> None:
    expect(page.locator("#session-status")).to_have_text("hibernated", timeout=60_000)
    expect(page.locator("#machine")).to_contain_text("hibernated")
    tid = run(page, "$ cat slow.py")
    expect(status_of(page, tid)).to_have_text("succeeded", timeout=60_000)
    expect(page.locator("#log")).to_contain_text("machine woke up")
    expect(page.locator("#session-status")).to_have_text("ready")


def test_the_session_list_searches_and_shows_usage(page: Page, session: str) -> None:
    page.goto("/")
    row = page.locator(f"a[href='/sessions/{session}']")
    expect(row).to_be_visible()
    page.get_by_label("Search sessions").fill("naps: sleep")
    expect(page.locator("#session-list tbody tr")).to_have_count(1)
    page.get_by_label("Search sessions").fill("no such words anywhere")
    expect(page.locator("#session-list")).to_contain_text("No session matches")
    page.goto(f"/sessions/{session}")


def test_a_changed_preference_applies_to_the_next_session(
    page: Page, session: str, console: list[str]
) -> None:
    page.goto("/preferences")
    page.get_by_label("Hibernate after (seconds idle)").fill("600")
    page.get_by_label("Idle timeout (seconds)").fill("300")  # refused: hibernation comes first
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#preferences")).to_contain_text("Not saved")
    assert page.get_by_label("Hibernate after (seconds idle)").input_value() == "600"
    page.get_by_label("Hibernate after (seconds idle)").fill("90")
    page.get_by_label("Idle timeout (seconds)").fill("7200")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#preferences")).to_contain_text("Saved")
    shoot(page, "preferences")
    # The refusal was a 422, which the browser and htmx log.
    assert console and all("422" in line or "Response Status Error" in line for line in console)
    console.clear()
    page.goto("/")
    page.get_by_role("button", name="Start a session").click()
    expect(page).to_have_url(re.compile(r"/sessions/[0-9a-f]{32}$"))
    expect(page.locator("#machine")).to_contain_text("hibernates after 1 min 30 s, ends after 2 h")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="End session").click()
    expect(page.locator("#session-status")).to_have_text("ended", timeout=60_000)
    page.goto(f"/sessions/{session}")


def test_end_keeping_the_disk_then_resume_with_history_and_files(page: Page, session: str) -> None:
    tasks = page.locator("article.task").count()
    page.get_by_label("keep its disk").check()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="End session").click()
    expect(page.locator("#session-status")).to_have_text("ended", timeout=90_000)
    expect(page.locator("#log")).to_contain_text("its disk kept")
    page.reload()
    expect(page.get_by_label("Task", exact=True)).to_have_count(0)
    page.get_by_role("button", name="Resume session").click()
    expect(page.locator("#session-status")).to_have_text("ready", timeout=120_000)
    expect(page.locator("article.task")).to_have_count(tasks)  # its history
    tid = run(page, "$ cat slow.py")  # a file written before the end
    expect(status_of(page, tid)).to_have_text("succeeded", timeout=60_000)
    expect(page.locator(f"#task-{tid}-result")).to_contain_text("import time")


def test_end_the_session(page: Page, session: str) -> None:
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="End session").click()
    expect(page.locator("#session-status")).to_have_text("ended", timeout=60_000)
    page.reload()
    expect(page.get_by_label("Task", exact=True)).to_have_count(0)
    expect(page.get_by_role("button", name="Resume session")).to_have_count(0)
    expect(page.locator("#log")).to_contain_text("session ended")
    shoot(page, "session-ended")
