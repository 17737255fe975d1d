"""A strict parser for the small part of bash that a whitelisted terminal accepts.

It understands words (with quoting), simple commands, pipelines, chains and redirections,
and refuses everything else with a reason: a construct whose effect cannot be known before
it runs (an expansion, a substitution, a compound command) is never guessed at. The result
is what bash would run, after quote removal, so the policy judges programs and arguments,
not the text that spells them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Characters that end a word and start an operator when unquoted.
OPERATOR_CHARS = frozenset(";&|<>()")
GLOB_CHARS = frozenset("*?[")
# Words bash reads as the start of a compound command or as other syntax.
RESERVED = frozenset(
    {
        *("if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done"),
        *("case", "esac", "function", "select", "time", "coproc", "in"),
        *("{", "}", "[[", "]]", "!"),
    }
)


class ShellSyntaxRefused(Exception):
    """The command uses shell syntax the policy does not accept; the message says which."""


@dataclass
class Word:
    text: str  # after quote removal
    glob: bool = False  # an unquoted * ? or [ : bash may expand it to file names
    assignment: bool = False  # NAME=value before any quoting: a variable assignment
    # A glob whose expansion may start with `-` (a file named like an option): its first
    # unquoted wildcard comes before any literal character (`*`, `''*`, `""?`), or its
    # literal text starts with `-` (`-*`, `'-'*`).
    wildcard_first: bool = False
    spelled: str = ""  # the word as written in the command line, quotes and all


@dataclass
class Redirect:
    op: str  # one of < > >> &> &>> >& <&
    fd: int | None
    target: Word


@dataclass
class SimpleCommand:
    words: list[Word] = field(default_factory=list)
    redirects: list[Redirect] = field(default_factory=list)


@dataclass
class Pipeline:
    commands: list[SimpleCommand]
    # How it joins the pipeline after it: ";", "&&", "||", "\n", "&", or "" for the last.
    then: str = ""


@dataclass
class Token:
    kind: str  # "word", "op", "redirect"
    value: str = ""
    word: Word | None = None
    fd: int | None = None


class Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.tokens: list[Token] = []

    def peek(self, offset: int = 0) -> str:
        j = self.i + offset
        return self.text[j] if j < len(self.text) else ""

    def run(self) -> list[Token]:
        for ch in self.text:
            if (ord(ch) < 32 and ch not in "\t\n") or ord(ch) == 127:
                raise ShellSyntaxRefused(
                    f"the command contains the control character {ch!r}; "
                    "write it without control characters"
                )
        while self.i < len(self.text):
            ch = self.peek()
            if ch in " \t":
                self.i += 1
            elif ch == "\n":
                self.tokens.append(Token("op", "\n"))
                self.i += 1
            elif ch == "#":
                while self.i < len(self.text) and self.peek() != "\n":
                    self.i += 1
            elif ch in OPERATOR_CHARS:
                self.operator(None)
            else:
                self.word()
        return self.tokens

    def operator(self, fd: int | None) -> None:
        three, two, ch = self.text[self.i : self.i + 3], self.text[self.i : self.i + 2], self.peek()
        refused = {
            "<<<": "a here-string (`<<<`)",
            "<<": "a here-document (`<<`)",
            "<(": "process substitution (`<(...)`)",
            ">(": "process substitution (`>(...)`)",
            "<>": "a read-write redirection (`<>`)",
            ">|": "a clobbering redirection (`>|`)",
            ";;": "a `case` terminator (`;;`)",
        }
        for spelling in (three, two):
            if spelling in refused:
                raise ShellSyntaxRefused(f"{refused[spelling]} is not accepted by this policy")
        if ch in "()":
            raise ShellSyntaxRefused(
                "parentheses (a subshell, a function definition or a glob group) are not "
                "accepted by this policy; run the programs directly"
            )
        for op in ("&>>", "&>", ">>", ">&", "<&", ">", "<"):
            if self.text.startswith(op, self.i):
                if fd is not None and op.startswith("&"):
                    break  # "2&>" is not a redirection bash knows
                self.i += len(op)
                self.tokens.append(Token("redirect", op, fd=fd))
                return
        for op in ("&&", "||", "|&", ";", "&", "|"):
            if self.text.startswith(op, self.i):
                self.i += len(op)
                self.tokens.append(Token("op", "|" if op == "|&" else op))
                return
        raise ShellSyntaxRefused(f"`{ch}` cannot be read here")

    def word(self) -> None:
        chars: list[str] = []
        glob = wildcard_first = assignment = False
        unquoted_prefix = True  # every character so far was unquoted (for NAME= detection)
        # Where bash expands an unquoted `~`: at the word's start, and in a word shaped like an
        # assignment (even as an argument, `x=~/a`) after its first `=` and after each `:`.
        tilde_here = True
        start = self.i
        while self.i < len(self.text):
            ch = self.peek()
            tilde_next = False
            if ch in " \t\n" or ch in OPERATOR_CHARS:
                break
            if ch == "'":
                end = self.text.find("'", self.i + 1)
                if end < 0:
                    raise ShellSyntaxRefused("a single quote is not closed")
                chars.append(self.text[self.i + 1 : end])
                self.i = end + 1
                unquoted_prefix = False
            elif ch == '"':
                chars.append(self.double_quoted())
                unquoted_prefix = False
            elif ch == "\\":
                nxt = self.peek(1)
                if nxt == "\n":
                    raise ShellSyntaxRefused(
                        "a line continuation (backslash-newline) is not accepted by this "
                        "policy; write the command on one line"
                    )
                if not nxt:
                    raise ShellSyntaxRefused("the command ends with a lone backslash")
                chars.append(nxt)
                self.i += 2
                unquoted_prefix = False
            elif ch == "$":
                raise ShellSyntaxRefused(dollar_reason(self.text[self.i + 1 :]))
            elif ch == "`":
                raise ShellSyntaxRefused(
                    "command substitution (backticks) is not accepted by this policy; "
                    "run the inner command as its own step"
                )
            elif ch in "{}":
                raise ShellSyntaxRefused(
                    f"an unquoted `{ch}` (brace expansion or a command group) is not "
                    "accepted by this policy; quote it or list the words one by one"
                )
            elif ch == "~" and tilde_here:
                nxt = self.peek(1)
                ends = ("", "/", " ", "\t", "\n", *((":",) if assignment else ()))
                if nxt not in ends and nxt not in OPERATOR_CHARS:
                    raise ShellSyntaxRefused(
                        f"`~{nxt}...` expands to another user's home or a directory stack "
                        "entry; write the path out"
                    )
                chars.append("\0HOME\0")  # expanded by the policy, which knows the home
                self.i += 1
            else:
                if ch in GLOB_CHARS:
                    glob = True
                    # Nothing literal before it: the expansion may begin with any character.
                    wildcard_first = wildcard_first or not "".join(chars)
                if ch == "=" and unquoted_prefix and not assignment:
                    name = "".join(chars).removesuffix("+")
                    assignment = name.isidentifier() and name.isascii()
                    tilde_next = assignment
                tilde_next = tilde_next or (ch == ":" and assignment)
                chars.append(ch)
                self.i += 1
            tilde_here = tilde_next
        text = "".join(chars)
        nxt = self.peek()
        spelled = self.text[start : self.i]
        # A word of digits right before < or > is the file descriptor of a redirection.
        if nxt in ("<", ">") and spelled.isascii() and spelled.isdigit():
            self.operator(int(text))
            return
        if spelled in ("[", "]"):
            glob = wildcard_first = False  # `[ -f x ]`: a lone bracket is the test builtin
        wildcard_first = glob and (wildcard_first or text.startswith("-"))  # `--*`, `-*`
        word = Word(text, glob, assignment, wildcard_first, spelled)
        self.tokens.append(Token("word", word=word))

    def double_quoted(self) -> str:
        out: list[str] = []
        self.i += 1
        while self.i < len(self.text):
            ch = self.peek()
            if ch == '"':
                self.i += 1
                return "".join(out)
            if ch == "\\" and self.peek(1) in ('"', "\\", "$", "`"):
                out.append(self.peek(1))
                self.i += 2
                continue
            if ch == "\\" and self.peek(1) == "\n":
                raise ShellSyntaxRefused(
                    "a line continuation (backslash-newline) is not accepted by this policy; "
                    "write the command on one line"
                )
            if ch == "$" or ch == "`":
                raise ShellSyntaxRefused(
                    f"`{ch}` inside double quotes expands when the command runs, which this "
                    "policy refuses; use single quotes for literal text"
                )
            out.append(ch)
            self.i += 1
        raise ShellSyntaxRefused("a double quote is not closed")


def dollar_reason(rest: str) -> str:
    """Why a `$` is refused; ``rest`` is the text after it."""
    name = rest[:1] if rest[:1] and not rest[:1].isalpha() else ""
    for ch in rest if not name else "":
        if not (ch.isalnum() or ch == "_"):
            break
        name += ch
    what = {
        "'": "ANSI-C quoting (`$'...'`)",
        '"': 'locale quoting (`$"..."`)',
        "(": "command or arithmetic substitution (`$(...)`)",
        "{": "parameter expansion (`${...}`)",
    }.get(rest[:1], f"variable expansion (`${name}`)")
    return (
        f"{what} is not accepted by this policy: its value is unknown until the command "
        "runs; write the value literally (single quotes keep `$` literal)"
    )


def parse(text: str) -> list[Pipeline]:
    """The pipelines of a command line, in order, each saying how it joins the next."""
    tokens = Lexer(text).run()
    pipelines: list[Pipeline] = []
    commands: list[SimpleCommand] = []
    current = SimpleCommand()

    def close_command(op: str) -> None:
        nonlocal current
        if not current.words and not current.redirects:
            raise ShellSyntaxRefused(f"`{printable(op)}` has no command before it")
        commands.append(current)
        current = SimpleCommand()

    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.kind == "word":
            assert token.word is not None
            current.words.append(token.word)
        elif token.kind == "redirect":
            target = tokens[i + 1] if i + 1 < len(tokens) else None
            if target is None or target.word is None:
                raise ShellSyntaxRefused(f"the redirection `{token.value}` has no target")
            current.redirects.append(Redirect(token.value, token.fd, target.word))
            i += 1
        elif token.value == "|":
            close_command("|")
        elif token.value == "\n" and not current.words and not current.redirects:
            pass  # a blank line, or a line break after `|`, `&&` or `||` as bash allows
        else:
            close_command(token.value)
            pipelines.append(Pipeline(commands, token.value))
            commands = []
        i += 1
    if current.words or current.redirects:
        commands.append(current)
        pipelines.append(Pipeline(commands))
    elif commands:
        raise ShellSyntaxRefused("`|` has no command after it")
    if not pipelines:
        raise ShellSyntaxRefused("the command is empty")
    last = pipelines[-1]
    if last.then in ("&&", "||"):
        raise ShellSyntaxRefused(f"`{last.then}` has no command after it")
    last.then = "" if last.then in (";", "\n") else last.then
    return pipelines


def is_number(text: str) -> bool:
    """Only ASCII digits: str.isdigit also accepts `²`, which int() and bash do not."""
    return text.isascii() and text.isdigit()


def printable(op: str) -> str:
    return "newline" if op == "\n" else op
