"""The planner's and the verifier's system prompts, the planner's built from the session's
sandbox: the step kinds its guest runs, where the workspace is and whose it is, what is
installed, and its template's command policy in brief (sandboxes/policy/brief.py). A model
told the rules does not spend its revisions finding them one refusal at a time.
"""

from __future__ import annotations

import vm_templates
from guest_agent.user import STEP_USER
from sandboxes.models import STEP_KINDS
from sandboxes.policy.brief import policy_brief
from sandboxes.policy.rules import CommandPolicy

INTRO = """\
You plan the work of an autonomous agent that acts in a Debian Linux sandbox, one step at a
time. Turn the user's task into the shortest sequence of steps that does it and shows the
result. Steps, as JSON objects:"""
STEPS = {
    "terminal": """\
- {"kind": "terminal", "command": "..."}: one command line, run non-interactively by bash
  in the workspace, held to the command policy below.""",
    "file": """\
- {"kind": "file", "op": "write", "path": "...", "content": "..."}, or op "read" or "list":
  a file in the workspace. Write scripts as files, then run them.""",
    "browser": """\
- {"kind": "browser", "action": "navigate", "url": "https://..."}; other actions: "click"
  (selector), "type" (selector, text), "select" (selector, value), "extract" (text of
  selector, or of the page), "wait_for" (selector or text), "screenshot". One browser page
  is kept across the task's steps; every browser step takes a screenshot.""",
    "service": """\
- {"kind": "service", "command": "..."}: start a long-running command (a web server) that
  keeps running after the step, its output kept, held to the policy's services rules; the
  step's output names it (s1, ...), and {"kind": "service", "action": "stop", "name": "s1"}
  stops it. Never start one with `&`.""",
}
CHECKS = """\
Give each step a success criterion, checked right after it runs, as "check":
{"kind": "exit_code", "value": "0"}, {"kind": "output_contains", "value": "TEXT"},
{"kind": "output_regex", "value": "REGEX"}, {"kind": "file_exists", "value": "PATH"}"""
BROWSER_CHECKS = """, or for
browser steps {"kind": "url_matches", "value": "REGEX"} or
{"kind": "page_text_contains", "value": "TEXT"}"""
OUTRO = """\
Steps run in order; if one fails or misses its check, you are told what happened and plan
the rest again. If the steps already run achieve the task, plan no steps.
Reply with one JSON object and nothing else: {"steps": [...]}"""

VERIFY_PROMPT = """\
You check the work of an autonomous agent against the user's task. You are given the task
and the steps the agent ran with their output. Decide whether the task is done, and write the
answer the user gets: the result itself (quote the output that matters), not a description
of the steps. Reply with one JSON object and nothing else:
{"ok": true or false, "answer": "...", "reason": "why it is or is not done"}"""


def step_kinds(template: str) -> tuple[str, ...]:
    """The step kinds a template's guest runs: a browser only where it has one (chromium
    driven by Playwright) in its image."""
    has_browser = "chromium" in vm_templates.packages(
        template
    ) and "playwright" in vm_templates.python_packages(template)
    return tuple(k for k in STEP_KINDS if k != "browser" or has_browser)


def sandbox_brief(template: str, policy: CommandPolicy) -> str:
    """The sandbox as the planner needs to know it."""
    spec = vm_templates.spec(template)
    network = {
        "public": "it may reach the internet",
        "gateway": "it reaches no network beyond the host's gateway",
        "allow": "it may reach only " + ", ".join(str(n) for n in spec.network.allow),
    }[spec.network.egress]
    kinds = step_kinds(template)
    lines = [
        f"The sandbox (template {template!r}): steps run as the user {STEP_USER!r} in "
        f"{policy.home}; files may be written only in {' and '.join(policy.workspace)}.",
        f"Step kinds it runs: {', '.join(kinds)}"
        + ("" if "browser" in kinds else " (no browser in this sandbox)")
        + f". Its machine: {spec.machine.vcpus} vCPU, {spec.machine.memory_mb} MB; {network}.",
        "Installed Debian packages: " + ", ".join(vm_templates.packages(template)) + ".",
    ]
    python = vm_templates.python_packages(template)
    lines.append(
        "Python packages beyond the standard library: " + (", ".join(python) or "none") + "."
    )
    return "\n".join([*lines, "", "The command policy:", policy_brief(policy)])


def planner_prompt(template: str, policy: CommandPolicy) -> str:
    """The planner's system prompt for a session of ``template`` held to ``policy``."""
    kinds = step_kinds(template)
    steps = "\n".join(STEPS[k] for k in STEP_KINDS if k in kinds)
    checks = CHECKS + (BROWSER_CHECKS if "browser" in kinds else "") + "."
    return "\n".join([INTRO, steps, checks, OUTRO, "", sandbox_brief(template, policy)])
