"""The terminal's lines as rebuilt from the keys, for the audit log and the command policy."""

from __future__ import annotations

import pytest

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
    assert lines.feed("echo fine\r") == "echo fine\x15echo fine\r"
    assert lines.done[-1] == ("echo fine", None)
    # Keys that would run a line not judged (history, completion, search) do not pass.
    assert lines.feed("\x1b[A\t\x12\r") == "\x15\r"


class Bash:
    """The shell's side of the keys, as far as these tests need: a line buffer that Ctrl-U
    erases, run on Enter."""

    def __init__(self) -> None:
        self.buffer, self.ran = "", list[str]()

    def take(self, keys: str) -> None:
        for key in keys:
            if key == "\r":
                self.ran.append(self.buffer)
                self.buffer = ""
            elif key == "\x15":
                self.buffer = ""
            elif key == "\x7f":
                self.buffer = self.buffer[:-1]
            else:
                self.buffer += key


def test_under_the_policy_a_line_left_typed_by_another_page_is_not_run_with_it() -> None:
    """Two pages on one tab (or a page that attached after one left a line half typed): what
    the shell runs is the line the second page's Enter had judged, not the two together."""
    policy = load_policy("default")
    first, second, bash = Lines(policy=policy), Lines(policy=policy), Bash()
    bash.take(first.feed("sudo id; "))  # no Enter: nothing is judged yet
    bash.take(second.feed("ls\r"))
    assert second.done == [("ls", None)]
    assert bash.ran == ["ls"]


@pytest.mark.parametrize("line", ["ls !!", "ls !-2:s/a/b/", 'ls "!$"'])
def test_under_the_policy_a_line_bash_would_expand_from_history_is_refused(line: str) -> None:
    lines = Lines(policy=load_policy("default"))
    assert lines.feed(line + "\r").endswith("\x15")
    assert lines.done[0][1] is not None and "history" in lines.done[0][1]
    # A "!" bash leaves alone passes on to the judge.
    lines.feed("find . ! -name x\r")
    assert lines.done[-1] == ("find . ! -name x", None)
