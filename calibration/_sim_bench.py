"""`livedecon bench sim`: the SIM reconstruction against the simulator's truth.

Per scene: how well the pattern is found (angle, period and phase errors against the true
pattern; the modulation found), and the widefield image (mean of the raw frames) against the
SIM reconstruction: fitted PSNR against the specimen at SIM resolution, decorrelation
resolution. Then the reconstruction's speed with known parameters (the live case: estimate
once, reuse) on 9 frames of `speed_px` squared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypedDict

import numpy as np

from livedecon.calibration._baseline import upsample_2x
from livedecon.calibration._forward_model import UPSAMPLING
from livedecon.calibration._metrics import decorrelation_resolution, psnr
from livedecon.calibration._quality_bench import (
    OPTICS,
    SIM_METHODS_2D,
    STRUCTURES,
    RenderedScene,
    Restorer,
    Scene,
    fit_to,
    scored_region,
)
from livedecon.calibration._resolution_targets import (
    SEPARATIONS_NM,
    PairKind,
    PairTarget,
    pair_target,
    smallest_resolved,
)
from livedecon.calibration._sim_run import default_sim_config
from livedecon.calibration._sim_simulator import SimAcquisition, render_sim
from livedecon.engines._dps import DpsConfig, DpsSpec, restore_dps, train_dps_sim
from livedecon.engines._sim import SimSettings, estimate_parameters, reconstruct
from livedecon.engines._sim_pattern import SimParameters
from livedecon.engines._sim_training import SimTrainingConfig, restore_sim, train_zs_sim


def sim_scenes(structures: tuple[str, ...], peaks: tuple[float, ...], size_px: int) -> list[Scene]:
    """The SIM bench's TIRF scenes: one per structure and peak signal, seeds of their own,
    fixed by the structure's place in STRUCTURES (a scene does not change with the others
    chosen beside it)."""
    return [
        Scene(
            structure=s,
            optics="tirf",
            peak_photons=p,
            size_px=size_px,
            seed=3000 + 10 * STRUCTURES.index(s),
        )
        for s in structures
        for p in peaks
    ]


def phase_errors_at_centre(
    found: SimParameters, truth: SimParameters, shape: tuple[int, int]
) -> np.ndarray:
    """|phase error| (radians) per angle and frame at the centre of an output grid of
    `shape`, where the data is: phases are stated at the frame's corner, where a pattern
    vector 0.1% off moves them by ~0.1 rad on a 256-pixel grid while the pattern at the
    centre stays in place."""
    centre = np.asarray(shape, dtype=float) / 2
    drift = 2 * np.pi * (np.asarray(found.k) - np.asarray(truth.k)) @ centre
    error = np.asarray(found.phases) - np.asarray(truth.phases) + drift[:, None]
    return np.abs(np.angle(np.exp(1j * error)))


def parameter_errors(
    found: SimParameters, truth: SimParameters, shape: tuple[int, int]
) -> dict[str, float]:
    """Worst angle (degrees), period (relative) and phase (radians, at the centre of the
    output grid of `shape`) errors over the angles where a pattern was found, and how many
    angles that is."""
    found_here = np.asarray(found.modulation) > 0
    if not found_here.any():
        return {"angles_found": 0}
    angle = np.abs(found.angles_deg() - truth.angles_deg())
    angle = np.minimum(angle, 180 - angle)  # k and -k are one pattern
    period = np.abs(found.periods_um() / truth.periods_um() - 1)
    phase = phase_errors_at_centre(found, truth, shape)
    return {
        "angles_found": int(found_here.sum()),
        "angle_error_deg": float(angle[found_here].max()),
        "period_error": float(period[found_here].max()),
        "phase_error_rad": float(phase[found_here].max()),
        "modulation": float(np.mean(np.asarray(found.modulation)[found_here])),
    }


def _scores(image: np.ndarray, acquisition: SimAcquisition, pixel_um: float) -> dict[str, float]:
    """Fitted PSNR against the truth at SIM resolution (a camera-grid image is interpolated
    onto the 2x grid first) and decorrelation resolution on the image's own grid."""
    reference = scored_region(acquisition.reference)
    on_fine_grid = upsample_2x(image) if pixel_um > acquisition.fine_pixel_um else image
    return {
        "psnr": psnr(fit_to(scored_region(on_fine_grid), reference), reference),
        "resolution_nm": 1000 * decorrelation_resolution(image, pixel_um),
    }


