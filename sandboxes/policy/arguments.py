"""One simple command's arguments held to its program's rule: options read as GNU getopt
reads them (short ones in clusters, long ones by any prefix), forbidden options refused with
advice, checked option values, operands and written files kept in the workspace, and the
program's own language handed to its check (sandboxes.policy.programs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandboxes.policy.programs import CHECKS, check_mode
from sandboxes.policy.rules import ProgramRule, Refused
from sandboxes.policy.shell import Word

if TYPE_CHECKING:
    # Only a type: the judge makes the Arguments and is passed in, for its workspace checks.
    from sandboxes.policy.judge import Judge


class Arguments:
    """One simple command's arguments held to its program's rule."""

    def __init__(self, judge: Judge, program: str, rule: ProgramRule, args: list[Word]) -> None:
        self.judge = judge
        self.program = program
        self.rule = rule
        self.args = args
        self.operands: list[str] = []
        self.module: str | None = None  # python3 -m NAME: the module stands for the script

    def refuse(self, what: str, advice: str) -> Refused:
        return Refused(f"`{self.program} {what}` {advice}")

    def check(self) -> None:
        rule, args = self.rule, self.args
        if rule.max_args is not None and len(args) > rule.max_args:
            return self.fail_count("arguments", rule.max_args)
        i = 0
        options_ended = False  # after `--` every word is an operand
        while i < len(args):
            arg = args[i]
            text = arg.text
            if arg.wildcard_first and rule.model_fields_set:
                starts = "with `-`" if text.startswith("-") else "with a wildcard"
                raise self.refuse(
                    text,
                    f"starts {starts}, which could expand to a file named like an "
                    f"option; write `./{text}`",
                )
            if rule.script and (self.operands or self.module):
                self.script_arguments(args[i:])
                break
            option = not options_ended and text.startswith("-") and text != "-"
            if option and text == "--":
                options_ended = True
            elif i == 0 and rule.bundled_first_arg and not option:
                self.options("-" + text)
            elif option:
                i += self.option(i)
            else:
                self.operand(text)
            i += 1
        if rule.max_operands is not None and len(self.operands) > rule.max_operands:
            return self.fail_count("operands", rule.max_operands)
        if rule.script and self.module is None and self.operands[:1] in ([], ["-"], ["--"]):
            raise Refused(
                f"`{self.program}` without a script file reads its program from its input, "
                "which this policy refuses; write a script file and run it"
            )
        subcommand = self.operands[0] if self.operands else None
        if rule.subcommands is not None and subcommand not in (None, *rule.subcommands):
            raise self.refuse(
                self.operands[0],
                f"is not an allowed subcommand; allowed: {', '.join(rule.subcommands)}",
            )
        if rule.check is not None:
            CHECKS[rule.check](self)
        return None

    def script_arguments(self, args: list[Word]) -> None:
        """The script's own arguments are its own; a module's are held to the program's
        rule of that name (python3 -m pip), or else to this program's path rule."""
        if self.module is None:
            return
        programs = self.judge.policy.programs
        name, rule = self.module, programs.get(self.module)
        if rule is None:
            name, rule = f"{self.program} -m {self.module}", ProgramRule(paths=self.rule.paths)
        Arguments(self.judge, name, rule, args).check()

    def fail_count(self, what: str, limit: int) -> None:
        raise Refused(
            f"`{self.program}` takes at most {limit} {what} under this policy; "
            f"got `{' '.join(a.text for a in self.args)}`"
        )

    def operand(self, text: str) -> None:
        self.operands.append(text)
        if self.rule.paths != "any":
            what = f"`{self.program} {text}`"
            self.judge.inside(text, what, strictly=self.rule.paths == "below")

    def option(self, i: int) -> int:
        """Check the option at ``args[i]``; returns how many following words it consumed."""
        text = self.args[i].text
        if text.startswith("--"):
            name, eq, value = text.partition("=")
            self.forbidden_long(name, text)
            takes = self.valued(name, long=True)
            if takes is not None:
                if not eq:
                    value = self.next_value(i, name)
                self.value(takes, value)
                return 0 if eq else 1
            # An option with no `=` may be a file name that getopt will reject; check it too.
            self.path_like(value if eq else text, text)
            return 0
        word = text.split("=", 1)[0]
        if word in self.rule.forbid:  # find -exec, java-style single-dash words
            raise self.refuse(word, "is refused by this policy" + self.advice(word))
        return self.options(text, i)

    def options(self, cluster: str, i: int | None = None) -> int:
        """A cluster of short options such as ``-xzf``: each letter is an option until one
        that takes a value, which is the rest of the cluster or the next word."""
        for j in range(1, len(cluster)):
            flag = "-" + cluster[j]
            if flag in self.rule.forbid:
                advice = "is refused by this policy" + self.advice(flag)
                if cluster != flag:
                    advice = f"contains `{flag}`, which {advice}"
                raise self.refuse(cluster, advice)
            takes = self.valued(flag, long=False)
            if takes is None:
                continue
            rest = cluster[j + 1 :]
            if rest:
                self.value(takes, rest)
                return 0
            if i is None:
                return 0
            self.value(takes, self.next_value(i, flag))
            return 1
        if self.rule.paths != "any":
            # An attached value such as -t/etc cannot be told from a cluster: check each tail.
            for j in range(2, len(cluster)):
                self.path_like(cluster[j:], cluster)
        return 0

    def advice(self, option: str) -> str:
        default = "; run the command without it"
        return ADVICE.get(f"{self.program} {option}", ADVICE.get(option, default))

    def forbidden_long(self, name: str, text: str) -> None:
        for forbidden in self.rule.forbid:
            if forbidden.startswith("--") and len(name) > 2 and forbidden.startswith(name):
                raise self.refuse(
                    text, f"(`{forbidden}`) is refused by this policy" + self.advice(forbidden)
                )

    def valued(self, flag: str, long: bool) -> str | None:
        """The option's name if its value is checked (a file written, or one of a list)."""
        for known in [*self.rule.write_options, *self.rule.option_values, *self.rule.mode_options]:
            if known == flag or (long and known.startswith("--") and known.startswith(flag)):
                return known
        return None

    def next_value(self, i: int, flag: str) -> str:
        if i + 1 >= len(self.args):
            raise self.refuse(flag, "needs a value")
        return self.args[i + 1].text

    def value(self, option: str, value: str) -> None:
        if option in self.rule.mode_options:
            return check_mode(self, value)
        allowed = self.rule.option_values.get(option)
        if allowed is not None:
            if self.rule.script:
                self.module = value
            if value not in allowed:
                raise self.refuse(
                    f"{option} {value}",
                    f"is refused by this policy; `{option}` may be one of: {', '.join(allowed)}",
                )
            return None
        return self.judge.inside(value, f"`{self.program} {option} {value}`")

    def path_like(self, value: str, text: str) -> None:
        if self.rule.paths != "any":
            self.judge.inside(value, f"`{self.program} {text}`")


