"""The documentation site builds, strictly (a broken link, a missing page or an API name
mkdocstrings cannot collect fails), with the reference read from the package's docstrings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_with_every_public_name(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    daemon = (tmp_path / "reference" / "daemon" / "index.html").read_text()
    hooks = (tmp_path / "reference" / "acquisition_hooks" / "index.html").read_text()
    for name in ("DaemonClient", "Plan", "run_batch"):
        assert name in daemon
    assert "LivedeconHandler" in hooks
    assert "Streams frames of an acquisition to a daemon" in daemon  # from the docstring
