#!/bin/sh
# What Playwright's driver (the agent's child, root) starts instead of Chromium when steps
# run as a user: the wrapper guest_agent/chromium.py, run by the agent's own Python in
# isolated mode (-I: no user site, no PYTHON* variables, no working directory on sys.path),
# its package found where the agent says, not by any search path. Both come from the
# environment the agent gives the driver, which it builds from nothing.
exec "$BERTH_PYTHON" -I -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from guest_agent.chromium import main; main()' "$BERTH_AGENT_ROOT" "$@"
