"""What crosses the sandbox boundary: a sandbox's identity, a step, and how a step ended.

A step is one of three kinds (a tagged union on ``kind``): a terminal command, a browser
action, or a file operation. Each may carry a ``check``, its success criterion, which the
guest evaluates deterministically right after the step ran.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from guest_agent.protocol import MAX_RESULT_CHARS

# The most a file step writes at once.
MAX_FILE_CONTENT = 256 * 1024
MAX_CHECK_VALUE = 2000


def _short(text: str, most: int = 60) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


CheckKind = Literal[
    "exit_code", "output_contains", "output_regex", "file_exists", "url_matches",
    "page_text_contains",
]  # fmt: skip
# Checks that look at the browser's page: only a browser step has one.
BROWSER_CHECKS = ("url_matches", "page_text_contains")


class Check(BaseModel):
    """A step's success criterion. ``value`` is the expected exit code, the text or regex
    (Python syntax, searched) to find in the output or in the page's URL or text, or the
    path of a file that must exist (relative to the workspace)."""

    kind: CheckKind
    value: str = Field(min_length=1, max_length=MAX_CHECK_VALUE)

    @field_validator("value", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        # Models write an exit code as a number.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _value_fits_kind(self) -> Check:
        if self.kind == "exit_code" and not re.fullmatch(r"-?\d{1,3}", self.value):
            raise ValueError(f"an exit_code check needs a number, not {self.value!r}")
        if self.kind in ("output_regex", "url_matches"):
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"bad regex {self.value!r}: {exc}") from None
        return self

    def describe(self) -> str:
        value = _short(self.value)
        match self.kind:
            case "exit_code":
                return f"exit code is {value}"
            case "output_contains":
                return f"output contains {value!r}"
            case "output_regex":
                return f"output matches /{value}/"
            case "file_exists":
                return f"file {value} exists"
            case "url_matches":
                return f"page URL matches /{value}/"
            case "page_text_contains":
                return f"page text contains {value!r}"


class _StepBase(BaseModel):
    check: Check | None = None

    @model_validator(mode="after")
    def _check_fits_step(self) -> _StepBase:
        kind = getattr(self, "kind", "")
        if self.check is not None and self.check.kind in BROWSER_CHECKS and kind != "browser":
            raise ValueError(f"a {self.check.kind} check needs a browser step, not {kind}")
        return self


class TerminalStep(_StepBase):
    """A shell command."""

    kind: Literal["terminal"] = "terminal"
    command: str = Field(min_length=1, max_length=16_000)
    # Absolute only: the policy reads a path against the home, while the guest enters it
    # from `/`, so a relative one would be judged in one place and run in another.
    cwd: str | None = Field(
        default=None, pattern=r"^/", max_length=4096, description="An absolute directory"
    )

    def describe(self) -> str:
        return f"$ {self.command}"


BrowserAction = Literal["navigate", "click", "type", "select", "extract", "wait_for", "screenshot"]
# What each action cannot do without; ``wait_for`` needs a selector or a text.
REQUIRED: dict[str, tuple[str, ...]] = {
    "navigate": ("url",),
    "click": ("selector",),
    "type": ("selector", "text"),
    "select": ("selector", "value"),
}


class BrowserStep(_StepBase):
    """An action in the session's browser (one page, its cookies kept across steps).

    ``extract`` reads the text of ``selector`` (the whole page without one); ``wait_for``
    waits for ``selector`` to be visible or for ``text`` to appear; every action ends with a
    screenshot of the page.
    """

    kind: Literal["browser"] = "browser"
    action: BrowserAction
    url: str | None = Field(default=None, max_length=4096)
    selector: str | None = Field(default=None, min_length=1, max_length=1000)
    text: str | None = Field(default=None, max_length=16_000)
    value: str | None = Field(default=None, max_length=1000)
    timeout_s: float = Field(default=30.0, gt=0, le=300)

    @model_validator(mode="after")
    def _has_what_it_needs(self) -> BrowserStep:
        missing = [name for name in REQUIRED.get(self.action, ()) if getattr(self, name) is None]
        if missing:
            raise ValueError(f"browser action {self.action} needs {' and '.join(missing)}")
        if self.action == "wait_for" and self.selector is None and not self.text:
            raise ValueError("browser action wait_for needs a selector or a text")
        if self.url is not None and not re.match(r"https?://[^\s/]+", self.url):
            raise ValueError(f"a browser goes to http(s) URLs only, not {_short(self.url)!r}")
        return self

    def describe(self) -> str:
        target = self.selector or ""
        match self.action:
            case "navigate":
                return f"navigate {_short(self.url or '', 100)}"
            case "type":
                return f"type {_short(self.text or '')!r} into {target}"
            case "select":
                return f"select {_short(self.value or '')!r} in {target}"
            case "extract":
                return f"extract text of {target or 'the page'}"
            case "wait_for":
                return f"wait for {target or repr(_short(self.text or ''))}"
            case "screenshot":
                return "screenshot"
            case _:
                return f"{self.action} {target}"


class FileStep(_StepBase):
    """Write, read or list a file in the guest's workspace (nothing outside it)."""

    kind: Literal["file"] = "file"
    op: Literal["write", "read", "list"]
    path: str = Field(min_length=1, max_length=4096)
    content: str | None = Field(default=None, max_length=MAX_FILE_CONTENT)

    @model_validator(mode="after")
    def _write_has_content(self) -> FileStep:
        if self.op == "write" and self.content is None:
            raise ValueError("a file write needs content")
        return self

    def describe(self) -> str:
        if self.op == "write":
            return f"write {self.path} ({len((self.content or '').encode())} bytes)"
        return f"{self.op} {self.path}"


