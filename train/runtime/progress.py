"""When to draw progress bars: on a terminal, and never under CI."""

from __future__ import annotations

import os
import sys


def progress_enabled() -> bool:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    if os.environ.get("SELFREWARD_PROGRESS") == "1":
        return True
    return sys.stderr.isatty()
