"""Cache of compiled artifacts (ONNX files, TensorRT plans, accuracy-gate results).

An artifact is keyed by everything that changes it: weights hash, architecture, backend,
precision, shape profile, device and library versions. The key's ingredients are stored
beside the artifact and checked on every lookup, so a stale artifact (new weights, another GPU,
an upgraded library) is rebuilt, never used.

The cache lives in the bundle's `cache/` when that is writable, otherwise (a shipped bundle
inside a read-only installation) under the user's cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from livedecon.engines._atomic_write import write_atomically
from livedecon.engines._bundle import CACHE, ModelBundle
from livedecon.engines._enums import Backend

LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def library_versions() -> dict[str, str]:
    """The installed version of each library that changes a compiled artifact."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def device_description(backend: str) -> str:
    """The device an artifact is compiled for: the GPU model and compute capability for GPU
    backends (plans do not move between GPU models), the CPU otherwise."""
    if backend in (Backend.TENSORRT, Backend.TORCH_CUDA) and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} sm_{major}{minor}"
    return "cpu"


def artifact_key(
    bundle: ModelBundle, backend: str, precision: str, profile: Any = None
) -> dict[str, Any]:
    """Every ingredient of an artifact, as JSON-ready values."""
    return {
        "weights_sha256": bundle.manifest.weights_sha256,
        "network": bundle.manifest.network.model_dump(mode="json"),
        "backend": backend,
        "precision": precision,
        "profile": profile,
        "device": device_description(backend),
        "libraries": library_versions(),
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_root(bundle_dir: Path, bundle: ModelBundle) -> Path:
    """The bundle's own cache/ when writable, else a per-user cache for this bundle id."""
    own = Path(bundle_dir) / CACHE
    try:
        own.mkdir(exist_ok=True)
        if os.access(own, os.W_OK):
            return own
    except OSError:
        pass
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    root = base / "livedecon" / "bundles" / bundle.bundle_id.replace("@", "-")
    root.mkdir(parents=True, exist_ok=True)
    return root


def artifact_dir(root: Path, key: dict[str, Any]) -> tuple[Path, bool]:
    """The directory for `key` and whether it holds a valid (non-stale) artifact. A directory
    whose recorded key differs is emptied so the caller rebuilds into it."""
    directory = root / f"{key['backend']}-{key['precision']}-{_digest(key)[:16]}"
    record = directory / "key.json"
    if record.is_file():
        try:
            if json.loads(record.read_text()) == key:
                return directory, True
        except json.JSONDecodeError:
            pass
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory, False


def seal(directory: Path, key: dict[str, Any]) -> None:
    """Mark an artifact complete: written last, so a crash mid-build leaves it invalid."""
    write_atomically(directory / "key.json", json.dumps(key, indent=2, sort_keys=True))
