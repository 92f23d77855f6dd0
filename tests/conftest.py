from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def small_microscope():
    """The default simulated microscope shrunk to 64 x 64 pixels for fast tests."""
    from livedecon.calibration.config import default_microscope

    scope = default_microscope()
    camera = scope.camera.model_copy(update={"width_px": 64, "height_px": 64})
    sample = scope.sample.model_copy(update={"n_filaments": 3, "n_puncta": 6})
    return scope.model_copy(update={"camera": camera, "sample": sample})


@pytest.fixture
def lamp1_path() -> Path:
    """The real low-SNR TIRF frame of ../shared/data (skips where it is absent)."""
    path = SHARED_DATA / "lamp1_tirf_lowsnr.tif"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    """`gpu` and `tensorrt` tests skip cleanly where there is no CUDA GPU or no TensorRT."""
    import torch

    absent = {
        "gpu": None if torch.cuda.is_available() else "no CUDA GPU",
        "tensorrt": None
        if _importable("tensorrt") and torch.cuda.is_available()
        else "TensorRT or a CUDA GPU is not present",
    }
    for item in items:
        for marker, reason in absent.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
