"""Where numbers came from: the commit of the checkout that measured them (benchmarks
record it beside their results)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def commit() -> str:
    """The short commit hash of the checkout this package runs from, or "unknown" (an
    installed wheel, no git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
