"""``python -m fastssl <command> ...``: the same as the ``fastssl`` command (fastssl/cli.py)."""

import sys

from fastssl.cli import main

if __name__ == "__main__":
    sys.exit(main())
