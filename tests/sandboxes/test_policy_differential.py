"""The policy's parse against the shell's: every word the policy's parser reads is given to
real bash, and what bash passes to a program must be what the parser said.

Each simple command the parser accepts is run by `/bin/bash -c` (environment cleared, in a
temporary folder holding files named like options) with its words as the arguments of an
argv printer (`printf '%s\\0'`, a builtin: the arguments a function or program receives
are expanded the same way). Two runs:
- with globbing off, the arguments must be the parser's words exactly (word splitting,
  quote removal, tilde expansion);
- with globbing on, each word alone: if bash's expansion differs from the parser's text,
  the parser must have marked the word a glob, and if it yields a name starting with `-`,
  a word that may expand to an option (wildcard-first), which the judge refuses.
Over the policy's corpus (tests/sandboxes/policy_corpus.py) and thousands of generated words
(seeded): any disagreement fails, naming the word.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxes.policy.shell import ShellSyntaxRefused, Word, parse
from tests.sandboxes.policy_corpus import ALLOWED, BYPASSES

BASH = "/bin/bash"
# Files beside the commands: names that look like options, spaces, unicode, glob characters.
FILES = [
    "-c",
    "--checkpoint-action=exec=sh x.sh",
    "-ee CMD",
    "-",
    "--",
    "a b",
    "x.sh",
    "notes.txt",
    "é.txt",
    "日本",
    ".hidden",
    "[a]",
    "*",
    "a=b",
]
HOME_MARK = "\0HOME\0"
BATCH = 400  # records per bash run: a `bash -c` argument is at most 128 KiB
GENERATED = 4000
SEED = 16

# Pieces a generated word is made of: plain text, quotes, globs, escapes, tildes, options,
# assignments, unicode, and syntax the parser refuses (which then runs nothing).
PIECES = [
    *("a", "x", "-", "--", "-xzf", "-c", "=", ":", "/", ".", "..", "é", "日", "#", "!", "%"),
    *(",", "+", "@", "^", "b=", "HOME=", "x+=", "--mode=", "1", "2", "]", "u+s"),
    *("''", '""', "'a b'", '"a b"', "'*'", '"*"', "'-'", '"-"', "'~'", "'\\'", '"\\\\"'),
    *('"\\""', '"\\a"', "'\"'", '"\'"', "'$x'", '"#"', "'\n'", '" "'),
    *("*", "?", "[a-c]", "[!x]", "[^x]", "[-]", "[", "[[:alpha:]]", "**", "[-c]", ".?"),
    *("\\*", "\\ ", "\\'", '\\"', "\\-", "\\~", "\\\\", "\\a", "\\é", "\\[", "\\="),
    *("~", "~/", "~:", "~x"),
    *("$'a'", "$x", "{a,b}", "`x`"),
]


def expected(word: Word, home: str) -> str:
    return word.text.replace(HOME_MARK, home)


def commands(line: str) -> Iterator[list[Word]]:
    """Every simple command's words (and redirection targets) the parser reads in ``line``;
    nothing if it refuses the line."""
    try:
        pipelines = parse(line)
    except ShellSyntaxRefused:
        return
    for pipeline in pipelines:
        for command in pipeline.commands:
            yield [*command.words, *(r.target for r in command.redirects)]


def generated_lines(count: int) -> list[str]:
    rng = random.Random(SEED)
    lines = []
    for _ in range(count):
        words = [
            "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        lines.append(" ".join(words))
    return lines


def bash_argvs(records: list[list[Word]], cwd: Path, glob: bool) -> list[list[str]]:
    """What bash passes to a program given each record's words as spelled, in order."""
    results: list[list[str]] = []
    for at in range(0, len(records), BATCH):
        batch = records[at : at + BATCH]
        script = "" if glob else "set -f\n"
        script += "".join(
            f"printf '%s\\0' {' '.join(w.spelled for w in words)}; printf '\\1\\0'\n"
            for words in batch
        )
        out = subprocess.run(
            ["env", "-i", f"HOME={cwd}", BASH, "-c", script],
            cwd=cwd,
            capture_output=True,
            timeout=60,
            check=False,
        )
        argvs = split_records(out.stdout)
        if len(argvs) != len(batch) and len(batch) > 1:
            # Bash stopped (a syntax error): find the record it stopped at, alone.
            for words in batch:
                results += bash_argvs([words], cwd, glob)
            continue
        assert len(argvs) == len(batch), (
            f"bash did not run {[w.spelled for w in batch[0]]}: {out.stderr.decode()}"
        )
        results += argvs
    return results


def split_records(stdout: bytes) -> list[list[str]]:
    argvs: list[list[str]] = []
    current: list[str] = []
    for field in stdout.decode("utf-8", "surrogateescape").split("\0")[:-1]:
        if field == "\1":
            argvs.append(current)
            current = []
        else:
            current.append(field)
    return argvs


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("differential")
    for name in FILES:
        (cwd / name).write_text("")
    return cwd


def disagreements(lines: list[str], cwd: Path) -> list[str]:
    records = [words for line in lines for words in commands(line)]
    assert records
    home = str(cwd)
    found = []
    for words, argv in zip(records, bash_argvs(records, cwd, glob=False), strict=True):
        mine = [expected(w, home) for w in words]
        if argv != mine:
            found.append(f"words {[w.spelled for w in words]}: bash {argv}, parser {mine}")
    singles = [[w] for words in records for w in words]
    for (word,), argv in zip(singles, bash_argvs(singles, cwd, glob=True), strict=True):
        found += expansion_problems(word, argv, home)
    return found


def expansion_problems(word: Word, argv: list[str], home: str) -> list[str]:
    """What the parser missed about a word that bash expanded to ``argv``."""
    if argv == [expected(word, home)]:
        return []
    if not word.glob:
        return [f"`{word.spelled}`: bash expands it to {argv}, not marked a glob"]
    if any(a.startswith("-") for a in argv) and not word.wildcard_first:
        return [f"`{word.spelled}`: bash expands it to {argv}, not marked wildcard-first"]
    return []


def test_the_corpus_parses_as_bash_parses_it(folder: Path) -> None:
    corpus = [command for _, command, _ in BYPASSES] + ALLOWED
    problems = disagreements(corpus, folder)
    assert not problems, "\n".join(problems)


def test_generated_words_parse_as_bash_parses_them(folder: Path) -> None:
    lines = generated_lines(GENERATED)
    accepted = sum(1 for line in lines for _ in commands(line))
    assert accepted > GENERATED // 4  # most are read, not refused: the test tests something
    problems = disagreements(lines, folder)
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize(
    ("word", "missed"),
    [
        (Word("*", glob=False, spelled='""*'), "not marked a glob"),
        (Word("*", glob=True, wildcard_first=False, spelled="''*"), "not marked wildcard-first"),
    ],
)
def test_the_check_reports_what_the_parser_missed(folder: Path, word: Word, missed: str) -> None:
    """The review's quoted-prefix glob, as the parser read it before: the test says so."""
    (argv,) = bash_argvs([[word]], folder, glob=True)
    assert "-c" in argv
    assert missed in " ".join(expansion_problems(word, argv, str(folder)))
