"""The whitelisted terminal: a template's command policy, and the judge that holds a command
line to it before the guest runs it.

The judge is pure and deterministic: it parses the line (sandboxes.shell), then checks every
simple command of every pipeline against the policy's programs and argument rules, and the
redirections and ``cd``s against the workspace. It never runs anything. The VM is the real
boundary; the policy is a second line that keeps an agent to plain, inspectable commands.
"""

from __future__ import annotations

import posixpath
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

import vm_templates
from sandboxes.shell import RESERVED, ShellSyntaxRefused, SimpleCommand, Word, parse

POLICY_FILE = "policy.toml"


class ProgramRule(BaseModel):
    """What one allowed program may be given. Options are matched as GNU getopt reads them:
    short ones inside clusters (``-rf``), long ones by any prefix (``--no-pres``)."""

    model_config = ConfigDict(extra="forbid")

    forbid: list[str] = Field(default=[], description="options refused")
    # "workspace": every operand and option value, read as a path, stays in the workspace;
    # "below": as workspace, and never a workspace root itself (rm, mv).
    paths: Literal["any", "workspace", "below"] = "any"
    write_options: list[str] = Field(
        default=[], description="options whose value is a file written: it must be in the workspace"
    )
    option_values: dict[str, list[str]] = Field(
        default={}, description="options allowed only with one of these values"
    )
    max_args: int | None = None
    max_operands: int | None = None
    subcommands: list[str] | None = Field(
        default=None, description="if set, the first operand must be one of these"
    )
    # python3: what follows the script is the script's own; the script must be named.
    script: bool = False
    # tar: the first word is an option cluster even without a dash (`tar xzf a.tgz`).
    bundled_first_arg: bool = False
    # A check of the program's own language, written in code (sed scripts, chmod modes...).
    check: Literal["sed", "chmod", "git", "cd"] | None = None
    config_keys: list[str] = Field(default=[], description="git: keys `git config` may set")


class CommandPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    home: str = Field(default="/root", description="the guest's home and working directory")
    workspace: list[str] = Field(default=["/root", "/tmp"], description="where writes may go")
    allow_chaining: bool = True  # ; && || and newlines between commands
    allow_pipes: bool = True
    allow_background: bool = False  # a trailing or joining `&`
    allow_redirects_in_workspace: bool = True
    redirect_devices: list[str] = Field(
        default=["/dev/null"], description="files outside the workspace a redirection may name"
    )
    programs: dict[str, ProgramRule]


class PolicyVerdict(BaseModel):
    allowed: bool
    reason: str = ""


ALLOWED = PolicyVerdict(allowed=True)


class Refused(Exception):
    pass


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


class Judge:
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
        text = word.text.replace("\0HOME\0", self.policy.home)
        return Word(text, word.glob, word.assignment, word.wildcard_first)

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
        if rule.check is not None and rule.check != "cd":
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
        for known in [*self.rule.write_options, *self.rule.option_values]:
            if known == flag or (long and known.startswith("--") and known.startswith(flag)):
                return known
        return None

    def next_value(self, i: int, flag: str) -> str:
        if i + 1 >= len(self.args):
            raise self.refuse(flag, "needs a value")
        return self.args[i + 1].text

    def value(self, option: str, value: str) -> None:
        allowed = self.rule.option_values.get(option)
        if allowed is not None:
            if self.rule.script:
                self.module = value
            if value not in allowed:
                raise self.refuse(
                    f"{option} {value}",
                    f"is refused by this policy; `{option}` may be one of: {', '.join(allowed)}",
                )
            return
        self.judge.inside(value, f"`{self.program} {option} {value}`")

    def path_like(self, value: str, text: str) -> None:
        if self.rule.paths != "any":
            self.judge.inside(value, f"`{self.program} {text}`")


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
}


