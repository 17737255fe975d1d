"""The terminal's lines as rebuilt from the keys, for the audit log and the command policy."""

from __future__ import annotations

from sandboxes.policy import load_policy
from ui.terminal import Lines


def test_lines_are_rebuilt_from_the_keys() -> None:
    lines = Lines(policy=None)
    assert lines.feed("ls -lx\x7fa\r") == "ls -lx\x7fa\r"
    assert lines.done == [("ls -la", None)]
    # Unpoliced, every key passes (history, completion, arrows).
    assert lines.feed("\x1b[A\t\r") == "\x1b[A\t\r"


def test_under_the_policy_a_refused_line_is_erased_not_run() -> None:
    lines = Lines(policy=load_policy("default"))
    assert lines.feed("sudo id\r") == "sudo id\x15"
    assert lines.done[0][0] == "sudo id" and lines.done[0][1]
    assert lines.feed("echo fine\r") == "echo fine\r"
    assert lines.done[-1] == ("echo fine", None)
    # Keys that would run a line not judged (history, completion, search) do not pass.
    assert lines.feed("\x1b[A\t\x12\r") == "\r"
