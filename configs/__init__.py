"""The example configs installed with livedecon (daemon, microscopes, training recipes) and
their lookup, `shipped_config_path`: one home for every layer that falls back on them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_config_path(name: str) -> Path:
    """Path of one of the example configs installed with the package (configs/)."""
    path = Path(str(resources.files("livedecon.configs") / name))
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config named {name!r}")
    return path
