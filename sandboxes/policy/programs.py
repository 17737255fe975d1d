"""The per-program languages a policy can check, written in code: sed scripts (only editing
commands, backups beside their files), file modes (no special bits: chmod's, and every option
value that is a mode), find's expression (wherever it is), cd (a named directory only) and
git (no global options, `git config` only for the listed keys). A program's rule names its
check (``check = "sed"``); CHECKS maps the names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from sandboxes.policy.rules import Refused
from sandboxes.policy.shell import is_number

if TYPE_CHECKING:
    # Only a type: the arguments being checked call in here, passing themselves.
    from sandboxes.policy.arguments import Arguments


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
            if option == "--in-place":
                in_place = True
                backup_suffix(args, text, value)
        else:
            for j, letter in enumerate(text[1:], start=1):
                if letter == "i":
                    in_place = True
                    backup_suffix(args, text, text[j + 1 :])
                    break
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


def backup_suffix(args: Arguments, text: str, suffix: str) -> None:
    """GNU sed names the backup of an edited file by its suffix, with each `*` replaced by
    the file's name: a suffix with `/` (`-i/var/tmp/*`) puts the backup, the file's old
    content, in another directory. Without `/` it stays beside the file, whose directory is
    checked."""
    if "/" in suffix:
        raise args.refuse(
            text,
            "names a backup in another directory (its suffix has a `/`), which this policy "
            "refuses; use a plain suffix such as `-i.bak`",
        )


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
    """The mode chmod is given holds no special bits. GNU chmod reads a word such as `-w`,
    `-w,u+s` or `-6000` (before any `--`) as the mode, joining several with commas, and
    only when there is none is its first operand the mode."""
    modes: list[str] = []
    operands: list[str] = []
    options_ended = False
    for text in (a.text for a in args.args):
        if options_ended or text == "-" or not text.startswith("-"):
            operands.append(text)
        elif text == "--":
            options_ended = True
        elif not text.startswith("--") and not set(text[1:]) <= set(CHMOD_FLAGS):
            modes.append(text)
    for mode in modes or operands[:1]:
        check_mode(args, mode)


CHMOD_FLAGS = "Rcfv"  # chmod's short options that take no value; other letters make a mode


def check_mode(args: Arguments, mode: str) -> None:
    """Refuse a file mode (chmod's, mkdir -m's) that sets the setuid, setgid or sticky bit,
    or that this reader cannot read the way GNU does."""
    try:
        special = special_bits(mode)
    except ValueError as exc:
        raise args.refuse(mode, f"is not a file mode this policy can read ({exc})") from None
    if special:
        raise args.refuse(mode, f"sets the {' and '.join(special)} bit, which this policy refuses")


SPECIAL = (("setuid", 0o4000), ("setgid", 0o2000), ("sticky", 0o1000))


def special_bits(mode: str) -> list[str]:
    """The special bits (setuid, setgid, sticky) a GNU file mode may set: octal (`4755`), or
    symbolic clauses joined by commas, each `[ugoa]*` then one or more `[-+=]` actions of
    `rwxXst` letters, one of `ugo` (a copy) or octal digits. Raises ValueError if the mode
    is not one GNU chmod reads."""
    if mode[:1].isascii() and mode[:1].isdigit():
        if not all(c in "01234567" for c in mode) or int(mode, 8) > 0o7777:
            raise ValueError("an octal mode has the digits 0 to 7 and is at most 7777")
        return [name for name, bit in SPECIAL if int(mode, 8) & bit]
    bits = 0
    for clause in mode.split(","):
        who = clause[: len(clause) - len(clause.lstrip("ugoa"))]
        rest = clause[len(who) :]
        if not rest:
            raise ValueError(f"the clause `{clause}` has no `+`, `-` or `=`")
        while rest:
            op, rest = rest[0], rest[1:]
            if op not in "+-=":
                raise ValueError(f"`{op}` is not `+`, `-` or `=`")
            digits = rest[: len(rest) - len(rest.lstrip("01234567"))]
            if digits:
                if who:
                    raise ValueError("octal digits after `+`, `-` or `=` take no `ugoa`")
                if int(digits, 8) > 0o7777:
                    raise ValueError("an octal mode is at most 7777")
                value, rest = int(digits, 8), rest[len(digits) :]
            elif rest[:1] and rest[0] in "ugo":
                value, rest = 0, rest[1:]  # a copy of another class's rwx bits
            else:
                perms = rest[: len(rest) - len(rest.lstrip("rwxXst"))]
                value, rest = perm_bits(who, perms), rest[len(perms) :]
            if op != "-":
                bits |= value
    return [name for name, bit in SPECIAL if bits & bit]


def perm_bits(who: str, perms: str) -> int:
    """The special bits that `s` and `t` stand for, for the classes ``who`` names (GNU:
    `s` sets setuid for u and setgid for g; `t` is sticky for o; no class means all)."""
    every = not who or "a" in who
    value = 0
    if "s" in perms:
        value |= 0o4000 if every or "u" in who else 0
        value |= 0o2000 if every or "g" in who else 0
    if "t" in perms and (every or "o" in who):
        value |= 0o1000
    return value


def check_find(args: Arguments) -> None:
    """GNU find reads its expression after `--` too (`find -- . -exec ...`): every word is
    held to the refused primaries, wherever it stands."""
    for arg in args.args:
        if arg.text in args.rule.forbid:
            raise args.refuse(arg.text, "is refused by this policy" + args.advice(arg.text))


def remote_archive(word: str) -> bool:
    """Whether GNU tar would take ``word``, given as its archive, for a remote one
    (``host:file``, ``user@host:file``): a colon after the first character with no slash
    before it (rmt.h's _remdev). Tar then runs rsh (or the remote shell it was built with) to
    reach the host: a program the policy never saw, and a way out of the machine."""
    colon = word.find(":")
    return colon > 0 and "/" not in word[:colon]


def check_tar(args: Arguments) -> None:
    """No archive tar would reach through a remote shell. Every word is held to it, and every
    value attached with `=` or inside a cluster (`-fhost:a.tar`, `--file=host:a.tar`,
    `--fi=...`), since telling tar's archive apart from its members would mean reading every
    option as tar does. `--force-local` would make tar read the name as a local file, but
    the check does not lean on it: an option later on the line (or a tar built otherwise)
    could undo it, and `./host:file` names the same file plainly."""
    for arg in args.args:
        text = arg.text
        values = {text}
        if text.startswith("--"):
            values.add(text.partition("=")[2])
        elif text.startswith("-") or arg is args.args[0]:
            values |= {text[j:] for j in range(1, len(text))}
        for value in values:
            if remote_archive(value):
                raise args.refuse(
                    text,
                    "names a remote archive (`host:file`), which tar reaches by running a "
                    "remote shell; this policy refuses it: write `./" + value + "` for a local "
                    "file of that name",
                )


def check_test(args: Arguments) -> None:
    """bash's `test` and `[` evaluate the subscript of `-v NAME[SUBSCRIPT]` as arithmetic, so
    `test -v 'a[$(cmd)]'` runs cmd, the quotes hiding it from the parser; `-v` can stand after
    `!`, `-a` or `-o` as well as first, so it is refused wherever it stands."""
    for arg in args.args:
        if arg.text == "-v":
            raise args.refuse(
                arg.text,
                "is refused by this policy: bash evaluates the variable's subscript, which "
                "can run commands",
            )


def check_cd(args: Arguments) -> None:
    """`cd` to a named directory only: `cd -` goes to $OLDPWD, which the judge cannot know
    (busybox exports OLDPWD=/), a lone option goes home, and a glob may expand to `..` or to
    several directories; later paths would be judged from the wrong place."""
    for arg in args.args:
        if arg.text.startswith("-"):
            raise args.refuse(
                arg.text,
                "is refused by this policy: `cd -` goes to the previous directory and "
                "options change where cd goes; name the directory",
            )
        if arg.glob:
            raise args.refuse(arg.text, "is a glob; name the directory")


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


CHECKS = {
    "sed": check_sed,
    "chmod": check_chmod,
    "find": check_find,
    "cd": check_cd,
    "git": check_git,
    "test": check_test,
    "tar": check_tar,
}
