"""Type-check the whole package with mypy (configuration: pyproject.toml, [tool.mypy]).

The top-level folders are installed as `livedecon.<folder>` through setuptools' package-dir
mapping, which mypy cannot follow through an editable install; so this links them under a
`livedecon/` folder in a temporary directory and checks that package. Exit status: mypy's.

    python tests/typecheck.py            # the README's test command runs this before pytest
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def link_tree(into: Path) -> Path:
    """`into/livedecon/<name>` -> the folder pyproject.toml maps `livedecon.<name>` to."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package = into / "livedecon"
    package.mkdir()
    for name, folder in pyproject["tool"]["setuptools"]["package-dir"].items():
        (package / name.removeprefix("livedecon.")).symlink_to(ROOT / folder)
    return into


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="livedecon-mypy-") as tmp:
        tree = link_tree(Path(tmp))
        env = {**os.environ, "MYPYPATH": str(tree)}
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
        command += ["--cache-dir", str(ROOT / ".mypy_cache"), "-p", "livedecon"]
        return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
