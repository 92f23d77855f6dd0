"""Self-Net against cubic interpolation on simulated volumes: `livedecon bench selfnet`, and
the Self-Net rows of `livedecon bench quality`.

A Self-Net row is scored on the axial view of a volume against an isotropic truth, which the
ZS-DeconvNet scenes' scores (calibration/_quality_bench.py) do not cover; `quality_scores`
puts its figures in that bench's `Score` (axial PSNR and SSIM, axial resolution, the isotropy
ratio in the notes), with cubic interpolation as the baseline in place of Richardson-Lucy.
Every row trains on the scene's own volume (the method), then restores it; scores: fitted
PSNR of the xz/yz view against the isotropic truth, the isotropy ratio by directional
decorrelation, training time and inference speed (voxels out per second, torch float32 on
CPU, one thread unless the caller set more).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from livedecon.calibration._anisotropic import (
    AnisotropicScene,
    Modality,
    axial_psnr,
    axial_ssim,
    isotropy,
    render_anisotropic,
)
from livedecon.calibration._quality_bench import Score
from livedecon.engines._selfnet import (
    SelfNetSpec,
    cubic_axial,
    fast_selfnet_spec,
    parameter_count,
    restore_volume,
    torch_infer,
)
from livedecon.engines._selfnet_bundle import volume_normalisation
from livedecon.engines._selfnet_training import (
    SelfNetTrainingConfig,
    default_selfnet_recipe,
    train_selfnet,
)

SPECS = {"selfnet-fast": fast_selfnet_spec, "selfnet": SelfNetSpec}
SELFNET_METHODS = ("cubic", *SPECS)  # bench quality's Self-Net rows; cubic is their baseline
SELFNET_MODALITIES: tuple[Modality, ...] = ("widefield", "confocal", "light-sheet")


@dataclass
class SelfNetRow:
    """One method on one anisotropic volume: axial scores, isotropy, size, time and speed."""

    scene: str
    method: str
    axial_psnr_db: float
    axial_ssim: float
    isotropy: float
    lateral_um: float
    axial_um: float
    parameters: int = 0
    train_s: float = 0.0
    iterations: int = 0
    voxels_per_s: float = 0.0
    seconds: float = 0.0  # the method's wall time: training and restoring

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _row(
    scene: str, method: str, volume: np.ndarray, truth: np.ndarray, pixel: float
) -> SelfNetRow:
    iso = isotropy(volume, pixel)
    return SelfNetRow(
        scene,
        method,
        axial_psnr(volume, truth),
        axial_ssim(volume, truth),
        iso.ratio,
        iso.lateral_um,
        iso.axial_um,
    )


def bench_scene(
    scene: AnisotropicScene, methods: list[str], cfg: SelfNetTrainingConfig
) -> list[SelfNetRow]:
    """Rows for one scene: the truth (the ceiling), cubic interpolation, each network."""
    rendered = render_anisotropic(scene)
    name = scene.name
    norm = volume_normalisation(rendered.electrons)
    units = norm.electrons(rendered.electrons) / norm.scale_e
    truth, pixel = rendered.truth, scene.pixel_um
    ceiling = _row(name, "truth", truth, truth, pixel)
    ceiling.axial_psnr_db = float("inf")  # the truth against itself
    started = time.perf_counter()
    interpolated = cubic_axial(units, scene.ratio)
    cubic_s = time.perf_counter() - started
    cubic = _row(name, "cubic", interpolated, truth, pixel)
    cubic.seconds = cubic_s
    rows = [ceiling, cubic]
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
        row.seconds = result.seconds + seconds
        rows.append(row)
    return rows


def format_rows(rows: list[SelfNetRow]) -> str:
    """The rows as a Markdown table, as the README quotes them."""
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


# -- bench quality's Self-Net rows ------------------------------------------------------------


def anisotropic_scenes(
    modalities: tuple[Modality, ...], peaks: tuple[float, ...]
) -> list[AnisotropicScene]:
    """bench quality's volumes for Self-Net: 16 x 64 x 64, z step 3 lateral pixels, one per
    modality and peak signal. A modality's seed is fixed by its place in SELFNET_MODALITIES,
    so a volume is the same whichever others are chosen with it."""
    return [
        AnisotropicScene(modality=m, peak_photons=p, seed=3000 + 10 * SELFNET_MODALITIES.index(m))
        for m in modalities
        for p in peaks
    ]


def selfnet_recipe(budget: str, budget_min: float | None, network: str) -> SelfNetTrainingConfig:
    """A Self-Net network under a budget: what `livedecon train` picks on a CPU ("cpu") or a
    GPU ("gpu"); `budget_min` overrides the time cap."""
    recipe = default_selfnet_recipe(network, "cuda" if budget == "gpu" else "cpu")
    return recipe.model_copy(update={"budget_min": budget_min or recipe.budget_min})


def as_score(row: SelfNetRow) -> Score:
    """A Self-Net bench row in bench quality's terms: PSNR and SSIM are axial (the volume as
    xz/yz slices against the isotropic truth), resolution is axial; the isotropy ratio and
    the lateral resolution go in the notes where decorrelation measures both."""
    notes: dict[str, float | str] = {}
    # decorrelation finds no lateral resolution in noise-limited xy slices (below about 100
    # photons here): then the ratio is not measured rather than infinite
    if np.isfinite(row.lateral_um) and np.isfinite(row.axial_um):
        notes = {"isotropy": round(row.isotropy, 3), "lateral_nm": round(1000 * row.lateral_um)}
    if row.iterations:
        notes |= {"train_s": round(row.train_s, 1), "iterations": row.iterations}
    return Score(
        method=row.method,
        scene=f"volume-{row.scene}",
        psnr=row.axial_psnr_db,
        ssim=row.axial_ssim,
        resolution_nm=1000 * row.axial_um if np.isfinite(row.axial_um) else None,
        ringing=None,
        dim_recall=None,
        seconds=row.seconds,
        view="axial",
        notes=notes,
    )


def quality_scores(
    scene: AnisotropicScene,
    methods: tuple[str, ...],
    recipe: Callable[[str], SelfNetTrainingConfig],
) -> list[Score]:
    """bench quality's rows for one volume: cubic interpolation and each Self-Net network
    asked for, trained with `recipe(network)` (the isotropic truth's own row is left out:
    its PSNR is infinite)."""
    rows = [r for r in bench_scene(scene, [], recipe("selfnet-fast")) if r.method == "cubic"]
    for network in (m for m in methods if m in SPECS):
        rows += [r for r in bench_scene(scene, [network], recipe(network)) if r.method == network]
    return [as_score(r) for r in rows if r.method in methods]
