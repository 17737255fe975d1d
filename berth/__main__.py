"""``python -m berth``: Berth's command line (berth/cli.py)."""

import sys

from berth.cli import main

if __name__ == "__main__":
    sys.exit(main())