# A service's name: what the guest calls it (s1, s2, ...), for a stop.
SERVICE_NAME = r"^[a-z][a-z0-9-]{0,31}$"


class ServiceStep(_StepBase):
    """Start a long-running command that outlives the step (a web app, a server), or stop
    one. Its output is kept (bounded) in the guest; it is never restarted, and ends with the
    session's machine. A started one is named in the step's result."""

    kind: Literal["service"] = "service"
    action: Literal["start", "stop"] = "start"
    command: str | None = Field(default=None, min_length=1, max_length=16_000)
    name: str | None = Field(default=None, pattern=SERVICE_NAME)

    @model_validator(mode="after")
    def _has_what_it_needs(self) -> ServiceStep:
        if self.action == "start" and self.command is None:
            raise ValueError("starting a service needs its command")
        if self.action == "stop" and self.name is None:
            raise ValueError("stopping a service needs its name")
        return self

    def describe(self) -> str:
        if self.action == "stop":
            return f"$ service-stop: {self.name}"
        return f"$ service: {self.command}"


Step = Annotated[TerminalStep | BrowserStep | FileStep | ServiceStep, Field(discriminator="kind")]
STEP_KINDS = ("terminal", "browser", "file", "service")


class SandboxInfo(BaseModel):
    id: str
    session_id: str
    provider: str
    host_id: str
    # Activities that touch this sandbox must run on its host's worker: the guest's link
    # ends there.
    task_queue: str
    template: str
    handle: str


class Machine(BaseModel):
    """A machine found on a host, as its provider labelled it at creation."""

    sandbox_id: str
    session_id: str
    handle: str
    state: str
    created_at: datetime


class HostMachine(Machine):
    """Any Berth machine on this host, whichever install, host id or session made it: what
    `python -m berth machines` lists (and prunes)."""

    kind: Literal["docker", "libvirt"]
    name: str
    host_id: str
    # The data dir of the install that made it; empty for a machine made before machines
    # carried it.
    install: str
    address: str = ""  # a VM's, on the bridge


class CheckResult(BaseModel):
    """How a step's check came out: ``detail`` says what was checked and what was found."""

    kind: CheckKind
    ok: bool
    detail: str = Field(max_length=MAX_CHECK_VALUE + 500)


class StepResult(BaseModel):
    """What a step produced besides its output. Texts are cut to MAX_RESULT_CHARS: they
    travel in workflow payloads; whole files and screenshots are artifacts."""

    url: str | None = None  # browser: the page's URL after the step
    title: str | None = None  # browser: the page's title
    status: int | None = None  # browser navigate: the HTTP status of the answer
    text: str | None = None  # browser extract: the text read
    content: str | None = None  # file read: the content; file list: one entry a line

    @field_validator("url", "title", "text", "content")
    @classmethod
    def _bounded(cls, value: str | None) -> str | None:
        return value[:MAX_RESULT_CHARS] if value is not None else None


class StepOutcome(BaseModel):
    exit_code: int
    timed_out: bool = False
    error: str | None = None
    output_tail: str = ""
    check: CheckResult | None = None
    result: StepResult | None = None
    # Ids of the artifacts the step made (its screenshot, ...), served by the API.
    artifacts: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Ran to its end without error, exited 0 (or as an exit_code check expected), and
        its check, if any, passed."""
        if self.timed_out or self.error is not None:
            return False
        if self.check is not None:
            return self.check.ok and (self.exit_code == 0 or self.check.kind == "exit_code")
        return self.exit_code == 0

    def problem(self) -> str:
        """What went wrong, in words, for the user and the planner."""
        if self.error:
            return self.error
        if self.timed_out:
            return "timed out"
        if self.check is not None and not self.check.ok:
            return f"missed its check: {self.check.detail}"
        return f"exited with {self.exit_code}"


class MachineUsage(BaseModel):
    """A machine's resource use, sampled by its host: % of one CPU, resident MiB, and the MiB
    its own disk holds (a VM's overlay; None for a container, whose writes go to tmpfs and
    count as memory)."""

    cpu_percent: float
    memory_mb: float
    disk_mb: float | None = None


# States of a suspended machine (Docker's, libvirt's), which comes back when resumed.
SUSPENDED_STATES = frozenset({"paused", "suspended", "hibernated"})


class Health(BaseModel):
    running: bool
    guest_connected: bool
    detail: str = ""  # the machine's state, as its engine names it

    @property
    def ok(self) -> bool:
        return self.running and self.guest_connected

    @property
    def suspended(self) -> bool:
        """Paused or hibernated, its files and processes whole: woken, not replaced."""
        return not self.running and self.detail in SUSPENDED_STATES
