"""The layer contract (ARCHITECTURE.md, Layout): dependencies between the top-level folders
point one way, engines <- calibration <- daemon <- acquisition_hooks <- cli, and nothing imports
the command line. Read from the source with `ast`, so it checks every import, at module level,
inside functions and under TYPE_CHECKING alike, without importing anything.
"""

from __future__ import annotations

import ast
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: a folder may import its own modules and those of the folders before it.
# configs holds the shipped TOML files and their lookup; it imports nothing of livedecon.
LAYERS = ("configs", "engines", "calibration", "daemon", "acquisition_hooks", "cli")
RANK = {name: rank for rank, name in enumerate(LAYERS)}

# Clients of the daemon (hooks, display stream, viewer) need only its client and protocol.
DAEMON_FOR_CLIENTS = {"livedecon.daemon._client", "livedecon.daemon._protocol"}
# The engines know nothing of ZMQ, Micro-Manager or a display.
NOT_IN_ENGINES = ("zmq", "pymmcore_plus", "pycromanager", "napari", "qtpy")


def _package_dirs() -> dict[str, str]:
    """`livedecon.<name>` -> folder, as pyproject.toml maps them."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["package-dir"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(("livedecon", *parts))


def _imported(path: Path, module_name: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, the source of `module_name`;
    relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from livedecon.daemon import _client` imports livedecon.daemon._client
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


@cache
def _imports() -> list[tuple[str, str, int, str]]:
    """(folder, file, line, imported module) for every source file of every package."""
    rows = []
    for package, folder in _package_dirs().items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module in _imported(path, _module_name(path)):
                rows.append((package.split(".")[1], str(path.relative_to(ROOT)), line, module))
    return rows


def _folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "livedecon" and len(parts) > 1 else None


def test_every_package_has_a_layer():
    folders = {package.split(".")[1] for package in _package_dirs()}
    assert folders == set(LAYERS), f"place {folders ^ set(LAYERS)} in LAYERS"


def test_imports_point_down_the_layers():
    broken = [
        f"{file}:{line} ({folder}) imports {module} ({target}, a higher layer)"
        for folder, file, line, module in _imports()
        if (target := _folder_of(module)) in RANK and RANK[target] > RANK[folder]
    ]
    assert not broken, "\n".join(broken)


def test_no_cycle_between_folders():
    edges: dict[str, set[str]] = {name: set() for name in LAYERS}
    for folder, _, _, module in _imports():
        target = _folder_of(module)
        if target in edges and target != folder:
            edges[folder].add(target)
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for name in LAYERS:
        if name not in state:
            visit(name, [])


def test_clients_of_the_daemon_need_only_its_client_and_protocol():
    broken = [
        f"{file}:{line} imports {module}"
        for folder, file, line, module in _imports()
        if folder == "acquisition_hooks"
        and _folder_of(module) == "daemon"
        and not any(module == m or module.startswith(m + ".") for m in DAEMON_FOR_CLIENTS)
    ]
    assert not broken, "\n".join(broken)


def test_engines_know_nothing_of_zmq_micromanager_or_a_display():
    broken = [
        f"{file}:{line} imports {module}"
        for folder, file, line, module in _imports()
        if folder == "engines" and module.split(".")[0] in NOT_IN_ENGINES
    ]
    assert not broken, "\n".join(broken)


def test_the_contract_sees_a_violation(tmp_path):
    """The checker itself: an upward import and a relative one are both found."""
    source = tmp_path / "server.py"
    source.write_text("from livedecon.cli import app\n\ndef f():\n    from ..cli import _demo\n")
    found = _imported(source, "livedecon.daemon._server")
    assert found == [(1, "livedecon.cli.app"), (4, "livedecon.cli._demo")]
    assert {_folder_of(module) for _, module in found} == {"cli"}
    assert RANK["cli"] > RANK["daemon"]


# What the core install (pyproject's dependencies) does not have: the daemon extra's packages.
NOT_IN_CORE = (
    "torch",
    "scipy",
    "onnx",
    "onnxruntime",
    "skimage",
    "typer",
    "rich",
    "matplotlib",
    "dask",
    "zarr",
    "safetensors",
    "psfmodels",
    "tqdm",
)
CLIENT_MODULES = (
    "livedecon.daemon._protocol",
    "livedecon.daemon._client",
    "livedecon.acquisition_hooks._stream",
    "livedecon.acquisition_hooks._pycromanager_hooks",
    "livedecon.acquisition_hooks._pymmcore_hooks",
)


def test_the_core_install_holds_the_protocol_client_and_hooks():
    """An acquisition PC with only the core install (numpy, pydantic, pyzmq, tifffile and
    lazy-loader, plus its acquisition package) can import and build the hooks, by module and
    by the packages' public names: imported with the daemon extra's packages unimportable."""
    import subprocess
    import sys

    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(d.split(">")[0] for d in core) == [
        "lazy-loader",
        "numpy",
        "pydantic",
        "pyzmq",
        "tifffile",
    ]
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {NOT_IN_CORE!r}:
            raise ImportError(f"{{name}} is not in the core install")
sys.meta_path.insert(0, Block())
for module in {CLIENT_MODULES!r}:
    __import__(module)
from livedecon.acquisition_hooks import LivedeconHandler, livedecon_hooks
from livedecon.daemon import DaemonClient, Plan
LivedeconHandler(address="tcp://127.0.0.1:1")
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip().endswith("ok"), result.stderr


def test_no_two_folders_hold_a_module_of_the_same_name():
    """A module's name says its job once: `metrics` for image quality and for telemetry in two
    folders made a reader guess which one a traceback meant."""
    seen: dict[str, Path] = {}
    clashes = []
    for folder in sorted(set(_package_dirs().values())):
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):  # package plumbing
                continue
            name = path.stem.lstrip("_")
            if name in seen:
                clashes.append(f"{seen[name].relative_to(ROOT)} ~ {path.relative_to(ROOT)}")
            seen.setdefault(name, path)
    assert not clashes, "\n".join(clashes)
