"""``python -m berth run``: the whole system; ``python -m berth worker``: the worker only."""

import sys

from berth import run, worker

COMMANDS = {"run": run.main, "worker": worker.main}

if __name__ == "__main__":
    command = COMMANDS.get(sys.argv[1] if len(sys.argv) > 1 else "")
    if command is None:
        sys.exit("usage: python -m berth {run|worker}")
    sys.exit(command())