def check_sed(args: Arguments) -> None:
    """sed's own language: only editing commands, never `e` (run a command), `w`/`W`
    (write a file), `r`/`R` (read one) or the `s///e` and `s///w` flags. With `-i` it
    writes its files, which must then be in the workspace. Options are read as GNU getopt
    reads them, long ones by any unique prefix."""
    scripts: list[str] = []
    operands: list[str] = []
    in_place = options_ended = False
    texts = [a.text for a in args.args]
    k = 0

    def next_word() -> str:
        nonlocal k
        k += 1
        return texts[k - 1] if k <= len(texts) else ""

    while k < len(texts):
        text = next_word()
        if options_ended or text == "-" or not text.startswith("-"):
            operands.append(text)
        elif text == "--":
            options_ended = True
        elif text.startswith("--"):
            name, eq, value = text.partition("=")
            option = getopt_long(name, SED_LONG)
            if option is None:
                raise args.refuse(text, "is not an option sed reads unambiguously")
            if SED_LONG[option] and not eq:
                value = next_word()
            if option == "--expression":
                scripts.append(value)
            in_place = in_place or option == "--in-place"
        else:
            for j, letter in enumerate(text[1:], start=1):
                if letter == "i":
                    in_place = True
                    break  # the rest is a backup suffix
                if letter in "efl":  # the rest of the word, or the next word, is the value
                    value = text[j + 1 :] or next_word()
                    if letter == "e":
                        scripts.append(value)
                    break
    if not scripts and operands:
        scripts, operands = [operands[0]], operands[1:]
    for script in scripts:
        SedScript(script).check()
    if in_place:
        for operand in operands:
            args.judge.inside(operand, f"`sed -i {operand}`")


# GNU sed's long options; True for those that must have a value (--in-place takes one only
# after `=`).
SED_LONG = {
    **dict.fromkeys(("--expression", "--file", "--line-length"), True),
    **dict.fromkeys(
        (
            *("--in-place", "--quiet", "--silent", "--debug", "--posix", "--regexp-extended"),
            *("--separate", "--sandbox", "--unbuffered", "--null-data", "--zero-terminated"),
            *("--follow-symlinks", "--binary", "--help", "--version"),
        ),
        False,
    ),
}


def getopt_long(name: str, options: Iterable[str]) -> str | None:
    """The long option getopt reads ``name`` as: an exact name, or the one it is a prefix
    of; None if it is unknown or ambiguous."""
    matches = [option for option in options if option.startswith(name)]
    if name in matches:
        return name
    return matches[0] if len(matches) == 1 else None


def is_number(text: str) -> bool:
    """Only ASCII digits: str.isdigit also accepts `²`, which int() and bash do not."""
    return text.isascii() and text.isdigit()


