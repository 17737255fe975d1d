"""Chromium as the step user: what guest_agent/chromium.sh runs, in place of Chromium, for
Playwright's driver (the agent's child, root) when steps run as an unprivileged user.

The driver makes Chromium's profile directory itself (root's, mode 0700), so that directory
is handed to the user first; then Chromium (``BERTH_CHROMIUM``) runs as the user, with no
capabilities and the user's own clean environment, like a terminal command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from guest_agent.user import StepUser

PROFILE_FLAG = "--user-data-dir="
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# The executable the driver is told is Chromium: a shell script, so that Python starts
# with the flags it must (a shebang line could not say where the agent's package is).
LAUNCHER = Path(__file__).with_name("chromium.sh")


def chromium_path() -> str | None:
    """The machine's Chromium (``BERTH_CHROMIUM``, else Debian's), if it is there."""
    path = os.environ.get("BERTH_CHROMIUM") or DEFAULT_CHROMIUM
    return path if os.access(path, os.X_OK) else None


def main() -> None:
    user = StepUser.named(os.environ["BERTH_GUEST_USER"])
    for arg in sys.argv[1:]:
        if arg.startswith(PROFILE_FLAG):
            os.chown(arg.removeprefix(PROFILE_FLAG), user.uid, user.gid)
    argv = user.command([os.environ["BERTH_CHROMIUM"], *sys.argv[1:]])
    os.execvpe(argv[0], argv, user.environment())
