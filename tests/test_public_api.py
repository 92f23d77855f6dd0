"""The packages' public API: the names each package's __init__.pyi lists are what `__all__`
says and what the lazy loader serves, and each resolves to the object its module defines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engines", "calibration", "daemon", "acquisition_hooks")


def _stub(folder: str) -> tuple[dict[str, str], list[str]]:
    """(name -> submodule, __all__) as written in the folder's __init__.pyi."""
    tree = ast.parse((ROOT / folder / "__init__.pyi").read_text())
    imported: dict[str, str] = {}
    listed: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert node.level == 1, "the lazy loader reads `from .module import` only"
            assert node.module
            imported.update({alias.name: node.module for alias in node.names})
        elif isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__all__":
            listed = list(ast.literal_eval(node.value))
    return imported, listed


@pytest.mark.parametrize("folder", PACKAGES)
def test_the_stub_lists_every_import_once_in_all(folder):
    imported, listed = _stub(folder)
    assert sorted(listed) == listed, "keep __all__ sorted"
    assert set(listed) == set(imported)
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize("folder", PACKAGES)
def test_every_public_name_resolves_to_its_module_object(folder):
    package = importlib.import_module(f"livedecon.{folder}")
    imported, _ = _stub(folder)
    assert sorted(package.__all__) == sorted(imported)
    for name, module in imported.items():
        defined = getattr(importlib.import_module(f"livedecon.{folder}.{module}"), name)
        assert getattr(package, name) is defined
    assert set(imported) <= set(dir(package))
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018


@pytest.mark.parametrize("folder", PACKAGES)
def test_every_public_name_says_what_it_is(folder):
    """Each exported class and function has a docstring of its own (a class's is not
    inherited, so a pydantic model without one has None)."""
    package = importlib.import_module(f"livedecon.{folder}")
    undocumented = []
    for name in package.__all__:
        value = getattr(package, name)
        doc = value.__dict__.get("__doc__") if isinstance(value, type) else value.__doc__
        if not (doc or "").strip():
            undocumented.append(name)
    assert not undocumented


@pytest.mark.parametrize("folder", [*PACKAGES, "cli"])
def test_modules_behind_the_public_api_are_private(folder):
    """Users import from the package; every module file behind it is `_private`, so a name
    missing from __init__.pyi cannot become public by accident."""
    public = [path.name for path in (ROOT / folder).glob("*.py") if not path.name.startswith("_")]
    assert not public, f"make these _private and export what users need: {public}"
