"""The installed `livedecon` command, run as a user runs it (a real process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_livedecon(*args: str | Path, columns: int = 40) -> subprocess.CompletedProcess:
    """Run `livedecon ARGS` on a terminal `columns` wide (40 by default: narrow, so an error
    line that wrapped would show). stdout comes back with its whitespace collapsed and
    assertions read words; a path folded across lines would still not match (error lines
    must never wrap)."""
    script = Path(sys.executable).parent / "livedecon"
    result = subprocess.run(
        [str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": str(columns)},
    )
    result.stdout = " ".join(result.stdout.split())
    return result
