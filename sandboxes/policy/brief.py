"""A command policy in brief, for a model that plans the steps: the allowed programs and
their argument rules, the shell syntax refused and what to write instead. Generated from the
rules themselves (never written by hand), so a template's policy and what its agent is told
cannot drift apart.
"""

from __future__ import annotations

from sandboxes.policy.rules import CommandPolicy, ProgramRule

# What each check of a program's own language (sandboxes/policy/programs.py) allows.
CHECK_BRIEFS = {
    "sed": "editing commands only (no e, w, r commands, no s///e or s///w)",
    "chmod": "no setuid, setgid or sticky bits",
    "find": "no actions that run, delete or write (-exec, -delete, -fprint...)",
    "git": "no global options before the subcommand",
    "cd": "to a named directory in the workspace only",
    "test": "plain tests only",
    "tar": "no remote archives (write ./host:file)",
}
# Shell syntax the parser (sandboxes/policy/shell.py) always refuses.
ALWAYS_REFUSED = (
    "$VAR and ${...}, $(...) and backticks, $'...', here-documents (<<) and here-strings "
    "(<<<), process substitution, subshells ( ), brace expansion {a,b}, loops and conditions "
    "(for, while, if, case), functions, line continuations, and VAR=value before a command"
)
# Programs models reach for that a policy often leaves out: named when this one does.
OFTEN_WANTED = ("bash", "sh", "awk", "xargs", "perl", "sudo", "timeout", "env", "curl", "wget")


def rule_brief(name: str, rule: ProgramRule) -> str:
    """One program's rule in a line: ``name: what it may be given``; just the name when it
    may be given anything."""
    parts: list[str] = []
    if rule.script:
        parts.append(f"script files only (`{name} FILE [args]`)")
    if rule.subcommands is not None:
        parts.append("subcommands " + ", ".join(rule.subcommands))
    for option, values in rule.option_values.items():
        parts.append(f"{option} only with {', '.join(values)}")
    if rule.max_args == 0:
        parts.append("no arguments")
    elif rule.max_args is not None:
        parts.append(f"at most {rule.max_args} argument(s)")
    if rule.max_operands is not None:
        parts.append(f"at most {rule.max_operands} operand(s)")
    if rule.paths == "workspace":
        parts.append("paths in the workspace")
    elif rule.paths == "below":
        parts.append("paths inside the workspace, never a workspace root")
    if rule.write_options:
        parts.append(f"files written by {', '.join(rule.write_options)} in the workspace")
    if rule.mode_options:
        parts.append("no setuid, setgid or sticky modes")
    if rule.check is not None:
        parts.append(CHECK_BRIEFS[rule.check])
    if rule.config_keys:
        parts.append("`config` only for " + ", ".join(rule.config_keys))
    if rule.forbid:
        parts.append("refused: " + " ".join(rule.forbid))
    return f"{name}: {'; '.join(parts)}" if parts else name


def syntax_brief(policy: CommandPolicy) -> list[str]:
    """The shell syntax this policy refuses, and what to do instead."""
    lines = [f"Refused everywhere: {ALWAYS_REFUSED}."]
    # (the syntax when allowed, when refused, whether this policy allows it)
    choices = [
        ("chaining with ; && ||", "chaining (one command per step)", policy.allow_chaining),
        ("pipes |", "pipes", policy.allow_pipes),
        (
            "redirections > >> < to files in the workspace",
            "redirections to files",
            policy.allow_redirects_in_workspace,
        ),
        ("background jobs &", "background jobs &", policy.allow_background),
    ]
    allowed = [yes for yes, _, on in choices if on]
    refused = [no for _, no, on in choices if not on]
    if allowed:
        lines.append("Allowed: " + ", ".join(allowed) + ".")
    if refused:
        lines.append("Also refused by this template: " + ", ".join(refused) + ".")
    lines.append(
        "Programs run by name only (no /usr/bin/x, no ./script). Globs that may start with "
        "`-` are refused: write ./*.txt, not *.txt."
    )
    python = policy.programs.get("python3")
    if python is not None and python.script:
        lines.append(
            "For anything the syntax above or the program list does not allow (loops, "
            "conditions, variables, parsing, arithmetic, awk-like work): write a script "
            "file with a file step, then run it with `python3 FILE.py`."
        )
    else:
        lines.append("For anything the syntax above refuses: run the programs one step at a time.")
    return lines


def policy_brief(policy: CommandPolicy) -> str:
    """The whole policy in brief: the programs and their rules, the syntax."""
    free = sorted(name for name, rule in policy.programs.items() if rule_brief(name, rule) == name)
    ruled = sorted(name for name in policy.programs if name not in free)
    missing = [name for name in OFTEN_WANTED if name not in policy.programs]
    lines = ["Allowed programs, and nothing else:", "- with any arguments: " + ", ".join(free)]
    lines += [f"- {rule_brief(name, policy.programs[name])}" for name in ruled]
    if missing:
        lines.append("Not allowed (among others): " + ", ".join(missing) + ".")
    return "\n".join([*lines, *syntax_brief(policy)])


def rules_named(policy: CommandPolicy, command: str) -> list[str]:
    """The rules of the allowed programs a command line names, in brief (those that have
    any): what a refusal quotes, so the model sees the rule it ran into."""
    rules: list[str] = []
    for word in command.replace("|", " ").replace(";", " ").replace("&", " ").split():
        rule = rule_brief(word, policy.programs[word]) if word in policy.programs else word
        if rule != word and rule not in rules:
            rules.append(rule)
    return rules
