"""The whitelisted terminal's judge: it holds a command line to a template's command policy
before the guest runs it.

The judge is pure and deterministic: it parses the line (sandboxes.policy.shell), then checks
every simple command of every pipeline against the policy's programs and argument rules
(sandboxes.policy.arguments), and the redirections and ``cd``s against the workspace. It never
runs anything. The VM is the real boundary; the policy is a second line that keeps an agent to
plain, inspectable commands.
"""

from __future__ import annotations

import dataclasses
import posixpath
from fnmatch import fnmatchcase

from pydantic import BaseModel

from sandboxes.policy.arguments import Arguments
from sandboxes.policy.rules import CommandPolicy, Refused
from sandboxes.policy.shell import (
    GLOB_CHARS,
    RESERVED,
    ShellSyntaxRefused,
    SimpleCommand,
    Word,
    is_number,
    parse,
)


class PolicyVerdict(BaseModel):
    """Whether a command line may run; if not, a sentence saying what was refused and why."""

    allowed: bool
    reason: str = ""


ALLOWED = PolicyVerdict(allowed=True)


def judge(command: str, policy: CommandPolicy, cwd: str | None = None) -> PolicyVerdict:
    """Whether the policy lets the guest run ``command`` (started in ``cwd``, the home by
    default), and if not, a sentence saying what was refused and what to do instead."""
    try:
        judge = Judge(policy, cwd)
        if cwd is not None:
            judge.inside(".", f"the step's working directory `{cwd}`")
        judge.line(command)
    except (Refused, ShellSyntaxRefused) as exc:
        return PolicyVerdict(allowed=False, reason=str(exc))
    return ALLOWED


def may_match_dots(text: str) -> bool:
    """Whether a glob has a component that may match `.` or `..`. The paths of a glob are
    judged as written (`.*/.*/etc` stays below the workspace), which holds only if no
    component expands to a dot entry. Bash 5.2 skips them (globskipdots, on by default), but
    older bash matches them with `.*`, `.?` or `..*`. Bash matches a leading dot only with a
    literal one, so only a component starting with a dot can; one with a bracket expression
    is taken to (`[^a]`, `[[:punct:]]`: classes Python's fnmatch does not read)."""
    for component in text.split("/"):
        if not component.startswith(".") or not GLOB_CHARS & set(component):
            continue
        if "[" in component or fnmatchcase(".", component) or fnmatchcase("..", component):
            return True
    return False


class Judge:
    """One command line's judging: the policy, and every directory the line may be in."""

    def __init__(self, policy: CommandPolicy, cwd: str | None) -> None:
        self.policy = policy
        home = policy.home
        # Every directory the command might be in: a `cd` that fails leaves it where it was.
        self.cwds = {posixpath.normpath(posixpath.join(home, cwd or home))}

    def line(self, command: str) -> None:
        policy = self.policy
        for pipeline in parse(command):
            if pipeline.then == "&" and not policy.allow_background:
                raise Refused(
                    "running a command in the background (`&`) is refused by this policy; "
                    "run it in the foreground"
                )
            if pipeline.then in (";", "&&", "||", "\n") and not policy.allow_chaining:
                raise Refused(
                    "chaining commands is refused by this policy; send one command per step"
                )
            if len(pipeline.commands) > 1 and not policy.allow_pipes:
                raise Refused("pipes (`|`) are refused by this policy; send one command per step")
            for simple in pipeline.commands:
                self.simple(simple, alone=len(pipeline.commands) == 1)

    def simple(self, simple: SimpleCommand, alone: bool) -> None:
        for word in (*simple.words, *(r.target for r in simple.redirects)):
            if word.glob and may_match_dots(word.text):
                raise Refused(
                    f"the glob `{word.text}` may expand to `.` or `..` (bash before 5.2, or "
                    "without globskipdots, matches them), through which it would leave the "
                    "directory it names; put a letter after the dot (`.git*`) or name the files"
                )
        for redirect in simple.redirects:
            target = self.expand(redirect.target)
            if redirect.op in (">&", "<&") and (is_number(target.text) or target.text == "-"):
                continue  # 2>&1: one of the command's own streams, no file
            if redirect.target.glob:
                raise Refused(f"the redirection target `{target.text}` is a glob; name one file")
            if not self.policy.allow_redirects_in_workspace:
                raise Refused("redirections to files are refused by this policy")
            if target.text not in self.policy.redirect_devices:
                self.inside(target.text, f"the redirection `{redirect.op} {target.text}`")
        if not simple.words:
            return
        for word in simple.words:
            if not word.assignment:
                break
            name = word.text.split("=", 1)[0].removesuffix("+")
            raise Refused(
                f"setting the variable `{name}` before a command (`{word.text}`) is refused by "
                "this policy: it can change what a program does (PATH, LD_PRELOAD...); "
                "pass settings as arguments"
            )
        words = [self.expand(w) for w in simple.words]
        self.program(words[0].text, words[0])
        rule = self.policy.programs[words[0].text]
        Arguments(self, words[0].text, rule, words[1:]).check()
        if rule.check == "cd" and alone:
            self.change_directory(words[1:])

    def program(self, name: str, word: Word) -> None:
        if word.glob:
            raise Refused(
                f"the program name `{name}` is a glob that could expand to any program; "
                "name the program"
            )
        if name in RESERVED:
            raise Refused(
                f"`{name}` starts a shell compound command (a loop, a condition or a group), "
                "which this policy refuses; run the programs one by one"
            )
        if "/" in name:
            raise Refused(
                f"`{name}` runs a program by its path, which this policy refuses; run allowed "
                f"programs by name, and scripts as `python3 {posixpath.basename(name)}`"
            )
        if name not in self.policy.programs:
            allowed = ", ".join(sorted(self.policy.programs))
            raise Refused(
                f"`{name}` is not an allowed program in the {self.policy.name} template's "
                f"policy; allowed programs: {allowed}"
            )

    def expand(self, word: Word) -> Word:
        if "\0HOME\0" not in word.text:
            return word
        return dataclasses.replace(word, text=word.text.replace("\0HOME\0", self.policy.home))

    def resolve(self, path: str) -> set[str]:
        return {posixpath.normpath(posixpath.join(cwd, path)) for cwd in self.cwds}

    def inside(self, path: str, what: str, strictly: bool = False) -> None:
        """Refuse unless ``path`` is in the workspace from every directory it might be
        resolved in (and, if ``strictly``, not a workspace root itself)."""
        for resolved in self.resolve(path):
            if strictly and resolved in self.policy.workspace:
                raise Refused(
                    f"{what} names the workspace root `{resolved}` itself, which this "
                    "policy refuses; name what is inside it"
                )
            if not any(
                resolved == root or resolved.startswith(root.rstrip("/") + "/")
                for root in self.policy.workspace
            ):
                roots = " and ".join(self.policy.workspace)
                raise Refused(
                    f"{what} reaches `{resolved}`, outside the workspace ({roots}), which "
                    "this policy refuses; keep files in the workspace"
                )

    def change_directory(self, args: list[Word]) -> None:
        target = args[0].text if args else self.policy.home
        self.inside(target, f"`cd {target}`")
        self.cwds |= self.resolve(target)
