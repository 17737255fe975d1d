"""``python -m berth run``: the whole system; ``python -m berth worker``: the worker only;
``python -m berth create-admin EMAIL``: an admin account."""

import sys

from berth import admin, run, worker

COMMANDS = {"run": run.main, "worker": worker.main, "create-admin": admin.main}

if __name__ == "__main__":
    command = COMMANDS.get(sys.argv[1] if len(sys.argv) > 1 else "")
    if command is None:
        sys.exit(f"usage: python -m berth {{{'|'.join(COMMANDS)}}}")
    sys.exit(command())