TAR_EXTRACT = (
    ": an archive can hold a symbolic link out of the workspace (`root -> /`) that later "
    "paths would go through unseen; unpack it with a script (Python's tarfile with "
    "filter='data' refuses such links)"
)
SYMLINK = ": a symbolic link would lead later paths out of the workspace unseen"
ADVICE = {
    "python3 -c": "; it runs inline code: write a script file and run it",
    "-exec": "; it runs other programs: list the files, then act on them in their own steps",
    "-execdir": "; it runs other programs: list the files, then act on them in their own steps",
    "-ok": "; it runs other programs",
    "-okdir": "; it runs other programs",
    "-delete": "; delete files with `rm` on named paths",
    "--to-command": "; it runs a program for each file",
    "--checkpoint-action": "; it can run a program",
    "--use-compress-program": "; it runs a program of the caller's choice",
    "tar -I": "; it runs a program of the caller's choice",
    "--upload-pack": "; it runs a program of the caller's choice",
    "--receive-pack": "; it runs a program of the caller's choice",
    "git -c": "; it sets configuration (pagers, aliases, hooks) for one command",
    "--no-preserve-root": "; it would let rm remove the root directory",
    "tar -x": TAR_EXTRACT,
    "--extract": TAR_EXTRACT,
    "--get": TAR_EXTRACT,
    "cp -s": SYMLINK,
    "--symbolic-link": SYMLINK,
    "--reference": "; give the mode itself",
}
