"""`livedecon bench quality`: restoration quality on simulated scenes with known truth.

Every scene is rendered by the project's forward model (PSF from psfmodels, Poisson shot
noise, camera read noise, offset and gain) at a chosen peak signal; none is ever used for
training except by the zero-shot networks on the frame itself, which is the method. Each method
is scored against a 2x-resolution reference: the specimen seen through the PSF of half the
emission wavelength, on the 2x grid. A method's score is the better of its output as-is and its
output seen through that reference PSF (so a sharper estimate than the reference is not
penalised), after the least-squares fit a*x+b onto the reference ("fitted PSNR").

Besides PSNR: SSIM, decorrelation resolution, ringing around isolated puncta, recall of the
scene's dim puncta (a restoration that erases real structure is wrong however sharp), and for
3D the plane-to-plane brightness alternation.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
from pydantic import Field
from scipy import signal

from livedecon.calibration._anisotropic import AnisotropicScene
from livedecon.calibration._baseline import upsample_2x
from livedecon.calibration._config import Camera, MicroscopeConfig, Optics, Sample
from livedecon.calibration._forward_model import (
    UPSAMPLING,
    ForwardModel,
    SceneCamera,
    camera_counts,
)
from livedecon.calibration._metrics import (
    decorrelation_resolution,
    find_puncta,
    psnr,
    ringing,
    ssim,
)
from livedecon.calibration._psf import theoretical_psf
from livedecon.engines._dps import DpsConfig, DpsSpec, restore_dps, train_dps
from livedecon.engines._networks import UNetSpec
from livedecon.engines._psf_kernel import prepare_psf
from livedecon.engines._refinement import finish
from livedecon.engines._training import (
    CPU_BUDGET_MIN,
    TrainingConfig,
    default_recipe,
    restore,
    train,
)

Structure = Literal["sparse", "dense", "puncta", "mixed", "volume"]
STRUCTURES: tuple[Structure, ...] = get_args(Structure)
OpticsName = Literal["tirf", "widefield"]

OPTICS: dict[str, Optics] = {
    # TIRF with a 1.49 NA oil objective, as for the lamp1 frame (62.6 nm pixels)
    "tirf": Optics(
        na=1.49, emission_um=0.58, immersion_ri=1.518, pixel_size_um=0.0626, modality="tirf"
    ),
    # widefield with a 1.4 NA oil objective, 65 nm pixels (the default simulated microscope)
    "widefield": Optics(na=1.4, emission_um=0.525, pixel_size_um=0.065, z_step_um=0.2),
}
# (filaments, puncta) per 100 um^2 of field
DENSITY: dict[str, tuple[float, float]] = {
    "sparse": (6.0, 0.0),
    "dense": (40.0, 0.0),
    "puncta": (0.0, 60.0),
    "mixed": (12.0, 40.0),
    "volume": (8.0, 30.0),
}
BORDER_FINE_PX = 16  # left out of every score: no method sees beyond the frame
RL_ITERATIONS = (2, 4, 8, 12, 16, 24, 32, 48, 64, 96)
PSF_PLANES_3D = 9  # the 3D PSFs' planes at the scene's z step
DIM_FRACTION = 1 / 3  # the dimmest third of the puncta are the "dim puncta" to recall


class Scene(SceneCamera):
    """One simulated acquisition of the quality bench: structure, optics, light and camera."""

    structure: Structure
    optics: OpticsName = "tirf"
    peak_photons: float = Field(15.0, gt=0, description="peak signal above background, e-")
    background_e: float = Field(2.0, ge=0, description="background per camera pixel, e-")
    size_px: int = Field(128, ge=32, le=2048)
    slices: int = Field(16, ge=4, description="3D scenes: planes of the z-stack")
    seed: int = Field(1000, description="sample and noise seed; never used to train anything")

    @property
    def is_3d(self) -> bool:
        return self.structure == "volume"

    @property
    def name(self) -> str:
        return f"{self.structure}-{self.optics}-{self.peak_photons:g}ph"


def default_scenes(peaks: tuple[float, ...] = (5, 15, 50, 200)) -> list[Scene]:
    """The bench's grid: four 2D structures x two optics x the peak signals, and a volume."""
    scenes = [
        Scene(structure=s, optics=o, peak_photons=p, seed=1000 + 10 * i)
        for i, (s, o) in enumerate(
            (s, o) for s in ("sparse", "dense", "puncta", "mixed") for o in ("tirf", "widefield")
        )
        for p in peaks
    ]
    volume = Scene(structure="volume", optics="widefield", peak_photons=30, size_px=64, seed=2000)
    return [*scenes, volume]


