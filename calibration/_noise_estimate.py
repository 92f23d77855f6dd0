"""The camera's Poisson-Gaussian noise, estimated from the frames themselves.

A camera frame in counts y has variance  var(y) = a * (E[y] - black) + s^2:  a = 1 / gain
(times the excess noise factor F^2 of an EMCCD), `black` the level where no signal is, s the
noise there (read noise, and the shot noise of a flat background). Training needs exactly these
to make recorrupted pairs, and a frame shows them: in its smooth regions a high-pass residual is
pure noise, so binning pixels by local mean and taking a robust variance per bin traces the line
var = a * mean + b (single-image noise estimation in the manner of Foi et al., IEEE TIP 2008).

The black level cannot be told apart from a flat background by noise statistics: it is taken as
a low percentile of the smoothed frame, so the estimate describes the camera and background
together, which is what training on these frames needs.

With EMCCD excess noise the "gain" is the effective gain / F^2: photoelectrons then come out
F^2 too few, but their noise is Poisson-like again, which is what the self-supervised pairs need.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from pydantic import Field
from scipy import ndimage

from livedecon.calibration._config import Camera
from livedecon.engines._configfile import StrictModel

# Immerkaer's kernel: the product of two second differences, blind to any plane and to most of
# a smooth image's curvature; white noise of variance v gives a residual of variance 36 v.
_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
_KERNEL_GAIN = 36.0
MEAN_WINDOW = 7
BINS = 24
MIN_PER_BIN = 200
DITHER_VARIANCE = 1 / 12  # count^2 of the uniform dither integer frames get
DISAGREEMENT = 1.5  # given camera values this many times off the estimate are flagged


class NoiseEstimate(StrictModel):
    """What the frames say about their own noise, in their own counts."""

    gain_e_per_adu: float = Field(gt=0, description="photoelectrons per count (EMCCD: / F^2)")
    black_level_adu: float = Field(description="counts where there is no signal")
    noise_at_black_e: float = Field(
        ge=0, description="rms noise at the black level, photoelectrons (read + background)"
    )
    pixels_used: int = Field(ge=0)
    bins_used: int = Field(ge=0)
    fit_residual: float = Field(ge=0, description="rms relative misfit of the variance line")

    def as_camera(self, like: Camera | None = None) -> Camera:
        """A camera with these values (the rest from `like`), for converting and training."""
        base = like or Camera()
        return base.model_copy(
            update={
                "offset_adu": max(self.black_level_adu, 0.0),
                "gain_e_per_adu": self.gain_e_per_adu,
                "read_noise_e": self.noise_at_black_e,
            }
        )

    def describe(self) -> str:
        return (
            f"gain {self.gain_e_per_adu:.4g} e-/ADU, black level {self.black_level_adu:.4g} ADU,"
            f" noise there {self.noise_at_black_e:.3g} e- rms ({self.pixels_used:,} pixels,"
            f" {self.bins_used} levels, misfit {100 * self.fit_residual:.0f}%)"
        )


class NoiseEstimateError(ValueError):
    """The frames do not show enough smooth area at enough levels to estimate their noise."""


def _is_counts(frame: np.ndarray) -> bool:
    return bool(np.array_equal(frame, np.round(frame)))


def _level_statistics(frame: np.ndarray, dither: bool) -> tuple[np.ndarray, np.ndarray]:
    """(local mean, high-pass residual) of the interior pixels.

    With `dither` (integer counts) uniform noise of one count's width is added first: where
    the noise spans only a few counts the residuals take few values and their median absolute
    deviation moves in whole steps, blind to the shot noise. Dither adds 1/12 count^2 at every
    level, which the fitted line's constant absorbs; it leaves the slope, the gain, alone."""
    frame = np.asarray(frame, dtype=np.float64)
    if dither:
        frame = frame + np.random.default_rng(0).uniform(-0.5, 0.5, frame.shape)
    mean = ndimage.uniform_filter(frame, MEAN_WINDOW, mode="reflect")
    residual = ndimage.correlate(frame, _KERNEL, mode="reflect")
    m = MEAN_WINDOW // 2 + 1
    inner = (slice(m, -m), slice(m, -m))
    return mean[inner].ravel(), residual[inner].ravel()


