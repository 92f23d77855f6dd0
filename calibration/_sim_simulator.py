"""Simulated 2D SIM acquisitions: the bench scenes lit by sinusoidal patterns.

Each raw frame is the specimen (on the 2x truth grid) times I(r) = 1 + m cos(2 pi k.r + phi),
blurred by the detection PSF, binned onto the camera and read out by the camera model, as the
widefield simulator does. The pattern has A angles x P phases with small random errors in angle
and phase (what a real SLM or grating setup shows), and its frequency sits near the detection
cut-off 2 NA / lambda. The truth is the specimen seen through the PSF of half the wavelength on
the 2x grid: the resolution SIM can at most reach. Every frame carries the metadata a
Micro-Manager SIM acquisition would (angle and phase index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field
from scipy import signal

from livedecon.calibration._config import Camera, MicroscopeConfig, Optics
from livedecon.calibration._forward_model import UPSAMPLING, ForwardModel, camera_counts
from livedecon.calibration._psf import theoretical_psf
from livedecon.calibration._quality_bench import Scene, _microscope
from livedecon.engines._configfile import StrictModel
from livedecon.engines._ome_tiff import write_ome_tiff
from livedecon.engines._sim import bin_to_camera
from livedecon.engines._sim import detection_cutoff_per_um as cutoff_per_um
from livedecon.engines._sim_pattern import SimParameters

PSF_PX = 63  # detection PSF on the 2x grid


class SimIllumination(StrictModel):
    """The simulated SIM pattern: angles x phases of sinusoidal light, its frequency,
    modulation and the random errors a real instrument has."""

    angles: int = Field(3, ge=1, le=8)
    phases: int = Field(3, ge=3, le=9)
    first_angle_deg: float = Field(12.0, description="angle of the first pattern's wave vector")
    frequency: float = Field(
        0.8,
        gt=0,
        lt=1.0,
        description="pattern frequency, a fraction of the detection cut-off 2 NA / lambda",
    )
    modulation: float = Field(0.8, gt=0, le=1)
    angle_error_deg: float = Field(0.3, ge=0, description="sd of a random error per angle")
    period_error: float = Field(0.005, ge=0, description="sd of a relative period error")
    phase_error_rad: float = Field(0.1, ge=0, description="sd of a random error per frame")
    shift_px: tuple[float, float] = Field(
        (0.0, 0.0),
        description="the whole pattern moved by (y, x) truth-grid pixels, as thermal drift of"
        " the grating or SLM image moves it during a long acquisition",
    )


@dataclass
class SimAcquisition:
    """One SIM acquisition of a scene, with everything needed to score its reconstructions."""

    scene: Scene
    counts: np.ndarray  # (A*P, Y, X) camera counts, angle by angle
    electrons: np.ndarray  # the same in photoelectrons (true camera), background included
    truth_parameters: SimParameters  # the true pattern, in the output (2x) grid's units
    reference: np.ndarray  # the specimen at the SIM resolution on the 2x grid, e-/fine pixel
    widefield_reference: np.ndarray  # the specimen through the detection PSF, same grid
    psf_2x: np.ndarray  # the detection PSF on the 2x grid (sum 1)
    cutoff_per_um: float  # the detection cut-off 2 NA / lambda
    fine_pixel_um: float
    camera: Camera
    frame_metadata: list[dict[str, int]]


def _true_pattern(
    scene: Scene, illumination: SimIllumination, fine_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """(k vectors per angle in cycles per fine pixel, phases per angle and frame)."""
    optics = _microscope(scene).optics
    rng = np.random.default_rng(scene.seed + 29)
    n_a, n_p = illumination.angles, illumination.phases
    cutoff_per_um = detection_cutoff_per_um(optics)
    angles = np.radians(
        illumination.first_angle_deg
        + 180.0 * np.arange(n_a) / n_a
        + rng.normal(0, illumination.angle_error_deg, n_a)
    )
    nominal = illumination.frequency * cutoff_per_um * fine_um
    magnitude = nominal * (1 + rng.normal(0, illumination.period_error, n_a))
    k = np.stack([magnitude * np.sin(angles), magnitude * np.cos(angles)], axis=1)
    phases = 2 * np.pi * np.arange(n_p) / n_p + rng.normal(
        0, illumination.phase_error_rad, (n_a, n_p)
    )
    # cos(2 pi k.(r - s) + phi): a pattern moved by s shifts every phase of an angle alike
    phases -= 2 * np.pi * (k @ np.asarray(illumination.shift_px))[:, None]
    return k, phases


@dataclass
class SimScene:
    """A scene lit by every pattern, before the camera: what each raw frame expects."""

    scene: Scene
    scope: MicroscopeConfig
    expected_e: np.ndarray  # (A*P, Y, X) photoelectrons per camera pixel, no background
    parameters: SimParameters  # the true pattern, in the output (2x) grid's units
    reference: np.ndarray  # the specimen at the SIM resolution on the 2x grid, e-/fine pixel
    widefield_reference: np.ndarray  # the specimen through the detection PSF, same grid
    psf_2x: np.ndarray
    frame_metadata: list[dict[str, int]]

    def read_out(self, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
        """Camera counts of every frame: `scale` x the expected light, the background, the
        camera's noise."""
        camera = self.scope.camera
        light = np.clip(self.expected_e * scale, 0, None) + self.scene.background_e * scale
        return np.stack([camera_counts(frame, camera, rng) for frame in light])


