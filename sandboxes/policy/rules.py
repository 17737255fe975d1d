"""A template's command policy: the rules a command line is held to, and loading them from
the template's policy file (vm_templates/<template>/policy.toml) or the admin's in its place.

The rules are data only; sandboxes.policy.judge applies them. A policy file is validated
whole on load (unknown keys refused), so a typo in it fails at the first step rather than
silently allowing or refusing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

import vm_templates
from guest_agent.user import WORKSPACE

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
    mode_options: list[str] = Field(
        default=[], description="options whose value is a file mode: no setuid, setgid, sticky"
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
    check: Literal["sed", "chmod", "find", "git", "cd", "test", "tar"] | None = None
    config_keys: list[str] = Field(default=[], description="git: keys `git config` may set")


class CommandPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    home: str = Field(default=WORKSPACE, description="the guest's home and working directory")
    workspace: list[str] = Field(default=[WORKSPACE, "/tmp"], description="where writes may go")
    allow_chaining: bool = True  # ; && || and newlines between commands
    allow_pipes: bool = True
    allow_background: bool = False  # a trailing or joining `&`
    allow_redirects_in_workspace: bool = True
    redirect_devices: list[str] = Field(
        default=["/dev/null"], description="files outside the workspace a redirection may name"
    )
    programs: dict[str, ProgramRule]
    # Rules in place of the programs' own for a service's command (see for_services).
    services: dict[str, ProgramRule] = {}

    def for_services(self) -> CommandPolicy:
        """The policy a service's command is judged by: a long-running server is what a
        service is for, so a program may be given more there (python3's http.server)."""
        return self.model_copy(update={"programs": {**self.programs, **self.services}})


class Refused(Exception):
    """A command line the policy refuses; the message says what, and what to do instead."""


def load_policy(template: str, override: Path | None = None) -> CommandPolicy:
    """The template's policy (vm_templates/<template>/policy.toml), or the admin's file in
    its place."""
    path = override or vm_templates.path(template) / POLICY_FILE
    with path.open("rb") as file:
        data = tomllib.load(file)
    data.setdefault("name", template)
    return CommandPolicy.model_validate(data)