def estimate_noise(frames: Sequence[np.ndarray], black_percentile: float = 2.0) -> NoiseEstimate:
    """Fit var = a * mean + b to robust per-level variances of 2D frames (or stack planes)."""
    planes = [p for f in frames for p in np.asarray(f).reshape(-1, *np.shape(f)[-2:])]
    if not planes or min(planes[0].shape) < 4 * MEAN_WINDOW:
        raise NoiseEstimateError("need frames of at least 28 x 28 pixels to estimate noise")
    dithered = [_is_counts(p) for p in planes]
    stats = [_level_statistics(p, d) for p, d in zip(planes, dithered, strict=True)]
    means = np.concatenate([s[0] for s in stats])
    residuals = np.concatenate([s[1] for s in stats])
    edges = np.unique(np.quantile(means, np.linspace(0.0, 0.995, BINS + 1)))
    levels, variances, counts = [], [], []
    for lo, hi in itertools.pairwise(edges):
        chosen = residuals[(means >= lo) & (means < hi)]
        if chosen.size < MIN_PER_BIN:
            continue
        # MAD of a zero-mean residual: robust to structure that the kernel lets through
        sigma = 1.4826 * np.median(np.abs(chosen - np.median(chosen)))
        levels.append(float(np.median(means[(means >= lo) & (means < hi)])))
        variances.append(sigma**2 / _KERNEL_GAIN)
        counts.append(chosen.size)
    if len(levels) < 3 or np.ptp(levels) <= 0:
        raise NoiseEstimateError(
            "the frames hold too few distinct signal levels to separate shot noise from read"
            " noise; give the camera's gain and offset (or calibrate it)"
        )
    a, b = _robust_line(np.array(levels), np.array(variances), np.array(counts, float))
    b -= DITHER_VARIANCE * float(np.mean(dithered))  # the dither's own share
    floor = a * min(levels) + b
    # shot noise must show: the variance grows by a quarter at least over the levels seen
    if a <= 0 or a * np.ptp(levels) < 0.25 * max(floor, 1e-12):
        raise NoiseEstimateError(
            "no shot noise found: the noise does not grow with the signal (are these frames"
            " camera counts, not processed images?)"
        )
    gain = 1.0 / a
    black = float(np.percentile(np.concatenate([s[0] for s in stats]), black_percentile))
    noise_var_counts = max(a * black + b, 0.0)
    fitted = a * np.array(levels) + b
    misfit = float(np.sqrt(np.mean(((np.array(variances) - fitted) / fitted) ** 2)))
    return NoiseEstimate(
        gain_e_per_adu=gain,
        black_level_adu=black,
        noise_at_black_e=float(np.sqrt(noise_var_counts) * gain),
        pixels_used=int(sum(counts)),
        bins_used=len(levels),
        fit_residual=misfit,
    )


def _robust_line(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Weighted least squares with a few rounds of down-weighting bins far off the line (bins
    dominated by structure the kernel let through lie above it)."""
    w = weights.copy()
    a = b = 0.0
    for _ in range(5):
        design = np.stack([x, np.ones_like(x)], axis=1) * np.sqrt(w)[:, None]
        (a, b), *_ = np.linalg.lstsq(design, y * np.sqrt(w), rcond=None)
        relative = np.abs(y - (a * x + b)) / np.maximum(np.abs(a * x + b), 1e-12)
        scale = max(float(np.median(relative)), 1e-3)
        w = weights / (1.0 + (relative / (3 * scale)) ** 2)
    return float(a), float(b)


def camera_disagreement(estimate: NoiseEstimate, camera: Camera) -> str | None:
    """A sentence when the given camera's noise model is off the frames' own by more than
    DISAGREEMENT in gain or in the variance it predicts at the black level; else None."""
    ratio = camera.gain_e_per_adu / estimate.gain_e_per_adu
    if max(ratio, 1 / ratio) > DISAGREEMENT:
        return (
            f"the given camera gain {camera.gain_e_per_adu:.4g} e-/ADU is {ratio:.3g}x the"
            f" {estimate.gain_e_per_adu:.4g} e-/ADU the frames' own noise shows (were they"
            " scaled, binned or processed? is it an EMCCD with excess noise?)"
        )
    return None
