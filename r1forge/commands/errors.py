"""How every command reports bad user input: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def report_error(error: Exception) -> int:
    """Print a user error (bad config key, missing file) without a traceback; the exit code for it."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def run_with_errors(fn: Callable[[], int | None]) -> int:
    """Call fn() and turn bad user input (ValueError, a missing file) into a one-line message and exit code 2."""
    try:
        return int(fn() or 0)
    except (ValueError, FileNotFoundError) as e:
        return report_error(e)
