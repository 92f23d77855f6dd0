"""A calibration run: camera, PSF and first model from raw data, written as a calibration bundle.

The steps, each reported to `progress(step, done, total)`:
1. camera: offset, read-noise and gain maps, hot pixels, gain from the photon transfer curve;
2. PSF: the theoretical one from the optics, and the measured one from beads when recorded;
3. first model: trained zero-shot on the sample frames (corrected with the measured camera,
   deconvolved with the chosen PSF), exported and accuracy-checked for the best backend here;
4. the calibration bundle (calibration.toml + TIFFs + model/) and the HTML report.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from livedecon.calibration._beads import (
    MeasuredPSF,
    measure_psf,
    pixel_integrated_psf,
    psf_fwhm_um,
    write_measured_psf,
)
from livedecon.calibration._calibration_bundle import (
    CalibrationBundle,
    CalibrationRecord,
    CorrectionDefaults,
    ModelSummary,
    PSFSummary,
)
from livedecon.calibration._camera import CameraCalibration, calibrate_camera
from livedecon.calibration._config import MicroscopeConfig
from livedecon.calibration._first_model import TrainingData, train_bundle, training_psf
from livedecon.calibration._fixed_pattern import OffsetGainCorrection, StripeFilter
from livedecon.calibration._forward_model import UPSAMPLING, counts_to_electrons
from livedecon.calibration._inputs import CalibrationInputs, CaptureSettings
from livedecon.calibration._metrics import decorrelation_resolution
from livedecon.calibration._report import PSFPlot, PTCPlot, ReportData, write_report
from livedecon.configs import shipped_config_path
from livedecon.engines._configfile import StrictModel, load_config
from livedecon.engines._enums import Backend
from livedecon.engines._ome_tiff import write_ome_tiff
from livedecon.engines._training import TrainingConfig

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
PSF_WINDOW_UM = 2.0  # lateral extent of the saved theoretical PSF


class CalibrationSettings(StrictModel):
    """What a calibration run produces and how: its name, PSF source and training recipe."""

    name: str = "calibration"
    psf: Literal["auto", "measured", "theoretical"] = Field(
        "auto", description="PSF for the model; auto: measured when beads were recorded"
    )
    training: TrainingConfig = Field(
        default_factory=lambda: load_config(
            shipped_config_path("training_fast2d_sim.toml"), TrainingConfig
        ),
        description="first model's training; default: the fast 2D network, CPU-friendly",
    )
    backend: Backend = Field(Backend.AUTO, description="engine to export the first model for")
    stripes: bool = Field(False, description="turn on stripe suppression in the daemon")
    capture: CaptureSettings = CaptureSettings()


class CalibrationError(ValueError):
    """The inputs cannot give a calibration (the message says which and why)."""


def _camera_step(inputs: CalibrationInputs, scope: MicroscopeConfig) -> CameraCalibration:
    # the photon transfer curve wants its levels in increasing order of light
    order = np.argsort([float(np.mean(flat)) for flat in inputs.flats])
    try:
        return calibrate_camera(
            inputs.darks,
            [inputs.flats[i] for i in order],
            kind=scope.camera.kind,
            exposure_ms=inputs.dark_exposure_ms,
            em_gain=scope.camera.em_gain if scope.camera.kind == "emccd" else None,
            labels=[inputs.flat_labels[i] for i in order],
        )
    except ValueError as exc:
        raise CalibrationError(f"camera: {exc}") from None


def _theory(scope: MicroscopeConfig, planes: int, z_step_um: float | None) -> np.ndarray:
    """The theoretical PSF as the camera records a bead (pixel-integrated), (Z, Y, X), the
    in-focus plane summing to 1."""
    pixel = scope.optics.pixel_size_um
    offsets = (np.arange(planes) - planes // 2) * (z_step_um or 0.0)
    psf = pixel_integrated_psf(scope.optics, pixel, int(np.ceil(PSF_WINDOW_UM / pixel)), offsets)
    return psf / psf[planes // 2].sum()


def _psf_step(
    inputs: CalibrationInputs,
    scope: MicroscopeConfig,
    correct: Callable[[np.ndarray], np.ndarray],
    settings: CalibrationSettings,
    out: Path,
    notes: list[str],
) -> tuple[PSFSummary, MeasuredPSF | None, np.ndarray]:
    planes = inputs.beads.shape[0] if inputs.beads is not None and inputs.beads.ndim == 3 else 1
    theory = _theory(scope, planes, inputs.bead_z_step_um)
    theory_path = write_ome_tiff(
        out / "psf_theoretical.ome.tif",
        theory.astype(np.float32),
        "ZYX",
        scope.optics.pixel_size_um,
        z_step_um=inputs.bead_z_step_um,
        description=f"theoretical {scope.optics.modality} PSF, pixel-integrated",
    )
    measured = None
    if inputs.beads is not None and settings.psf != "theoretical":
        # linear photoelectrons with the offset removed, as measure_psf expects
        beads_e = counts_to_electrons(correct(inputs.beads), scope.camera)
        try:
            measured = measure_psf(
                beads_e,
                scope.optics.pixel_size_um,
                inputs.bead_z_step_um if planes > 1 else None,
                optics=scope.optics,
            )
        except ValueError as exc:
            if settings.psf == "measured":
                raise CalibrationError(f"PSF from beads: {exc}") from None
            notes.append(f"No PSF from the beads ({exc}); the model uses the theoretical PSF.")
    elif settings.psf == "measured":
        raise CalibrationError("psf = 'measured' needs a bead recording")
    fx, fy, fz = psf_fwhm_um(theory, scope.optics.pixel_size_um, inputs.bead_z_step_um)
    summary = PSFSummary(
        source="measured" if measured else "theoretical",
        theoretical_file=theory_path.name,
        theory_fwhm_um={"x": fx, "y": fy} | ({"z": fz} if fz else {}),
    )
    if measured is not None:
        path = write_measured_psf(out / "psf_measured.ome.tif", measured)
        mx, my, mz = measured.fwhm_um
        summary = summary.model_copy(
            update={
                "measured_file": path.name,
                "beads_used": measured.beads_used,
                "beads_rejected": dict(measured.rejected),
                "fwhm_um": {"x": mx, "y": my} | ({"z": mz} if mz else {}),
            }
        )
        wider = mx / fx - 1
        if abs(wider) > 0.25:
            notes.append(
                f"The measured PSF is {wider:+.0%} wider laterally than theory: check the"
                " objective, immersion, coverslip and beads (size, aggregation)."
            )
    return summary, measured, theory


def run_calibration(
    inputs: CalibrationInputs,
    scope: MicroscopeConfig,
    out: Path,
    settings: CalibrationSettings | None = None,
    progress: Progress = lambda *_: None,
    overwrite: bool = False,
) -> CalibrationBundle:
    """Measure the camera and PSF, train the first model, write the bundle and the report."""
    settings = settings or CalibrationSettings()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CalibrationError(f"{out}: exists and is not empty (overwrite to replace it)")
    if abs(inputs.pixel_size_um / scope.optics.pixel_size_um - 1) > 0.02:
        raise CalibrationError(
            f"the data's pixel size {inputs.pixel_size_um} um is not the microscope config's"
            f" {scope.optics.pixel_size_um} um"
        )
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    progress("camera: offset, noise maps, photon transfer curve", 0, 1)
    camera = _camera_step(inputs, scope)
    measured_scope = scope.model_copy(update={"camera": camera.as_camera(scope.camera)})
    offset_gain = OffsetGainCorrection(camera)
    stripes = StripeFilter(inputs.darks.shape[1:])
    camera_record = camera.write(out / "camera")
    progress("camera: offset, noise maps, photon transfer curve", 1, 1)

    progress("PSF", 0, 1)
    psf_summary, measured, theory = _psf_step(
        inputs, measured_scope, offset_gain, settings, out, notes
    )
    progress("PSF", 1, 1)

    model_summary: ModelSummary | None = None
    crops: list[tuple[str, np.ndarray]] = []
    metrics: dict[str, float] = {}
    if inputs.samples:
        model_summary, crops, metrics = _model_step(
            inputs, measured_scope, offset_gain, psf_summary, out, settings, progress
        )
    else:
        notes.append("No sample frames were recorded: no model was trained.")

    record = CalibrationRecord(
        created=CalibrationRecord.now(),
        microscope=measured_scope.model_copy(update={"sample": None}),
        camera=camera_record,
        psf=psf_summary,
        model=model_summary,
        correction=CorrectionDefaults(stripes=settings.stripes),
        metrics=metrics,
        inputs=inputs.sources,
    )
    bundle = CalibrationBundle(out, record, camera)
    bundle.save_record()
    progress("report", 0, 1)
    _report(bundle, inputs, measured, theory, stripes, crops, notes)
    progress("report", 1, 1)
    return bundle


def _model_step(
    inputs: CalibrationInputs,
    scope: MicroscopeConfig,
    correct: Callable[[np.ndarray], np.ndarray],
    psf_summary: PSFSummary,
    out: Path,
    settings: CalibrationSettings,
    progress: Progress,
) -> tuple[ModelSummary, list[tuple[str, np.ndarray]], dict[str, float]]:
    from livedecon.engines._backends import open_runtime
    from livedecon.engines._tiling import restore_electrons

    if settings.training.is_3d:
        raise CalibrationError("the first model of a calibration run is a 2D model")
    frames = [counts_to_electrons(correct(s), scope.camera) for s in inputs.samples]
    data = TrainingData(frames, [f"calibration sample frames: {len(frames)}", *inputs.sources])
    psf_path = out / psf_summary.measured_file if psf_summary.measured_file else None
    kernel, psf_record = training_psf(scope, False, psf_path)

    progress("first model: training", 0, settings.training.iterations)
    started = time.perf_counter()
    work = out / ".model.training"
    bundle = train_bundle(data, kernel, psf_record, scope, settings.training, settings.name, work)
    training_s = time.perf_counter() - started
    model_dir = bundle.save(out / "model", overwrite=True)
    shutil.rmtree(work, ignore_errors=True)

    progress("first model: export and accuracy gate", 0, 1)
    shape = inputs.samples[0].shape
    runtime, choice = open_runtime(bundle, model_dir, settings.backend, frame_shapes=[shape])
    progress("first model: export and accuracy gate", 1, 1)

    norm = bundle.manifest.normalisation
    raw_e = frames[-1]
    restored = restore_electrons(runtime.infer, raw_e, norm.scale_e, runtime.multiple, 2)
    pixel = scope.optics.pixel_size_um
    metrics = {
        "resolution_raw_um": decorrelation_resolution(raw_e, pixel),
        "resolution_restored_um": decorrelation_resolution(restored, pixel / UPSAMPLING),
        "background_noise_raw_e": _background_noise(raw_e),
        # on the raw grid (2x2 sums), so both are photoelectrons per camera pixel
        "background_noise_restored_e": _background_noise(_bin2(restored)),
    }
    crop = min(128, *raw_e.shape)
    crops = [
        (f"raw ({pixel * 1000:.0f} nm pixels)", raw_e[:crop, :crop]),
        (f"restored ({pixel * 500:.1f} nm pixels)", restored[: 2 * crop, : 2 * crop]),
    ]
    summary = ModelSummary(
        bundle_id=bundle.bundle_id,
        network=bundle.manifest.network.kind,
        iterations=bundle.manifest.training.iterations,
        training_s=round(training_s, 1),
        backend=choice.backend,
        gate_db=choice.gate_db,
    )
    return summary, crops, metrics


def _bin2(image: np.ndarray) -> np.ndarray:
    y, x = image.shape[0] // 2, image.shape[1] // 2
    return image[: 2 * y, : 2 * x].reshape(y, 2, x, 2).sum(axis=(1, 3))


def _background_noise(image: np.ndarray) -> float:
    """Noise in the darkest tenth of the frame: the spread of the background left over."""
    flat = np.sort(np.asarray(image, dtype=np.float64).ravel())
    return float(flat[: max(flat.size // 10, 16)].std())


def _metric_text(value: float) -> str:
    # decorrelation analysis gives inf when it finds no signal above the noise
    return f"{value:.4g}" if np.isfinite(value) else "not measurable (no signal above noise)"


def _report(
    bundle: CalibrationBundle,
    inputs: CalibrationInputs,
    measured: MeasuredPSF | None,
    theory: np.ndarray,
    stripes: StripeFilter,
    crops: list[tuple[str, np.ndarray]],
    notes: list[str],
) -> Path:
    record, camera = bundle.record, bundle.camera
    cam = record.microscope.camera
    points = camera.summary.ptc
    read_variance = float(np.median(camera.read_variance_adu2))
    summary = [
        ("microscope", record.microscope.name),
        ("camera", f"{cam.kind}, {cam.width_px} x {cam.height_px}"),
        ("gain", f"{cam.gain_e_per_adu:.4g} e-/ADU"),
        ("offset", f"{cam.offset_adu:.2f} ADU"),
        ("read noise", f"{cam.read_noise_e:.3g} e- rms"),
        ("hot pixels", str(int(camera.hot_pixels.sum()))),
    ]
    psf_plot = None
    if record.psf:
        p = record.psf
        for axis in ("x", "y", "z"):
            if axis in p.theory_fwhm_um:
                measured_text = f"{p.fwhm_um[axis]:.3f} um" if axis in p.fwhm_um else "-"
                summary.append(
                    (
                        f"PSF FWHM {axis}",
                        f"{measured_text} (theory {p.theory_fwhm_um[axis]:.3f} um)",
                    )
                )
        summary.append(("PSF used by the model", p.source))
        if measured is not None:
            summary.append(("beads used", f"{p.beads_used} (rejected: {p.beads_rejected or 0})"))
            as_3d = lambda a: a if a.ndim == 3 else a[None]  # noqa: E731
            psf_plot = PSFPlot(
                as_3d(measured.psf),
                as_3d(measured.theory_psf if measured.theory_psf is not None else theory),
                measured.pixel_size_um,
                measured.z_step_um,
            )
    if record.model:
        m = record.model
        summary.append(
            ("first model", f"{m.bundle_id} ({m.network}, {m.iterations} iterations,"
             f" {m.training_s:.0f} s), {m.backend}, gate {m.gate_db or 0:.1f} dB")
        )  # fmt: skip
    mean_dark = inputs.darks.mean(axis=0)
    data = ReportData(
        title=f"Calibration: {record.microscope.name} ({record.created})",
        summary=summary,
        ptc=PTCPlot(
            mean_adu=np.array([p.signal_adu for p in points]),
            variance_adu2=np.array([p.variance_adu2 for p in points]),
            used=np.array([p.used for p in points]),
            slope=camera.summary.excess_noise_factor_sq / cam.gain_e_per_adu,
            intercept=read_variance,
        ),
        offset_map=camera.offset_adu,
        read_noise_map_e=camera.read_noise_e_map,
        hot_pixels=camera.hot_pixels,
        psf=psf_plot,
        stripe_profiles=(mean_dark.mean(axis=0), stripes(mean_dark).mean(axis=0)),
        crops=crops,
        metrics=[(k.replace("_", " "), _metric_text(v)) for k, v in record.metrics.items()],
        notes=notes,
    )
    return write_report(bundle.directory, data)
