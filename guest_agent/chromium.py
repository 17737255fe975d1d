"""Chromium as the step user: what guest_agent/chromium.sh runs, in place of Chromium, for
Playwright's driver (the agent's child, root) when steps run as an unprivileged user.

The driver makes a profile directory itself (root's, mode 0700) and removes it, as root, when
Chromium is gone. That one is left alone, empty: were it handed to the user, root would later
remove a tree the user could have filled with links. Chromium (``BERTH_CHROMIUM``) runs as the
user, with no capabilities and the user's own clean environment, like a terminal command, and
with a profile the user makes and removes (PROFILE_SCRIPT).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from guest_agent.user import StepUser

PROFILE_FLAG = "--user-data-dir="
# Run as the user: make a profile, run Chromium ("$@") with it, remove it, exit as Chromium
# did. Chromium reaches the driver through inherited pipes (fds 3 and 4), which pass through.
PROFILE_SCRIPT = (
    'profile=$(mktemp -d) || exit 1; "$@" --user-data-dir="$profile"; code=$?; '
    'rm -rf -- "$profile"; exit "$code"'
)
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
    args = [arg for arg in sys.argv[1:] if not arg.startswith(PROFILE_FLAG)]
    script = ["/bin/sh", "-c", PROFILE_SCRIPT, "chromium-profile"]
    argv = user.command([*script, os.environ["BERTH_CHROMIUM"], *args])
    os.execvpe(argv[0], argv, user.environment())