class SedScript:
    # Commands that only edit the text stream.
    EDITS = frozenset("pPdDqQnNgGhHxl=")
    LABELS = frozenset("bTt:")
    TEXT = frozenset("aic")

    def __init__(self, script: str) -> None:
        self.s = script
        self.i = 0

    def refuse(self, what: str) -> Refused:
        return Refused(
            f"the sed script `{self.s}` uses {what}, which this policy refuses; sed may only "
            "edit text (s, y, p, d, q, a, i, c and the like)"
        )

    def check(self) -> None:
        s = self.s
        while self.i < len(s):
            ch = s[self.i]
            if ch in " \t\n;!{}" or is_number(ch) or ch in "$,~+":
                self.i += 1
            elif ch in "/\\":
                self.delimited(
                    1 if ch == "/" else 2, ch if ch == "/" else s[self.i + 1 : self.i + 2]
                )
                while self.i < len(s) and s[self.i] in "IM":
                    self.i += 1
            elif ch == "s":
                self.substitute()
            elif ch == "y":
                self.i += 1
                delim = self.take_delimiter()
                self.delimited(0, delim)
                self.delimited(0, delim)
            elif ch in self.EDITS:
                self.i += 1
            elif ch in self.LABELS:
                self.label()
            elif ch in self.TEXT or ch == "#":
                self.to_line_end()
            elif ch in "eWwRrFvz":
                raise self.refuse(f"the `{ch}` command ({SED_WHY.get(ch, 'not an edit')})")
            else:
                raise self.refuse(f"`{ch}`, a command this policy does not know")

    def take_delimiter(self) -> str:
        if self.i >= len(self.s) or self.s[self.i] in "\n\\":
            raise self.refuse("a malformed command")
        delim = self.s[self.i]
        self.i += 1
        return delim

    def delimited(self, skip: int, delim: str) -> None:
        """Move past text up to an unescaped ``delim`` (``skip`` chars of opening first)."""
        self.i += skip
        while self.i < len(self.s):
            ch = self.s[self.i]
            if ch == "\\":
                self.i += 2
                continue
            self.i += 1
            if ch == delim:
                return
        raise self.refuse("an unterminated expression")

    def substitute(self) -> None:
        self.i += 1
        delim = self.take_delimiter()
        self.delimited(0, delim)
        self.delimited(0, delim)
        while self.i < len(self.s) and self.s[self.i] not in ";\n}":
            flag = self.s[self.i]
            if flag in "ew":
                raise self.refuse(f"the `s///{flag}` flag ({SED_WHY[flag]})")
            if not (is_number(flag) or flag in "gpiImM \t"):
                raise self.refuse(f"the `s///{flag}` flag, which this policy does not know")
            self.i += 1

    def label(self) -> None:
        """GNU sed ends a label at `;` or `}` as well as at a line end: what follows is
        a command. (Ending at a blank too only ever reads more of the script as commands.)"""
        self.i += 1
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1
        while self.i < len(self.s) and self.s[self.i] not in " \t\n;}":
            self.i += 1

    def to_line_end(self) -> None:
        while self.i < len(self.s) and self.s[self.i] != "\n":
            self.i += 1


SED_WHY = {
    "e": "it runs a shell command",
    "w": "it writes a file",
    "W": "it writes a file",
    "r": "it reads a file into the output",
    "R": "it reads a file into the output",
    "F": "not an edit",
    "v": "not an edit",
    "z": "not an edit",
}


def check_chmod(args: Arguments) -> None:
    """No set-user-ID, set-group-ID or sticky bits: a mode operand is the first operand."""
    if not args.operands:
        return
    mode = args.operands[0]
    # An octal mode's digits before the last three are the special bits, however padded.
    special = "s" in mode or "t" in mode or (is_number(mode) and len(mode.lstrip("0")) >= 4)
    if special:
        raise args.refuse(mode, "sets the setuid, setgid or sticky bit, which this policy refuses")


def check_git(args: Arguments) -> None:
    """No global options before the subcommand (some take a value the judge would read as
    the subcommand, others move git's ground), bar a lone `--version` or `--help`; and
    `git config` may set only the listed keys: others (aliases, pagers, hooks, ssh
    commands) make git run programs."""
    words = [a.text for a in args.args]
    if words and words[0].startswith("-") and words not in (["--version"], ["--help"]):
        raise args.refuse(
            words[0],
            "is a global option before the subcommand, which this policy refuses; "
            "give options after the subcommand",
        )
    operands = args.operands
    if not operands or operands[0] != "config":
        return
    at = words.index("config")
    for word in words[at + 1 :]:
        if word.startswith("-") and word not in ("--global", "--local", "--get", "--list", "-l"):
            raise args.refuse(f"config {word}", "is refused by this policy")
    keys = operands[1:2]
    if keys and keys[0].lower() not in {k.lower() for k in args.rule.config_keys}:
        raise args.refuse(
            f"config {keys[0]}",
            "sets a key this policy does not allow (aliases, pagers, hooks and ssh commands "
            f"run programs); allowed keys: {', '.join(args.rule.config_keys)}",
        )


CHECKS = {"sed": check_sed, "chmod": check_chmod, "git": check_git}


def load_policy(template: str, override: Path | None = None) -> CommandPolicy:
    """The template's policy (vm_templates/<template>/policy.toml), or the admin's file in
    its place."""
    path = override or vm_templates.path(template) / POLICY_FILE
    with path.open("rb") as file:
        data = tomllib.load(file)
    data.setdefault("name", template)
    return CommandPolicy.model_validate(data)