def run_scene(scene: Scene) -> dict[str, object]:
    """One SIM scene: estimate the pattern, reconstruct, score against the truth and the
    simulator's true parameters."""
    acquisition = render_sim(scene)
    electrons = acquisition.electrons - scene.background_e
    args = (acquisition.psf_2x, acquisition.fine_pixel_um, acquisition.cutoff_per_um)
    started = time.perf_counter()
    found = estimate_parameters(electrons, *args)
    estimate_s = time.perf_counter() - started
    result = reconstruct(electrons, *args, parameters=found)
    widefield = _scores(electrons.mean(axis=0), acquisition, 2 * acquisition.fine_pixel_um)
    sim = _scores(result.image, acquisition, acquisition.fine_pixel_um)
    return {
        "scene": scene.name,
        "peak_photons": scene.peak_photons,
        "widefield_psnr": widefield["psnr"],
        "sim_psnr": sim["psnr"],
        "widefield_resolution_nm": widefield["resolution_nm"],
        "sim_resolution_nm": sim["resolution_nm"],
        "estimate_s": estimate_s,
        **parameter_errors(found, acquisition.truth_parameters, result.image.shape),
    }


def reconstruction_speed(size_px: int, repeats: int = 3) -> dict[str, float]:
    """Seconds per reconstruction of 9 raw frames of size_px^2 with known parameters."""
    acquisition = render_sim(Scene(structure="mixed", peak_photons=100, size_px=size_px))
    electrons = acquisition.electrons - acquisition.scene.background_e
    args = (acquisition.psf_2x, acquisition.fine_pixel_um, acquisition.cutoff_per_um)
    parameters = acquisition.truth_parameters
    reconstruct(electrons, *args, parameters=parameters)  # warm-up (FFT plans)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        reconstruct(electrons, *args, parameters=parameters)
        times.append(time.perf_counter() - started)
    median = float(np.median(times))
    return {"size_px": size_px, "median_s": median, "sr_frames_per_s": 1 / median}


class SimBenchResults(TypedDict):
    """What `livedecon bench sim` writes: a row per scene and the reconstruction speed."""

    rows: list[dict[str, object]]  # one per scene (run_scene)
    speed: dict[str, float]  # reconstruction_speed


def run_sim_bench(
    scenes: list[Scene], speed_px: int, progress: Callable[[str], None] = lambda _: None
) -> SimBenchResults:
    """Every scene's row, then the reconstruction speed at speed_px x speed_px."""
    rows = []
    for scene in scenes:
        progress(scene.name)
        rows.append(run_scene(scene))
    progress(f"speed at {speed_px} px")
    return {"rows": rows, "speed": reconstruction_speed(speed_px)}


TARGET_METHODS = ("widefield", "wiener", "zs-sim", "dps")


def pair_target_acquisition(
    kind: PairKind, peak_photons: float, separations_nm: tuple[float, ...] = SEPARATIONS_NM
) -> tuple[PairTarget, SimAcquisition]:
    """A line- or bead-pair target and its SIM acquisition on the TIRF simulator (peak
    photons per raw frame, a fixed seed)."""
    target = pair_target(kind, OPTICS["tirf"].pixel_size_um / UPSAMPLING, separations_nm)
    size_px = target.specimen.shape[0] // UPSAMPLING
    scene = Scene(structure="sparse", peak_photons=peak_photons, size_px=size_px, seed=3500)
    return target, render_sim(scene, specimen=target.specimen)


