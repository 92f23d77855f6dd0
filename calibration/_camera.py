"""Camera calibration from dark frames and evenly illuminated (flat) frames.

Darks give the per-pixel offset (their temporal mean), the read-noise variance (their
temporal variance) and the hot pixels (robust outliers of either). Flats at several light
levels give the photon transfer curve: the temporal variance above the read variance grows
as F^2 * signal / gain, where gain is photoelectrons per count and F^2 the excess noise factor
of an EM register (1 for sCMOS and CCD, ~2 for an EMCCD at high EM gain). Temporal, per-pixel
statistics leave the fixed pattern (offsets, photo-response) out of the noise; each frame's
common-mode shift (light-source flicker, offset jitter) is removed first.

For an EMCCD the result is referred to the register's input: gain_e_per_adu is photoelectrons
per count with the EM gain folded in, read noise is in input photoelectrons. The EM gain
itself is not measured, only its excess noise.

The global values (offset, gain, read noise) are what normalisation and training use; the
maps feed the per-frame fixed-pattern correction (calibration._fixed_pattern).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from pydantic import Field

from livedecon.calibration._config import Camera, excess_noise_factor_sq
from livedecon.engines._configfile import StrictModel

CameraKind = Literal["scmos", "ccd", "emccd"]
Progress = Callable[[str, int, int], None]  # (what, stacks done, stacks in all)

MIN_FRAMES = 2  # a temporal variance needs two frames
MIN_LEVELS = 2  # usable flat levels for a gain and a linearity check
SATURATED_FRACTION = 1e-3  # clipped samples above this bias a level's variance
MIN_PILE_UP = 10  # samples at one maximum below saturation before it counts as clipping
NONLINEAR_REL = 0.03  # a top level this far off the fit (and 5 sigma) is past the linear range
BLOCK_VALUES = 1 << 22  # float64 values converted at once: bounds memory for 2048^2 stacks


class CalibrationWarning(UserWarning):
    """Input that was used only in part (a level excluded), said also in the summary notes."""


class PTCPoint(StrictModel):
    """One flat level on the photon transfer curve (means over the pixels used)."""

    label: str
    frames: int
    signal_adu: float = Field(description="mean counts above the dark offset")
    variance_adu2: float = Field(description="temporal variance, read noise included")
    shot_variance_adu2: float = Field(description="temporal variance minus read variance")
    used: bool = Field(description="part of the gain fit")
    note: str = ""


class CameraSummary(StrictModel):
    """What a camera calibration measured: TOML-ready (dump with exclude_none=True)."""

    kind: CameraKind
    shape: tuple[int, int]
    dark_frames: int
    flat_frames: list[int]
    exposure_ms: float | None = Field(None, description="exposure of the darks")
    offset_adu: float = Field(description="median dark level")
    gain_e_per_adu: float = Field(description="photoelectrons per count (EM gain folded in)")
    gain_rel_error: float = Field(description="standard error of the gain from the fit, relative")
    read_noise_e: float = Field(description="sqrt(median read variance) x gain")
    read_noise_rms_e: float = Field(description="sqrt(mean read variance) x gain")
    excess_noise_factor_sq: float = Field(description="F^2 assumed in the fit")
    em_gain: float | None = None
    offset_spread_adu: float = Field(description="per-pixel offset rms, estimation noise removed")
    read_noise_spread: float = Field(description="log-normal sigma of per-pixel read noise")
    relative_gain_spread: float = Field(description="per-pixel gain rms, noise removed")
    relative_gain_noise: float = Field(description="estimation noise of the relative gain map")
    hot_pixels: int
    hot_pixel_threshold: float = Field(description="robust standard deviations")
    hot_pixel_e_per_s: float | None = Field(None, description="median hot-pixel dark current")
    ptc: list[PTCPoint]
    ptc_reduced_chi2: float | None = Field(None, description="None with a single level used")
    ptc_max_rel_residual: float
    notes: list[str] = Field(default_factory=list)


class CameraFiles(StrictModel):
    """Map files of a camera calibration, relative to its directory."""

    offset: str = "camera_offset_adu.tif"
    read_variance: str = "camera_read_variance_adu2.tif"
    hot_pixels: str = "camera_hot_pixels.tif"
    relative_gain: str | None = None


class CameraRecord(StrictModel):
    """A written camera calibration: its summary and the names of its map files."""

    summary: CameraSummary
    files: CameraFiles


@dataclass(frozen=True)
class CameraCalibration:
    """Per-pixel maps and global values of one camera.

    offset_adu: (Y, X) float32 mean dark counts (at the darks' exposure).
    read_variance_adu2: (Y, X) float32 temporal dark variance (quantisation included).
    hot_pixels: (Y, X) bool, pixels whose dark level or dark noise is an outlier.
    relative_gain: (Y, X) float32 photo-response, mean 1, or None where it could not be
        told from the noise of its estimate. Flats through the microscope put the
        illumination's unevenness into it as well.
    """

    offset_adu: np.ndarray
    read_variance_adu2: np.ndarray
    hot_pixels: np.ndarray
    relative_gain: np.ndarray | None
    summary: CameraSummary

    @property
    def read_noise_e_map(self) -> np.ndarray:
        """Per-pixel read noise in photoelectrons, float32."""
        return (np.sqrt(self.read_variance_adu2) * self.summary.gain_e_per_adu).astype(np.float32)

    def write(self, directory: str | Path) -> CameraRecord:
        """Save the maps as TIFFs (float32; hot pixels uint8) in `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = CameraFiles(
            relative_gain="camera_relative_gain.tif" if self.relative_gain is not None else None
        )
        tifffile.imwrite(directory / files.offset, self.offset_adu.astype(np.float32))
        tifffile.imwrite(
            directory / files.read_variance, self.read_variance_adu2.astype(np.float32)
        )
        tifffile.imwrite(directory / files.hot_pixels, self.hot_pixels.astype(np.uint8))
        if self.relative_gain is not None and files.relative_gain is not None:
            tifffile.imwrite(directory / files.relative_gain, self.relative_gain.astype(np.float32))
        return CameraRecord(summary=self.summary, files=files)

    @classmethod
    def read(cls, directory: str | Path, record: CameraRecord) -> CameraCalibration:
        """Load what `write` saved; the maps must have the recorded shape."""
        directory = Path(directory)
        shape = tuple(record.summary.shape)

        def load(name: str) -> np.ndarray:
            path = directory / name
            if not path.is_file():
                raise FileNotFoundError(f"camera calibration map {path} is missing")
            data = tifffile.imread(path)
            if data.shape != shape:
                raise ValueError(f"{path}: shape {data.shape}, the calibration says {shape}")
            return data

        files = record.files
        gain = None if files.relative_gain is None else load(files.relative_gain)
        return cls(
            offset_adu=load(files.offset).astype(np.float32),
            read_variance_adu2=load(files.read_variance).astype(np.float32),
            hot_pixels=load(files.hot_pixels).astype(bool),
            relative_gain=None if gain is None else gain.astype(np.float32),
            summary=record.summary,
        )

    def as_camera(self, base: Camera) -> Camera:
        """`base` with the measured global values: what training and inference use."""
        s = self.summary
        update: dict[str, object] = {
            "kind": s.kind,
            "offset_adu": s.offset_adu,
            "gain_e_per_adu": s.gain_e_per_adu,
            "read_noise_e": s.read_noise_e,
        }
        if s.kind != "scmos":  # one amplifier: no per-pixel simulator spreads
            update.update(offset_spread_adu=0.0, read_noise_spread=0.0, column_noise_adu=0.0)
        if s.kind != "emccd":
            update["em_gain"] = 1.0
        elif s.em_gain is not None:
            update["em_gain"] = s.em_gain
        return Camera.model_validate(base.model_dump() | update)


# -- statistics ---------------------------------------------------------------------------


def _check_stack(name: str, stack: np.ndarray) -> np.ndarray:
    stack = np.asarray(stack)
    if stack.dtype.kind not in "uif":
        raise ValueError(f"{name}: camera counts must be integers or floats, got {stack.dtype}")
    if stack.ndim != 3:
        raise ValueError(f"{name}: expected a stack of frames (N, Y, X), got shape {stack.shape}")
    if stack.shape[0] < MIN_FRAMES:
        raise ValueError(
            f"{name}: a temporal variance needs at least {MIN_FRAMES} frames, got {stack.shape[0]}"
        )
    if stack.shape[1] * stack.shape[2] < 64:
        raise ValueError(f"{name}: frames of {stack.shape[1:]} are too small for statistics")
    if stack.dtype.kind == "f" and not np.isfinite(stack).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return stack


def _temporal_stats(
    stack: np.ndarray, good: np.ndarray | None = None, clip_at: float = math.inf
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-pixel temporal mean and variance (float64, ddof 1) after removing each frame's
    common-mode shift, and the fraction of samples of `good` pixels at or above `clip_at`."""
    n, y, x = stack.shape
    frames = stack.reshape(n, y * x)
    frame_means = frames.mean(axis=1, dtype=np.float64)
    shift = (frame_means - frame_means.mean())[:, None]
    mean, var = np.empty(y * x), np.empty(y * x)
    good_flat = None if good is None else good.reshape(-1)
    clipped = 0
    step = max(1, BLOCK_VALUES // n)
    for start in range(0, y * x, step):
        part = slice(start, start + step)
        block = frames[:, part].astype(np.float64)
        if math.isfinite(clip_at):
            at_max = block >= clip_at
            clipped += int(
                np.count_nonzero(at_max if good_flat is None else at_max[:, good_flat[part]])
            )
        block -= shift
        mean[part] = block.mean(axis=0)
        var[part] = block.var(axis=0, ddof=1)
    used = y * x if good_flat is None else int(np.count_nonzero(good_flat))
    return mean.reshape(y, x), var.reshape(y, x), clipped / max(n * used, 1)


def _robust_sd(values: np.ndarray) -> float:
    """Standard deviation from the median absolute deviation (Gaussian-consistent)."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _median_chi2_factor(dof: int) -> float:
    """Median of chi2(dof)/dof (Wilson-Hilferty): the median of sample variances is this
    much below the variance."""
    return (1.0 - 2.0 / (9.0 * dof)) ** 3


def _find_hot_pixels(
    offset: np.ndarray, variance: np.ndarray, frames: int, threshold: float
) -> np.ndarray:
    """Upper outliers of the dark level or of the log dark variance, in robust standard
    deviations, never finer than the estimation noise (a CCD's maps are nearly uniform)."""
    level_floor = math.sqrt(float(np.median(variance)) / frames)
    level_scale = max(_robust_sd(offset), level_floor, 1e-6)
    log_var = np.log(np.maximum(variance, 1e-12))
    log_scale = max(_robust_sd(log_var), math.sqrt(2.0 / (frames - 1)))
    hot = (offset - np.median(offset)) > threshold * level_scale
    hot |= (log_var - np.median(log_var)) > threshold * log_scale
    return hot


@dataclass
class _Level:
    label: str
    frames: int
    mean: np.ndarray  # per-pixel temporal mean minus the offset map, float32
    signal: float
    total_var: float
    shot_var: float
    note: str = ""
    used: bool = True


def _fit_ptc(levels: list[_Level], pixels: int) -> tuple[float, float, float | None, float]:
    """Weighted least squares of shot variance = slope x signal (through the origin).

    Weights: the variance of a mean of `pixels` sample variances, 2 sigma^4 / ((N-1) pixels).
    Returns slope, its standard error, reduced chi^2 (None for one level) and the largest
    relative residual."""
    m = np.array([lv.signal for lv in levels])
    v = np.array([lv.shot_var for lv in levels])
    var_v = np.array([2 * lv.total_var**2 / ((lv.frames - 1) * pixels) for lv in levels])
    w = 1.0 / var_v
    slope = float(np.sum(w * m * v) / np.sum(w * m * m))
    se = float(1.0 / math.sqrt(np.sum(w * m * m)))
    resid = v - slope * m
    chi2 = float(np.sum(w * resid**2) / (len(levels) - 1)) if len(levels) > 1 else None
    return slope, se, chi2, float(np.max(np.abs(resid) / (slope * m)))


def _fit_linear_range(
    usable: list[_Level], pixels: int
) -> tuple[float, float, float | None, float]:
    """_fit_ptc, after leaving out top levels past the linear range (full-well roll-off):
    off the fit by more than NONLINEAR_REL and 5 standard errors. Marks them unused."""
    fit = _fit_ptc(usable, pixels)
    while len(usable) > MIN_LEVELS:
        lv, slope = usable[-1], fit[0]
        resid = lv.shot_var - slope * lv.signal
        sigma = math.sqrt(2 * lv.total_var**2 / ((lv.frames - 1) * pixels))
        if abs(resid) <= NONLINEAR_REL * slope * lv.signal or abs(resid) <= 5 * sigma:
            break
        lv.used = False
        lv.note = f"outside the linear range: variance {100 * resid / (slope * lv.signal):+.1f}%"
        usable.pop()
        fit = _fit_ptc(usable, pixels)
    return fit


def _photo_response(
    usable: list[_Level], hot: np.ndarray, offset_noise_var: float
) -> tuple[np.ndarray | None, float, float]:
    """Relative gain map (mean 1 over good pixels; hot pixels 1) from the signal summed over
    the levels used, so the brightest dominate; None when its estimation noise exceeds the
    spread it measures (a map noisier than the pattern would add noise). Also returns the
    spread (noise removed) and the noise, both relative."""
    good = ~hot
    sums = np.zeros(hot.shape)
    for lv in usable:
        sums += lv.mean
    total_signal = sum(lv.signal for lv in usable)
    relative = sums / total_signal
    noise_var = sum(lv.total_var / lv.frames for lv in usable)
    noise_var += len(usable) ** 2 * offset_noise_var  # every level shares the offset map
    noise = math.sqrt(noise_var) / total_signal
    spread = math.sqrt(max(float(relative[good].var()) - noise**2, 0.0))
    if spread <= noise:
        return None, spread, noise
    relative[hot] = 1.0
    return relative.astype(np.float32), spread, noise


def _saturation(stack: np.ndarray, given: float | None) -> float:
    if given is not None:
        return given
    if stack.dtype.kind in "ui":
        return float(np.iinfo(stack.dtype).max)
    return math.inf


# -- calibration --------------------------------------------------------------------------


def calibrate_camera(
    darks: np.ndarray,
    flats: Sequence[np.ndarray],
    *,
    kind: CameraKind = "scmos",
    exposure_ms: float | None = None,
    em_gain: float | None = None,
    saturation_adu: float | None = None,
    labels: Sequence[str] | None = None,
    hot_pixel_threshold: float = 6.0,
    progress: Progress | None = None,
) -> CameraCalibration:
    """Measure a camera from darks (N, Y, X) and flats, one (N, Y, X) stack per light level
    in increasing order of light, all in raw counts.

    kind: "scmos" (per-pixel offsets), "ccd" or "emccd" (one amplifier). em_gain: the EMCCD's
    multiplication, for its excess noise factor F^2 = 2 - 1/em_gain; None for an EMCCD means
    the high-gain limit F^2 = 2. exposure_ms: the darks' exposure, to give hot pixels' dark
    current in e-/s (the darks should match the flats' exposure where dark current matters).
    saturation_adu: the clipping level; default the integer dtype's maximum, and any level
    where many samples pile up at one maximum value counts as saturated too.
    Levels that are saturated, or past the linear range at the top, are left out of the fit,
    with a CalibrationWarning and a note in the summary. Raises ValueError for unusable input.
    """
    darks, flats, labels = _checked_inputs(darks, flats, kind, exposure_ms, em_gain, labels)
    total = len(flats) + 1
    if progress:
        progress("camera: darks", 0, total)
    dark = _dark_stats(darks, hot_pixel_threshold)
    if progress:
        progress("camera: darks", 1, total)
    levels: list[_Level] = []
    for i, (label, flat) in enumerate(zip(labels, flats, strict=True)):
        levels.append(_flat_level(label, flat, dark, saturation_adu))
        if progress:
            progress(f"camera: flat {label}", i + 2, total)
    usable = _usable_levels(levels)
    fit, notes = _fit_gain(usable, levels, dark.pixels, kind, em_gain)
    relative_gain, gain_spread, gain_noise = _photo_response(
        usable, dark.hot, dark.read_var_mean / dark.frames
    )
    if relative_gain is None:
        notes.append(
            f"photo-response spread ({100 * gain_spread:.2g}%) is below the noise of its"
            f" estimate ({100 * gain_noise:.2g}%): no relative gain map"
        )
    summary = _summary(
        kind,
        dark,
        levels,
        fit,
        em_gain=em_gain,
        exposure_ms=exposure_ms,
        hot_pixel_threshold=hot_pixel_threshold,
        relative_gain_spread=gain_spread,
        relative_gain_noise=gain_noise,
        notes=notes,
    )
    return CameraCalibration(
        offset_adu=dark.offset.astype(np.float32),
        read_variance_adu2=dark.read_var.astype(np.float32),
        hot_pixels=dark.hot,
        relative_gain=relative_gain,
        summary=summary,
    )


# -- the steps of calibrate_camera ----------------------------------------------------------


@dataclass(frozen=True)
class _Darks:
    """What the darks give: per-pixel maps and the read noise of the good (not hot) pixels."""

    frames: int
    offset: np.ndarray  # (Y, X) float64 temporal mean, ADU
    read_var: np.ndarray  # (Y, X) float64 temporal variance, ADU^2
    hot: np.ndarray  # (Y, X) bool
    good: np.ndarray  # ~hot
    pixels: int  # good pixels
    read_var_mean: float  # over the good pixels, ADU^2
    read_sigma: float  # sqrt of the median read variance of the good pixels, ADU


@dataclass(frozen=True)
class _Gain:
    """The photon transfer curve's fit (`_fit_ptc`) and the excess noise factor it assumes."""

    slope: float  # shot variance per unit signal, ADU
    se: float  # standard error of the slope
    chi2: float | None  # reduced chi^2, None for one level
    worst: float  # largest relative residual
    f2: float  # excess noise factor F^2

    @property
    def gain(self) -> float:
        """Photoelectrons per count (EM gain folded in)."""
        return self.f2 / self.slope


def _checked_inputs(
    darks: np.ndarray,
    flats: Sequence[np.ndarray],
    kind: str,
    exposure_ms: float | None,
    em_gain: float | None,
    labels: Sequence[str] | None,
) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Check the options and stacks: the darks, the flats and a label for each flat level."""
    if kind not in ("scmos", "ccd", "emccd"):
        raise ValueError(f"kind must be 'scmos', 'ccd' or 'emccd', got {kind!r}")
    if em_gain is not None and (kind != "emccd" or em_gain < 1):
        raise ValueError(f"em_gain ({em_gain}) applies to kind 'emccd' only and must be >= 1")
    if exposure_ms is not None and exposure_ms <= 0:
        raise ValueError(f"exposure_ms must be positive, got {exposure_ms}")
    darks = _check_stack("darks", darks)
    if len(flats) < MIN_LEVELS:
        raise ValueError(
            f"the photon transfer curve needs flats at {MIN_LEVELS} or more light levels,"
            f" got {len(flats)}"
        )
    labels = list(labels) if labels is not None else [f"level {i}" for i in range(len(flats))]
    if len(labels) != len(flats):
        raise ValueError(f"{len(labels)} labels for {len(flats)} flat levels")
    checked = [_check_stack(f"flat {label}", f) for label, f in zip(labels, flats, strict=True)]
    shape = darks.shape[1:]
    for label, flat in zip(labels, checked, strict=True):
        if flat.shape[1:] != shape:
            raise ValueError(
                f"flat {label}: frames of {flat.shape[1:]}, but the darks' frames are {shape}"
            )
    return darks, checked, labels


def _dark_stats(darks: np.ndarray, hot_pixel_threshold: float) -> _Darks:
    """Offset and read-variance maps from the darks, their hot pixels, and the read noise of
    the others."""
    offset, read_var, _ = _temporal_stats(darks)
    hot = _find_hot_pixels(offset, read_var, darks.shape[0], hot_pixel_threshold)
    good = ~hot
    return _Darks(
        frames=darks.shape[0],
        offset=offset,
        read_var=read_var,
        hot=hot,
        good=good,
        pixels=int(np.count_nonzero(good)),
        read_var_mean=float(read_var[good].mean()),
        read_sigma=math.sqrt(float(np.median(read_var[good]))),
    )


def _flat_level(label: str, flat: np.ndarray, dark: _Darks, saturation_adu: float | None) -> _Level:
    """One flat level's signal and variance over the good pixels, marked unused when it is
    saturated; an error when no light reached the camera."""
    # clipped at the saturation level, or piled up at a lower maximum (an ADC of fewer
    # bits than the dtype); in unclipped data the maximum is a rare tail value
    saturation, top = _saturation(flat, saturation_adu), float(flat.max())
    clip_at = min(saturation, top)
    mean, var, clipped = _temporal_stats(flat, dark.good, clip_at)
    piled_up = top < saturation and clipped * flat.shape[0] * dark.pixels > MIN_PILE_UP
    mean -= dark.offset
    signal = float(mean[dark.good].mean())
    total_var = float(var[dark.good].mean())
    level = _Level(
        label,
        flat.shape[0],
        mean.astype(np.float32),
        signal,
        total_var,
        total_var - dark.read_var_mean,
    )
    if clipped > SATURATED_FRACTION and (top >= saturation or piled_up):
        level.used = False
        level.note = f"saturated: {100 * clipped:.2g}% of samples at {clip_at:g} ADU"
    elif signal < dark.read_sigma:
        raise ValueError(
            f"flat {label}: mean signal {signal:.3g} ADU above the dark level is below the"
            f" read noise ({dark.read_sigma:.3g} ADU): no light reached the camera"
        )
    return level


def _usable_levels(levels: list[_Level]) -> list[_Level]:
    """The levels not saturated; an error when they are out of order of light, or too few
    for the photon transfer curve."""
    usable = [lv for lv in levels if lv.used]
    for before, after in pairwise(usable):
        if after.signal <= before.signal:
            raise ValueError(
                f"flat levels must be in increasing order of light: {after.label}"
                f" ({after.signal:.4g} ADU above the dark level) is not brighter than"
                f" {before.label} ({before.signal:.4g} ADU); order them, or check the light"
            )
    if len(usable) < MIN_LEVELS:
        reasons = "; ".join(f"{lv.label}: {lv.note}" for lv in levels if not lv.used)
        raise ValueError(
            f"only {len(usable)} of {len(levels)} flat levels are usable ({reasons}); the"
            f" photon transfer curve needs {MIN_LEVELS}: lower the light or the exposure"
        )
    return usable


def _fit_gain(
    usable: list[_Level], levels: list[_Level], pixels: int, kind: str, em_gain: float | None
) -> tuple[_Gain, list[str]]:
    """Fit the photon transfer curve over its linear range (top levels past it leave `usable`),
    and the excess noise factor of the camera kind; a warning and a note for each level left
    out of the fit, given before any error about the fit."""
    slope, se, chi2, worst = _fit_linear_range(usable, pixels)
    notes = []
    for lv in levels:
        if not lv.used:
            message = f"camera calibration: flat {lv.label} left out of the gain fit ({lv.note})"
            notes.append(message)
            # stacklevel 3: attributed to the caller of calibrate_camera, not to this step
            warnings.warn(message, CalibrationWarning, stacklevel=3)
    if slope <= 0:
        raise ValueError("the flats' temporal variance does not grow with the signal")
    f2 = (
        excess_noise_factor_sq(em_gain if em_gain is not None else math.inf)
        if kind == "emccd"
        else 1.0
    )
    return _Gain(slope, se, chi2, worst, f2), notes


def _pattern_spreads(dark: _Darks) -> tuple[float, float, float]:
    """Median read variance (ADU^2, unbiased), log-normal spread of the per-pixel read noise,
    and per-pixel offset rms (ADU), each with its estimation noise removed."""
    good, dof = dark.good, dark.frames - 1
    read_median = float(np.median(dark.read_var[good])) / _median_chi2_factor(dof)
    log_sd = _robust_sd(0.5 * np.log(np.maximum(dark.read_var[good], 1e-12)))
    read_spread = math.sqrt(max(log_sd**2 - 1.0 / (2 * dof), 0.0))
    offset_spread = math.sqrt(
        max(_robust_sd(dark.offset[good]) ** 2 - dark.read_var_mean / dark.frames, 0)
    )
    return read_median, read_spread, offset_spread


def _hot_pixel_current(
    dark: _Darks, offset_global: float, gain: float, exposure_ms: float | None
) -> float | None:
    """Median dark current of the hot pixels in e-/s; None without them or the exposure."""
    if exposure_ms is None or not dark.hot.any():
        return None
    excess = (dark.offset[dark.hot] - offset_global) * gain / (exposure_ms / 1000.0)
    return float(np.median(excess))


def _summary(
    kind: CameraKind,
    dark: _Darks,
    levels: list[_Level],
    fit: _Gain,
    *,
    em_gain: float | None,
    exposure_ms: float | None,
    hot_pixel_threshold: float,
    relative_gain_spread: float,
    relative_gain_noise: float,
    notes: list[str],
) -> CameraSummary:
    """The global values, the fixed pattern's size, the hot pixels and the photon transfer
    curve, as recorded."""
    read_median, read_spread, offset_spread = _pattern_spreads(dark)
    offset_global = float(np.median(dark.offset[dark.good]))
    gain = fit.gain
    return CameraSummary(
        kind=kind,
        shape=(int(dark.offset.shape[0]), int(dark.offset.shape[1])),
        dark_frames=dark.frames,
        flat_frames=[lv.frames for lv in levels],
        exposure_ms=exposure_ms,
        offset_adu=offset_global,
        gain_e_per_adu=gain,
        gain_rel_error=fit.se / fit.slope,
        read_noise_e=math.sqrt(read_median) * gain,
        read_noise_rms_e=math.sqrt(dark.read_var_mean) * gain,
        excess_noise_factor_sq=fit.f2,
        em_gain=em_gain,
        offset_spread_adu=offset_spread,
        read_noise_spread=read_spread,
        relative_gain_spread=relative_gain_spread,
        relative_gain_noise=relative_gain_noise,
        hot_pixels=int(np.count_nonzero(dark.hot)),
        hot_pixel_threshold=hot_pixel_threshold,
        hot_pixel_e_per_s=_hot_pixel_current(dark, offset_global, gain, exposure_ms),
        ptc=[
            PTCPoint(
                label=lv.label,
                frames=lv.frames,
                signal_adu=lv.signal,
                variance_adu2=lv.total_var,
                shot_variance_adu2=lv.shot_var,
                used=lv.used,
                note=lv.note,
            )
            for lv in levels
        ],
        ptc_reduced_chi2=fit.chi2,
        ptc_max_rel_residual=fit.worst,
        notes=notes,
    )