def light_scene(
    scene: Scene,
    illumination: SimIllumination | None = None,
    specimen: np.ndarray | None = None,
) -> SimScene:
    """`scene` (2D) lit by each pattern of `illumination`: peak_photons is the
    widefield-equivalent peak per raw frame, as the widefield simulator's. `specimen` (on the
    2x grid) replaces the scene's own filaments and puncta, as the resolution targets do; the
    scene still gives optics, camera, light and seeds."""
    if scene.is_3d:
        raise ValueError("the SIM simulator makes 2D acquisitions; the scene is a volume")
    illumination = illumination or SimIllumination()
    scope = _microscope(scene)
    model = ForwardModel(scope, noise_seed=scene.seed)
    fine_um = model.truth_pixel_um
    fine_shape = (UPSAMPLING * scene.size_px,) * 2
    if specimen is not None and specimen.shape != fine_shape:
        raise ValueError(f"the specimen must be {fine_shape} for this scene, got {specimen.shape}")
    truth = (model.truth(0.0, 0.0) if specimen is None else specimen).astype(np.float64)
    psf = theoretical_psf(scope.optics, fine_um, PSF_PX)[0]
    psf /= psf.sum()
    k, phases = _true_pattern(scene, illumination, fine_um)
    y, x = np.mgrid[: truth.shape[0], : truth.shape[1]]
    widefield = signal.fftconvolve(truth, psf, mode="same")
    scale = scene.peak_photons / float(bin_to_camera(widefield).max())
    frames, metadata = [], []
    for a in range(illumination.angles):
        for p in range(illumination.phases):
            lit = 1 + illumination.modulation * np.cos(
                2 * np.pi * (k[a, 0] * y + k[a, 1] * x) + phases[a, p]
            )
            frames.append(bin_to_camera(signal.fftconvolve(truth * lit, psf, mode="same")) * scale)
            metadata.append({"sim_angle": a, "sim_phase": p})
    half = scope.optics.model_copy(update={"emission_um": scope.optics.emission_um / 2})
    reference_psf = theoretical_psf(half, fine_um, 41)[0]
    reference = signal.fftconvolve(truth * scale, reference_psf / reference_psf.sum(), mode="same")
    parameters = SimParameters(
        k=[(float(a), float(b)) for a, b in k],
        phases=[[float(v) for v in row] for row in phases],
        modulation=[illumination.modulation] * illumination.angles,
        output_pixel_um=fine_um,
    )
    return SimScene(
        scene,
        scope,
        np.stack(frames),
        parameters,
        np.clip(reference, 0, None),
        widefield * scale,
        psf,
        metadata,
    )


def render_sim(
    scene: Scene,
    illumination: SimIllumination | None = None,
    specimen: np.ndarray | None = None,
) -> SimAcquisition:
    """A SIM acquisition of `scene` (2D): `light_scene`, read out once by the camera."""
    lit = light_scene(scene, illumination, specimen)
    counts = lit.read_out(np.random.default_rng(scene.seed + 17))
    electrons = (counts.astype(np.float32) - scene.offset_adu) * scene.gain_e_per_adu
    return SimAcquisition(
        scene=scene,
        counts=counts,
        electrons=electrons,
        truth_parameters=lit.parameters,
        reference=lit.reference,
        widefield_reference=lit.widefield_reference,
        psf_2x=lit.psf_2x,
        cutoff_per_um=detection_cutoff_per_um(lit.scope.optics),
        fine_pixel_um=lit.parameters.output_pixel_um,
        camera=lit.scope.camera,
        frame_metadata=lit.frame_metadata,
    )


def detection_cutoff_per_um(optics: Optics) -> float:
    """The detection cut-off of `optics` (engines._sim.detection_cutoff_per_um)."""
    return cutoff_per_um(optics.na, optics.sample_ri, optics.emission_um)


def write_sim_acquisition(acquisition: SimAcquisition, out_dir: Path) -> dict[str, object]:
    """The raw frames (camera counts, one plane per angle and phase, angle by angle) and the
    truth at SIM resolution as OME-TIFF, with what a reconstruction needs to know."""
    frames = acquisition.counts
    camera_um = UPSAMPLING * acquisition.fine_pixel_um
    order = ", ".join(f"{m['sim_angle']}/{m['sim_phase']}" for m in acquisition.frame_metadata)
    raw = write_ome_tiff(
        Path(out_dir) / "sim_raw.ome.tif",
        frames,
        "TYX",
        camera_um,
        description=f"SIM raw frames, camera counts; plane = angle/phase: {order}",
    )
    truth = write_ome_tiff(
        Path(out_dir) / "sim_truth.ome.tif",
        acquisition.reference.astype(np.float32),
        "YX",
        acquisition.fine_pixel_um,
        description="the specimen at SIM resolution, photoelectrons per pixel, no background",
    )
    return {
        "raw": raw.name,
        "truth": truth.name,
        "frames": acquisition.frame_metadata,
        "pattern": acquisition.truth_parameters.model_dump(mode="json"),
        "detection_cutoff_per_um": acquisition.cutoff_per_um,
        "scene": acquisition.scene.model_dump(mode="json"),
        "camera": acquisition.camera.model_dump(mode="json"),
    }