@dataclass
class RenderedScene:
    """One noisy acquisition with everything needed to score its restorations."""

    scene: Scene
    counts: np.ndarray  # camera counts (Y, X) or (Z, Y, X)
    electrons: np.ndarray  # photoelectrons with the true camera values, background included
    reference: np.ndarray  # 2x-resolution reference on the 2x grid, e- per fine pixel
    reference_psf: np.ndarray  # the half-wavelength PSF on the 2x grid (2D, or 3D for volumes)
    psf: np.ndarray  # the microscope's PSF prepared for training (2x grid; 3D: at dz)
    psf_2x_plane: np.ndarray  # the in-focus plane on the 2x grid, for 2D Richardson-Lucy
    dim_puncta: np.ndarray  # (n, 2) fine-grid (row, col) of the dim puncta in focus
    fine_pixel_um: float
    camera: Camera


def _microscope(scene: Scene) -> MicroscopeConfig:
    optics = OPTICS[scene.optics]
    area = (scene.size_px * optics.pixel_size_um) ** 2 / 100.0
    filaments, puncta = (round(d * area) for d in DENSITY[scene.structure])
    sample = Sample(
        seed=scene.seed,
        depth_um=2.0 if scene.is_3d else 0.0,
        n_filaments=filaments,
        n_puncta=puncta,
        background_photons_px_s=0.0,
    )
    return MicroscopeConfig(name=scene.name, optics=optics, camera=scene.camera(), sample=sample)


def _plane_offsets(scene: Scene, dz: float) -> np.ndarray:
    return (np.arange(scene.slices) - (scene.slices - 1) / 2) * dz


