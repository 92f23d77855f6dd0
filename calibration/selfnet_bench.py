"""`livedecon bench selfnet`: Self-Net against cubic interpolation on simulated volumes.

Kept apart from calibration/quality_bench.py (2D and 3D ZS-DeconvNet scenes): a Self-Net row
is scored on the axial view of a volume against an isotropic truth, which that bench's
scores do not cover. Every row trains on the scene's own volume (the method), then restores
it; scores: fitted PSNR of the xz/yz view against the isotropic truth, the isotropy ratio by
directional decorrelation, training time and inference speed (voxels out per second, torch
float32 on CPU, one thread unless the caller set more).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from livedecon.calibration.anisotropic import (
    AnisotropicScene,
    axial_psnr,
    isotropy,
    render_anisotropic,
)
from livedecon.engines.selfnet import (
    SelfNetSpec,
    cubic_axial,
    fast_selfnet_spec,
    parameter_count,
    restore_volume,
    torch_infer,
)
from livedecon.engines.selfnet_bundle import volume_normalisation
from livedecon.engines.selfnet_training import SelfNetTrainingConfig, train_selfnet

SPECS = {"selfnet-fast": fast_selfnet_spec, "selfnet": SelfNetSpec}


@dataclass
class SelfNetRow:
    scene: str
    method: str
    axial_psnr_db: float
    isotropy: float
    lateral_um: float
    axial_um: float
    parameters: int = 0
    train_s: float = 0.0
    iterations: int = 0
    voxels_per_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _row(scene: str, method: str, volume: np.ndarray, truth: np.ndarray, pixel: float):
    iso = isotropy(volume, pixel)
    return SelfNetRow(
        scene, method, axial_psnr(volume, truth), iso.ratio, iso.lateral_um, iso.axial_um
    )


def bench_scene(
    scene: AnisotropicScene, methods: list[str], cfg: SelfNetTrainingConfig
) -> list[SelfNetRow]:
    """Rows for one scene: the truth (the ceiling), cubic interpolation, each network."""
    rendered = render_anisotropic(scene)
    name = f"{scene.modality}-{scene.peak_photons:g}ph-x{scene.ratio}"
    norm = volume_normalisation(rendered.electrons)
    units = norm.electrons(rendered.electrons) / norm.scale_e
    truth, pixel = rendered.truth, scene.pixel_um
    ceiling = _row(name, "truth", truth, truth, pixel)
    ceiling.axial_psnr_db = float("inf")  # the truth against itself
    rows = [
        ceiling,
        _row(name, "cubic", cubic_axial(units, scene.ratio), truth, pixel),
    ]
    for method in methods:
        spec = SPECS[method]()
        result = train_selfnet(units, scene.ratio, cfg.model_copy(update={"network": spec}))
        started = time.perf_counter()
        restored = restore_volume(torch_infer(result.restorer), units, scene.ratio)
        seconds = time.perf_counter() - started
        row = _row(name, method, restored, truth, pixel)
        row.parameters = parameter_count(spec)
        row.train_s, row.iterations = result.seconds, result.iterations
        row.voxels_per_s = restored.size / seconds
        rows.append(row)
    return rows


def format_rows(rows: list[SelfNetRow]) -> str:
    lines = [
        "| scene | method | axial PSNR (dB) | isotropy | lateral um | axial um | params |"
        " train s | Mvoxel/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.scene} | {r.method} | {r.axial_psnr_db:.2f} | {r.isotropy:.2f} |"
            f" {r.lateral_um:.3f} | {r.axial_um:.3f} | {r.parameters or ''} |"
            f" {r.train_s:.0f} | {r.voxels_per_s / 1e6:.2f} |"
        )
    return "\n".join(lines)
