"""Training a model bundle from a microscope's own data: TIFFs or the simulator.

This is the glue between the microscope description (calibration) and the engines: it turns
camera counts into photoelectrons with the camera calibration, makes the PSF through the one
PSF code path (or reads a measured one), trains, and writes a bundle with full provenance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from livedecon.calibration._config import Camera, MicroscopeConfig
from livedecon.calibration._forward_model import UPSAMPLING, ForwardModel, counts_to_electrons
from livedecon.calibration._inputs import sha256
from livedecon.calibration._noise_estimate import (
    NoiseEstimate,
    NoiseEstimateError,
    camera_disagreement,
    estimate_noise,
)
from livedecon.calibration._psf import theoretical_psf
from livedecon.engines._bundle import ModelBundle, Normalisation, PSFRecord, TrainingRecord
from livedecon.engines._ome_tiff import read_ome_tiff
from livedecon.engines._psf_kernel import PSFError, prepare_psf
from livedecon.engines._raw_input import read_raw_image
from livedecon.engines._training import TrainingConfig, train

PSF_PLANES_3D = 9  # theoretical 3D PSF planes at the acquisition z step


CAMERA_SOURCES = ("auto", "config", "estimate")


@dataclass
class TrainingData:
    """Frames (Y, X) or stacks (Z, Y, X) in photoelectrons, where they came from, and the
    camera values that turned their counts into photoelectrons (None: the microscope's)."""

    images_e: list[np.ndarray]
    descriptions: list[str] = field(default_factory=list)
    camera: Camera | None = None
    noise: NoiseEstimate | None = None
    warnings: list[str] = field(default_factory=list)


def load_training_tiffs(
    paths: Sequence[Path],
    scope: MicroscopeConfig,
    is_3d: bool,
    camera_source: str = "config",
) -> TrainingData:
    """Camera counts from raw data (TIFF, OME-TIFF, NDTiff, OME-Zarr: engines/_raw_input.py) as
    photoelectrons: 2D takes every plane of every dataset as a frame; 3D takes (Z, Y, X)
    stacks, any leading axes (time, channel) as separate stacks.

    `camera_source`: "config" converts with the microscope's camera values; "estimate" with
    the noise the frames themselves show (calibration/_noise_estimate.py); "auto" with the
    microscope's, after checking them against the estimate (a disagreement is a warning)."""
    if camera_source not in CAMERA_SOURCES:
        raise ValueError(f"camera source must be one of {CAMERA_SOURCES}, got {camera_source!r}")
    counts_list, data = _read_counts(paths, scope, is_3d)
    camera = scope.camera
    if camera_source != "config":
        try:
            data.noise = estimate_noise(counts_list)
        except NoiseEstimateError as exc:
            if camera_source == "estimate":
                raise
            data.warnings.append(f"could not check the camera values against the data: {exc}")
    if data.noise is not None:
        problem = camera_disagreement(data.noise, scope.camera)
        if camera_source == "estimate":
            camera = data.noise.as_camera(scope.camera)
        elif problem:
            data.warnings.append(
                f"{problem}. Training with values that do not fit the noise fills the"
                " background with texture. Use --camera estimate to train with the frames' own"
                " noise, or calibrate the camera (livedecon calibrate)."
            )
    data.camera = camera
    for counts in counts_list:
        need = 3 if is_3d else 2
        electrons = counts_to_electrons(counts, camera).astype(np.float32)
        data.images_e.extend(electrons.reshape(-1, *electrons.shape[-need:]))
    return data


def _read_counts(
    paths: Sequence[Path], scope: MicroscopeConfig, is_3d: bool
) -> tuple[list[np.ndarray], TrainingData]:
    counts_list, data = [], TrainingData([])
    for path in map(Path, paths):
        image = read_raw_image(path, scope.optics.pixel_size_um, f"microscope {scope.name!r}")
        counts, axes = image.data, image.axes
        need = 3 if is_3d else 2
        if counts.ndim < need:
            kind = "a z-stack (Z, Y, X)" if is_3d else "a 2D image"
            raise ValueError(f"{path}: axes {axes!r} with shape {counts.shape} is not {kind}")
        counts_list.append(counts)
        data.descriptions.append(f"{path.resolve()} sha256:{sha256(path)} shape {counts.shape}")
    if not counts_list:
        raise ValueError("no training files given")
    return counts_list, data


def simulated_training_data(
    scope: MicroscopeConfig, frames: int, exposure_ms: float, interval_s: float = 10.0
) -> TrainingData:
    """Frames (or stacks, for a thick sample) from the simulator at the microscope config."""
    if scope.sample is None:
        raise ValueError(f"microscope {scope.name!r} has no [sample] section to simulate")
    model = ForwardModel(scope)
    images = []
    for i in range(frames):
        t = i * interval_s
        if scope.sample.depth_um > 0:
            counts = model.acquire_stack(t, model.planes_um, exposure_ms).counts
        else:
            counts = model.acquire(t, 0.0, exposure_ms).counts
        images.append(counts_to_electrons(counts, scope.camera).astype(np.float32))
    description = (
        f"simulated: microscope {scope.name!r}, {frames} timepoints every {interval_s} s,"
        f" exposure {exposure_ms} ms, sample seed {scope.sample.seed}"
    )
    return TrainingData(images, [description])


def training_psf(
    scope: MicroscopeConfig, is_3d: bool, psf_path: Path | None = None
) -> tuple[np.ndarray, PSFRecord]:
    """The PSF on the 2x output grid (3D: at the acquisition z step), with its provenance."""
    target = scope.optics.pixel_size_um / UPSAMPLING
    z_step = scope.optics.z_step_um
    dz = z_step if is_3d else None
    if psf_path is not None:
        try:
            image = read_ome_tiff(psf_path)
        except ValueError:
            raise PSFError(
                f"{psf_path}: the PSF's pixel size is unknown; save it as OME-TIFF with"
                " PhysicalSizeX (and PhysicalSizeZ for 3D)"
            ) from None
        if is_3d and image.data.ndim != 3:
            raise PSFError(f"{psf_path}: a 3D model needs a (Z, Y, X) PSF")
        raw = image.data if is_3d else _in_focus(image.data)
        if is_3d and (image.z_step_um is None or abs(image.z_step_um / z_step - 1) > 0.02):
            raise PSFError(f"{psf_path}: PSF z step {image.z_step_um} um is not the data's {dz} um")
        psf = prepare_psf(raw, image.pixel_size_um, target)
        record = PSFRecord(
            source="file",
            description=str(Path(psf_path).resolve()),
            source_sha256=sha256(Path(psf_path)),
            pixel_size_um=target,
            z_step_um=dz,
        )
        return psf, record
    o = scope.optics
    offsets = (np.arange(PSF_PLANES_3D) - PSF_PLANES_3D // 2) * z_step if is_3d else [0.0]
    stack = theoretical_psf(o, target, 63, offsets)
    psf = prepare_psf(stack if is_3d else stack[0], target, target)
    description = (
        f"theoretical {o.modality}: NA {o.na}, emission {o.emission_um} um, immersion"
        f" {o.immersion_ri}, sample {o.sample_ri}"
    )
    return psf, PSFRecord(
        source="theoretical", description=description, pixel_size_um=target, z_step_um=dz
    )


def _in_focus(psf: np.ndarray) -> np.ndarray:
    """The brightest plane of a PSF stack (a 2D PSF is returned as is)."""
    planes = psf.reshape(-1, *psf.shape[-2:])
    return planes[planes.max(axis=(1, 2)).argmax()]


def train_bundle(
    data: TrainingData,
    psf: np.ndarray,
    psf_record: PSFRecord,
    scope: MicroscopeConfig,
    config: TrainingConfig,
    name: str,
    work_dir: Path | None = None,
    show_progress: bool = True,
) -> ModelBundle:
    """Train on `data` and bundle the result with its normalisation and provenance."""
    camera = data.camera or scope.camera
    result = train(data.images_e, psf, config, work_dir, camera.read_noise_e, show_progress)
    history = result.history
    final = float(np.mean([h["total"] for h in history[-50:]])) if history else None
    training = TrainingRecord.now(
        data=data.descriptions,
        config=result.config or config,
        iterations=result.iterations_done,
        final_loss=final,
        interrupted=result.interrupted,
    )
    normalisation = Normalisation(
        scale_e=result.scale_e,
        camera_offset_adu=camera.offset_adu,
        camera_gain_e_per_adu=camera.gain_e_per_adu,
        read_noise_e=camera.read_noise_e,
    )
    return ModelBundle.from_model(
        result.model,
        name=name,
        input_pixel_um=scope.optics.pixel_size_um,
        z_step_um=scope.optics.z_step_um if config.is_3d else None,
        normalisation=normalisation,
        psf=psf,
        psf_record=psf_record,
        training=training,
        refine_iterations=config.refinement,
    )
