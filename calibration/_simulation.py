"""Synthetic datasets with ground truth, written as OME-TIFF (`livedecon simulate`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from livedecon.calibration._config import MicroscopeConfig
from livedecon.calibration._forward_model import UPSAMPLING, ForwardModel
from livedecon.engines._ome_tiff import write_ome_tiff

Progress = Callable[[int], None]  # called with the number of frames just rendered


def _render(
    model: ForwardModel,
    times_s: np.ndarray,
    focus_um: np.ndarray,
    exposure_ms: float,
    progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames at the given (time, focus) pairs: raw counts and truth, stacked."""
    raw, truth = [], []
    for t_s, z_um in zip(times_s, focus_um, strict=True):
        obs = model.acquire(float(t_s), float(z_um), exposure_ms)
        raw.append(obs.counts)
        truth.append(obs.truth)
        if progress:
            progress(1)
    return np.stack(raw), np.stack(truth)


def simulate_time_series(
    microscope: MicroscopeConfig,
    out_dir: Path,
    frames: int,
    interval_s: float,
    exposure_ms: float,
    progress: Progress | None = None,
) -> dict[str, object]:
    """2D time-lapse at focus 0: raw counts (T, Y, X) and truth (T, 2Y, 2X)."""
    times = np.arange(frames) * interval_s
    raw, truth = _render(ForwardModel(microscope), times, np.zeros(frames), exposure_ms, progress)
    px = microscope.optics.pixel_size_um
    raw_path = write_ome_tiff(
        out_dir / "sim2d_raw.ome.tif", raw, "TYX", px, time_increment_s=interval_s
    )
    truth_path = write_ome_tiff(
        out_dir / "sim2d_truth.ome.tif",
        truth,
        "TYX",
        px / UPSAMPLING,
        time_increment_s=interval_s,
        description="ground truth, photoelectrons per pixel, no background",
    )
    return {
        "raw": raw_path.name,
        "truth": truth_path.name,
        "axes": "TYX",
        "sample_times_s": times.tolist(),
        "focus_um": 0.0,
        "exposure_ms": exposure_ms,
        "microscope": microscope.model_dump(mode="json"),
    }


def simulate_stack(
    microscope: MicroscopeConfig,
    out_dir: Path,
    exposure_ms: float,
    progress: Progress | None = None,
) -> dict[str, object]:
    """3D stack over the specimen's depth at time 0: raw (Z, Y, X) and truth (Z, 2Y, 2X)."""
    model = ForwardModel(microscope)
    z_um = model.planes_um
    raw, truth = _render(model, np.zeros(z_um.size), z_um, exposure_ms, progress)
    px, dz = microscope.optics.pixel_size_um, microscope.optics.z_step_um
    raw_path = write_ome_tiff(out_dir / "sim3d_raw.ome.tif", raw, "ZYX", px, dz)
    truth_path = write_ome_tiff(
        out_dir / "sim3d_truth.ome.tif",
        truth,
        "ZYX",
        px / UPSAMPLING,
        dz,
        description="ground truth, photoelectrons per pixel, no background",
    )
    return {
        "raw": raw_path.name,
        "truth": truth_path.name,
        "axes": "ZYX",
        "sample_time_s": 0.0,
        "focus_um": z_um.tolist(),
        "exposure_ms": exposure_ms,
        "microscope": microscope.model_dump(mode="json"),
    }


def write_manifest(out_dir: Path, entries: Mapping[str, object]) -> Path:
    """Write simulation.json, what a simulated dataset holds, beside its files."""
    path = out_dir / "simulation.json"
    path.write_text(json.dumps(entries, indent=2))
    return path