def run_pair_targets(
    kind: PairKind,
    peak_photons: float,
    iterations: int,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, float | None]:
    """The smallest separation (nm) of the simulator's line or bead pairs each method resolves
    (None: not even the widest): the widefield image (mean of the raw frames), the Wiener
    reconstruction, and ZS-DeconvNet-SIM and DPS trained zero-shot on the target's own frames
    behind it. The true pattern is given: resolution is measured here, not pattern finding
    (on a target of a few pairs there is little for the estimate to lock onto)."""
    target, acquisition = pair_target_acquisition(kind, peak_photons)
    scene, fine_um = acquisition.scene, acquisition.fine_pixel_um
    electrons = acquisition.electrons - scene.background_e
    pattern = acquisition.truth_parameters
    args = (acquisition.psf_2x, pattern, acquisition.cutoff_per_um, scene.read_noise_e)
    progress(f"{kind}: ZS-DeconvNet-SIM")
    zs = train_zs_sim(electrons, *args, SimTrainingConfig(iterations=iterations))
    wiener = reconstruct(
        electrons, acquisition.psf_2x, fine_um, acquisition.cutoff_per_um, zs.settings, pattern
    ).image
    progress(f"{kind}: DPS")
    dps = train_dps_sim(
        electrons, *args, DpsConfig(iterations=iterations, network=DpsSpec(upsample=False))
    )
    images = {
        "widefield": upsample_2x(electrons.mean(axis=0)),
        "wiener": wiener,
        "zs-sim": restore_sim(zs, wiener),
        "dps": restore_dps(dps, wiener),
    }
    return {method: smallest_resolved(image, target) for method, image in images.items()}


def sim_restorer(method: str, budget_min: float | None = None) -> Restorer:
    """A `bench quality` method on the scene's SIM acquisition (render_sim of the same
    specimen, its peak photons per raw frame): the Wiener reconstruction with the pattern
    estimated from the frames, or ZS-DeconvNet-SIM or DPS (their CPU defaults,
    `sim_run.default_sim_config`, or `budget_min`) trained behind it. The background is
    known, as the widefield rows' is; the SR image is scored against the bench's reference
    as they are."""
    if method not in SIM_METHODS_2D:
        raise ValueError(f"unknown SIM method {method!r}; known: {', '.join(SIM_METHODS_2D)}")

    def restore_scene(rendered: RenderedScene) -> tuple[np.ndarray, dict[str, float | str]]:
        started = time.perf_counter()
        scene = rendered.scene
        acquisition = render_sim(scene)
        frames = acquisition.electrons - scene.background_e
        args = (acquisition.psf_2x, acquisition.fine_pixel_um, acquisition.cutoff_per_um)
        pattern = estimate_parameters(frames, *args)
        notes: dict[str, float | str] = {"angles_found": int(np.count_nonzero(pattern.modulation))}
        if method == "sim-wiener":
            return reconstruct(frames, *args, SimSettings(), pattern).image, notes
        train_args = (acquisition.psf_2x, pattern, acquisition.cutoff_per_um, scene.read_noise_e)
        config = default_sim_config("sim" if method == "zs-sim" else "dps").model_copy(
            update={"budget_min": budget_min}
        )
        if isinstance(config, SimTrainingConfig):
            zs = train_zs_sim(frames, *train_args, config)
            wiener = reconstruct(frames, *args, zs.settings, pattern).image
            image, iterations = restore_sim(zs, wiener), len(zs.losses)
        else:
            dps = train_dps_sim(frames, *train_args, config)
            assert dps.sim_settings is not None  # SIM training records its reconstruction
            wiener = reconstruct(frames, *args, dps.sim_settings, pattern).image
            image, iterations = restore_dps(dps, wiener), len(dps.losses)
        notes |= {"train_s": round(time.perf_counter() - started, 1), "iterations": iterations}
        return image, notes

    return restore_scene
