"""One error type for bad input, and the one place that turns it into `error: ...` and exit code 2.

Every message names what is wrong and how to fix it ("... — ..."). Scripts wrap `main` in `run_cli`, so a user
sees one line on stderr and no traceback; programming errors still raise normally.
"""
from __future__ import annotations

import sys


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a manifest row, a checkpoint): the message says the fix."""


def run_cli(main, argv=None) -> None:
    """Call `main(argv)` and exit with its return code; a UserError becomes `error: ...` with exit code 2."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
