"""mkdocs hook: the API reference reads the package from a `livedecon/` tree of links.

The folders install as `livedecon.<name>` through setuptools' package-dir mapping, which
mkdocstrings' static reader cannot follow (mypy cannot either: tests/typecheck.py builds the
same tree); so before the pages are read, the tree is linked under `.cache/api/`, the path
mkdocs.yml gives the python handler.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / ".cache" / "api"


def on_startup(command: str, dirty: bool) -> None:  # before mkdocstrings reads its paths
    """Link the package tree under `.cache/api/` before mkdocstrings reads it."""
    spec = importlib.util.spec_from_file_location("typecheck", ROOT / "tests" / "typecheck.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("tests/typecheck.py, which links the package tree, is missing")
    typecheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(typecheck)
    shutil.rmtree(TREE, ignore_errors=True)
    TREE.mkdir(parents=True)
    typecheck.link_tree(TREE)
