from __future__ import annotations

import os
from pathlib import Path

import pytest

# Qt tests (the live viewer) and `livedecon demo` run without a display: no window opens, and
# CI needs no X server. Set before anything imports Qt; an explicit setting wins.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# pytest-xdist runs two workers on two cores: one thread each for torch and OpenMP, inherited
# by the daemons and CLIs the tests start (more threads than cores make thread pools spin)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def small_microscope():
    """The default simulated microscope shrunk to 64 x 64 pixels for fast tests."""
    from livedecon.calibration._config import default_microscope

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


def pytest_collection_modifyitems(config, items):
    """`gpu` and `tensorrt` tests skip cleanly where the backend selection says they cannot
    run (the same check `backend="auto"` makes)."""
    from livedecon.engines._backends import available_backends

    absent = available_backends()
    reasons = {"gpu": absent["torch-cuda"], "tensorrt": absent["tensorrt"]}
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