def render(scene: Scene) -> RenderedScene:
    """Render the scene: noise-free image scaled to the peak signal, plus the camera."""
    scope = _microscope(scene)
    model = ForwardModel(scope, noise_seed=scene.seed)
    fine_um = model.truth_pixel_um
    optics = scope.optics
    z_planes = _plane_offsets(scene, optics.z_step_um) if scene.is_3d else np.zeros(1)
    signal_e = np.stack([model.expected_electrons(0.0, float(z), 1000.0) for z in z_planes])
    truth = np.stack([model.truth(0.0, float(z)) for z in z_planes])
    scale = scene.peak_photons / float(signal_e.max())
    expected = signal_e * scale + scene.background_e
    truth = truth * scale  # e- per fine pixel, no background
    rng = np.random.default_rng(scene.seed + 17)
    counts = np.stack([camera_counts(e, scope.camera, rng) for e in expected])
    electrons = (counts.astype(np.float32) - scene.offset_adu) * scene.gain_e_per_adu

    half = optics.model_copy(update={"emission_um": optics.emission_um / 2})
    if scene.is_3d:
        offsets = (np.arange(PSF_PLANES_3D) - PSF_PLANES_3D // 2) * optics.z_step_um
        reference_psf = theoretical_psf(half, fine_um, 41, offsets)
        reference = signal.fftconvolve(truth, reference_psf / reference_psf.sum(), mode="same")
        psf3d = theoretical_psf(optics, fine_um, 63, offsets)
        psf = prepare_psf(psf3d, fine_um, fine_um)
        plane = prepare_psf(psf3d[PSF_PLANES_3D // 2], fine_um, fine_um)
    else:
        reference_psf = theoretical_psf(half, fine_um, 41)[0]
        reference_psf /= reference_psf.sum()
        reference = signal.fftconvolve(truth[0], reference_psf, mode="same")
        psf = plane = prepare_psf(theoretical_psf(optics, fine_um, 63)[0], fine_um, fine_um)
    centre = len(z_planes) // 2
    return RenderedScene(
        scene=scene,
        counts=counts if scene.is_3d else counts[0],
        electrons=electrons if scene.is_3d else electrons[0],
        reference=np.clip(reference, 0, None),
        reference_psf=reference_psf,
        psf=psf,
        psf_2x_plane=plane,
        dim_puncta=_dim_puncta(model, fine_um, truth.shape[-2:], float(z_planes[centre])),
        fine_pixel_um=fine_um,
        camera=scope.camera,
    )


def _dim_puncta(
    model: ForwardModel, fine_um: float, shape: tuple[int, ...], z_um: float
) -> np.ndarray:
    positions, photons = model.sample.puncta(0.0)
    if len(photons) == 0:
        return np.zeros((0, 2), dtype=int)
    in_focus = np.abs(positions[:, 0] - z_um) < 0.15
    dim = photons <= np.quantile(photons, DIM_FRACTION)
    rc = np.floor(positions[:, 1:] / fine_um).astype(int)
    inside = np.all((rc >= BORDER_FINE_PX) & (rc < np.array(shape) - BORDER_FINE_PX), axis=1)
    return rc[dim & in_focus & inside]


# -- scoring -----------------------------------------------------------------------------


def scored_region(image: np.ndarray) -> np.ndarray:
    """The part of an image (or stack) every score sees: BORDER_FINE_PX left out at each
    edge, where no method has data on both sides."""
    b = BORDER_FINE_PX
    return image[..., b:-b, b:-b]


def fit_to(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """a * estimate + b, least squares onto the reference."""
    x = estimate.ravel().astype(np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, reference.ravel().astype(np.float64), rcond=None)
    return a * estimate + b


def _through(estimate: np.ndarray, psf: np.ndarray) -> np.ndarray:
    return signal.fftconvolve(estimate, psf / psf.sum(), mode="same")


def best_view(estimate: np.ndarray, rendered: RenderedScene) -> tuple[float, np.ndarray, str]:
    """(fitted PSNR, fitted image, view) of the better view of the estimate: "as-is" or
    "through" the reference PSF."""
    reference = scored_region(rendered.reference)
    views = {"as-is": estimate, "through": _through(estimate, rendered.reference_psf)}
    fitted = {name: fit_to(scored_region(v), reference) for name, v in views.items()}
    scores = {name: psnr(f, reference) for name, f in fitted.items()}
    best = max(scores, key=lambda name: scores[name])
    return scores[best], fitted[best], best


def dim_recall(estimate: np.ndarray, reference: np.ndarray, puncta: np.ndarray) -> float | None:
    """Share of the dim puncta the estimate shows: a local peak (3x3 window) above its ring
    (6 to 10 fine pixels out) by at least half the reference's contrast and by 3 noise sigma."""
    if len(puncta) == 0:
        return None
    image = fit_to(estimate, reference)
    background = reference < 0.05 * reference.max()
    noise = 1.4826 * np.median(np.abs(image[background] - np.median(image[background])))
    yy, xx = np.mgrid[-10:11, -10:11]
    ring = (np.hypot(yy, xx) >= 6) & (np.hypot(yy, xx) <= 10)
    found = 0
    for r, c in puncta:
        window = (slice(r - 10, r + 11), slice(c - 10, c + 11))
        contrast = []
        for img in (image, reference):
            patch = img[window]
            if patch.shape != ring.shape:
                break
            contrast.append(patch[9:12, 9:12].max() - np.median(patch[ring]))
        if len(contrast) == 2 and contrast[0] >= max(0.5 * contrast[1], 3 * noise):
            found += 1
    return found / len(puncta)


def plane_alternation(stack: np.ndarray, edge_planes: int = 2) -> float:
    """Odd/even brightness alternation of a stack's plane means m_z, away from its ends: the
    mean of (-1)^z (m_z - (m_{z-1} + m_{z+1}) / 2) relative to the mean plane (0: none; a
    stack whose planes alternate by +-a% gives a/100)."""
    means = stack.reshape(stack.shape[0], -1).mean(axis=1)[edge_planes : len(stack) - edge_planes]
    if len(means) < 3 or means.mean() <= 0:
        return 0.0
    second = means[1:-1] - (means[:-2] + means[2:]) / 2
    signs = (-1.0) ** np.arange(len(second))
    return float(abs(np.mean(signs * second)) / 2 / means.mean())


@dataclass
class Score:
    """One method's figures on one scene (a row of the bench's table and JSON)."""

    method: str
    scene: str
    psnr: float
    ssim: float
    resolution_nm: float | None
    ringing: float | None
    dim_recall: float | None
    seconds: float
    psnr_focus: float | None = None  # 3D: the central plane alone
    alternation: float | None = None  # 3D: plane-to-plane brightness alternation
    view: str = "as-is"  # which view scored: "as-is" or "through" the reference PSF
    notes: dict[str, float | str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def score(
    method: str,
    estimate: np.ndarray,
    rendered: RenderedScene,
    seconds: float,
    **notes: float | str,
) -> Score:
    """All figures of one method's estimate (2x grid, e- per fine pixel)."""
    value, fitted, view = best_view(estimate, rendered)
    reference = scored_region(rendered.reference)
    focus = alternation = None
    plane = estimate
    if rendered.scene.is_3d:
        centre = estimate.shape[0] // 2
        plane = estimate[centre]
        focus_ref = scored_region(rendered.reference[centre])
        seen = _through(estimate, rendered.reference_psf)[centre]
        focus = max(psnr(fit_to(scored_region(v), focus_ref), focus_ref) for v in (plane, seen))
        alternation = plane_alternation(scored_region(estimate))
        reference, fitted = reference[centre], fitted[centre]
    # on the camera grid after 2x2 binning: noise on the fine grid would pass for detail
    inner = scored_region(plane)
    binned = inner.reshape(inner.shape[0] // 2, 2, inner.shape[1] // 2, 2).sum(axis=(1, 3))
    resolution = decorrelation_resolution(binned, UPSAMPLING * rendered.fine_pixel_um)
    optics = OPTICS[rendered.scene.optics]
    fwhm_fine = 0.51 * optics.emission_um / optics.na / rendered.fine_pixel_um
    ring = None
    centres = find_puncta(reference, fwhm_fine / 2)
    if len(centres):
        raw_fine = upsample_2x(
            rendered.electrons[rendered.electrons.shape[0] // 2]
            if rendered.scene.is_3d
            else rendered.electrons
        )
        try:
            ringing_figures = ringing(
                scored_region(plane), centres, fwhm_fine, scored_region(raw_fine)
            )
            ring = max(ringing_figures.values())
        except ValueError:
            ring = None
    reference_plane = (
        rendered.reference[rendered.reference.shape[0] // 2]
        if rendered.scene.is_3d
        else rendered.reference
    )
    recall = dim_recall(plane, reference_plane, rendered.dim_puncta)
    return Score(
        method=method,
        scene=rendered.scene.name,
        psnr=value,
        ssim=ssim(fitted, reference),
        resolution_nm=None if not np.isfinite(resolution) else 1000 * resolution,
        ringing=ring,
        dim_recall=recall,
        seconds=seconds,
        psnr_focus=focus,
        alternation=alternation,
        view=view,
        notes=dict(notes),
    )


# -- the classical methods -----------------------------------------------------------------


def raw_estimate(rendered: RenderedScene) -> np.ndarray:
    """The camera frame (background removed) shared onto the 2x grid."""
    frames = rendered.electrons - rendered.scene.background_e
    if rendered.scene.is_3d:
        return np.stack([upsample_2x(plane) for plane in frames])
    return upsample_2x(frames)


def best_richardson_lucy(rendered: RenderedScene) -> tuple[np.ndarray, int]:
    """Richardson-Lucy on the 2x grid with the known background in its model, at its best
    iteration count by the bench's own score: an oracle choice users do not have. 3D scenes
    use the 3D PSF."""
    electrons = np.clip(rendered.electrons, 0, None)
    if rendered.scene.is_3d:
        observed = np.stack([upsample_2x(p) for p in electrons])
        psf = rendered.psf
    else:
        observed = upsample_2x(electrons)
        psf = rendered.psf_2x_plane
    psf = psf / psf.sum()
    mirror = psf[tuple(slice(None, None, -1) for _ in psf.shape)]
    background = rendered.scene.background_e / UPSAMPLING**2
    estimate = np.clip(observed - background, 1e-3, None)
    best: tuple[float, np.ndarray, int] | None = None
    done = 0
    for n in RL_ITERATIONS:
        for _ in range(n - done):
            blurred = signal.fftconvolve(estimate, psf, mode="same") + background
            ratio = observed / np.maximum(blurred, 1e-6)
            estimate = estimate * np.clip(signal.fftconvolve(ratio, mirror, mode="same"), 0, None)
        done = n
        value, *_ = best_view(estimate, rendered)
        if best is None or value > best[0]:
            best = (value, estimate.copy(), n)
    assert best is not None
    return best[1], best[2]


# -- the networks ----------------------------------------------------------------------------

Restorer = Callable[[RenderedScene], tuple[np.ndarray, dict[str, float | str]]]


def run_method(name: str, restorer: Restorer, rendered: RenderedScene) -> Score:
    """Run one restorer on a rendered scene and score its estimate, timing the whole run."""
    started = time.perf_counter()
    estimate, notes = restorer(rendered)
    return score(name, estimate, rendered, time.perf_counter() - started, **notes)


def network_restorer(config: TrainingConfig, seed: int = 0) -> Restorer:
    """Zero-shot: train on the scene's own noisy frame (or stack), then restore it."""

    def restore_scene(rendered: RenderedScene) -> tuple[np.ndarray, dict[str, float | str]]:
        started = time.perf_counter()
        noise = rendered.camera.read_noise_e
        settings = config.model_copy(update={"seed": seed})
        result = train([rendered.electrons], rendered.psf, settings, None, noise, False)
        trained = time.perf_counter() - started
        estimate = restore(result.model, rendered.electrons, result.scale_e)
        # as a bundle of this recipe restores (the bench's frames have no background removed)
        estimate = finish(
            estimate,
            rendered.electrons,
            rendered.psf,
            config.refinement,
            noise,
            0.0,
            config.serves_denoised,
        )
        background = rendered.scene.background_e / UPSAMPLING**2
        notes: dict[str, float | str] = {
            "train_s": round(trained, 1),
            "iterations": result.iterations_done,
        }
        return estimate - background, notes

    return restore_scene


def dps_restorer(config: DpsConfig) -> Restorer:
    """DPS, zero-shot on the scene's own frame; its estimate excludes the background."""

    def restore_scene(rendered: RenderedScene) -> tuple[np.ndarray, dict[str, float | str]]:
        started = time.perf_counter()
        noise = rendered.camera.read_noise_e
        result = train_dps([rendered.electrons], rendered.psf, noise, config)
        notes = {"train_s": round(time.perf_counter() - started, 1)}
        return restore_dps(result, rendered.electrons), {**notes, "iterations": len(result.losses)}

    return restore_scene


# -- the whole bench --------------------------------------------------------------------------

SIM_METHODS_2D = ("sim-wiener", "zs-sim", "dps-sim")  # the scene's SIM acquisition (sim_bench)
METHODS_2D = ("raw", "rl", "fast", "full", "dps", *SIM_METHODS_2D)
METHODS_3D = ("raw", "rl", "3d")
SELFNET_METHODS = ("cubic", "selfnet-fast", "selfnet")  # on anisotropic volumes (selfnet_bench)
BASELINE = "rl"  # what the networks' gains are measured against
SELFNET_BASELINE = "cubic"  # Self-Net's: it makes axial slices sharp, not deconvolves


PASSES_BOUND = ("fast", "3d")  # CPU networks whose passes cap ends well inside 10 minutes


def recipe_for(method: str, budget: str, budget_min: float | None) -> TrainingConfig:
    """The training recipe a network gets under a budget ("cpu": the 2-core recipe, "gpu":
    the reference schedule on the GPU). On a CPU the fast and 3D networks end at the cap on
    passes over the data (2-3 minutes per 2D bench scene, about 5 per volume, on 2 quiet
    cores), not at the wall-time cap: a busy machine then takes longer instead of scoring a
    shorter training (a scene once scored 27.93 dB under load against 28.90 quiet). The full
    network, slower, keeps the wall-time cap. `budget_min` sets a wall-time cap for any of
    them."""
    network = {"fast": "fast", "full": "full", "3d": "3d"}[method]
    recipe = default_recipe(network, "cuda" if budget == "gpu" else "cpu")
    passes_end_it = budget == "cpu" and method in PASSES_BOUND
    if budget_min is not None or passes_end_it:
        recipe = recipe.model_copy(update={"budget_min": budget_min})
    return recipe


def dps_recipe(budget: str, budget_min: float | None) -> DpsConfig:
    """DPS under a budget: on the CPU the default network under the CPU cap; on a GPU the
    full-width U-Nets for the reference's 50,000 iterations."""
    if budget == "gpu":
        return DpsConfig(network=DpsSpec(unet=UNetSpec()), iterations=50_000, patch_px=128)
    return DpsConfig(iterations=1_000_000, budget_min=budget_min or CPU_BUDGET_MIN)


def run_bench(
    scenes: list[Scene],
    methods: tuple[str, ...],
    budget: str = "cpu",
    budget_min: float | None = None,
    progress: Callable[[str], None] = lambda _: None,
    volumes: Sequence[AnisotropicScene] = (),
) -> list[dict[str, object]]:
    """Score every method on every scene; rows as dictionaries (one per scene and method).
    `volumes`: anisotropic volumes for the Self-Net rows (cubic, selfnet-fast, selfnet)."""
    rows: list[dict[str, object]] = []
    wanted = tuple(m for m in methods if m in SELFNET_METHODS)
    if volumes and wanted:
        # selfnet_bench scores in this module's terms, so it imports this module
        from livedecon.calibration._selfnet_bench import quality_scores, selfnet_recipe

        for volume in volumes:
            progress(f"volume-{volume.name}: {', '.join(wanted)}")
            selfnet = functools.partial(selfnet_recipe, budget, budget_min)
            for result in quality_scores(volume, wanted, selfnet):
                rows.append({**result.as_dict(), "peak_photons": volume.peak_photons})
    for scene in scenes:
        rendered = render(scene)
        available = METHODS_3D if scene.is_3d else METHODS_2D
        for method in (m for m in methods if m in available):
            progress(f"{scene.name}: {method}")
            if method == "raw":
                result = run_method("raw", lambda r: (raw_estimate(r), {}), rendered)
            elif method == "rl":

                def rl(r: RenderedScene) -> tuple[np.ndarray, dict[str, float | str]]:
                    estimate, iterations = best_richardson_lucy(r)
                    return estimate, {"iterations": iterations}

                result = run_method("rl", rl, rendered)
            elif method == "dps":
                result = run_method("dps", dps_restorer(dps_recipe(budget, budget_min)), rendered)
            elif method in SIM_METHODS_2D:
                # sim_bench renders SIM acquisitions of these scenes, so it imports this module
                from livedecon.calibration._sim_bench import sim_restorer

                result = run_method(method, sim_restorer(method, budget_min), rendered)
            else:
                recipe = recipe_for(method, budget, budget_min)
                result = run_method(method, network_restorer(recipe), rendered)
            rows.append({**result.as_dict(), "peak_photons": scene.peak_photons})
    return rows


def summarise(
    rows: list[dict[str, object]], max_peak: float = 50.0
) -> dict[str, dict[str, object]]:
    """Per network: mean and worst PSNR gain over its baseline (Richardson-Lucy; cubic
    interpolation for Self-Net) on the scenes at peak signal <= max_peak, on how many scenes
    its dim-puncta recall falls below the baseline's, and Self-Net's mean isotropy ratio over
    the scenes where it is measured."""
    by_scene: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_scene.setdefault(str(row["scene"]), {})[str(row["method"])] = row
    summary: dict[str, dict[str, object]] = {}
    baselines = {"raw", BASELINE, SELFNET_BASELINE}
    for method in sorted({str(r["method"]) for r in rows} - baselines):
        baseline = SELFNET_BASELINE if method in SELFNET_METHODS else BASELINE
        gains, recall_losses, isotropy = [], 0, []
        for scene_rows in by_scene.values():
            if method not in scene_rows or baseline not in scene_rows:
                continue
            net, base = scene_rows[method], scene_rows[baseline]
            if float(net["peak_photons"]) <= max_peak:
                gains.append(float(net["psnr"]) - float(base["psnr"]))
            if "isotropy" in net["notes"]:  # at any light: it is measured only where bright
                isotropy.append(float(net["notes"]["isotropy"]))
            if net["dim_recall"] is not None and base["dim_recall"] is not None:
                recall_losses += float(net["dim_recall"]) < float(base["dim_recall"])
        if gains:
            summary[method] = {
                "baseline": baseline,
                "mean_gain_db": float(np.mean(gains)),
                "worst_gain_db": float(np.min(gains)),
                "scenes": len(gains),
                "scenes_recall_below_baseline": recall_losses,
            }
            if isotropy:
                summary[method]["mean_isotropy"] = float(np.mean(isotropy))
    return summary
