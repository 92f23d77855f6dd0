"""Per-frame fixed-pattern correction: camera maps, hot pixels and stripes.

Both steps are optional stages of the daemon's pipeline and keep frames in camera counts, so
the normalisation downstream (global offset and gain) applies unchanged:

- OffsetGainCorrection: counts of an ideal camera with the calibration's global offset and
  gain, ((counts - offset_map) / relative_gain + offset), hot pixels replaced by the median of
  their neighbours.
- StripeFilter / suppress_stripes: a notch on the spectrum's line that holds column (or row)
  stripes. The spectrum is the discrete cosine transform: the Fourier transform of the frame
  mirrored at its edges, so the frame's borders do not leak into the notched line as they
  would with a periodic FFT. Sizes are fractions of the frame's frequency axis, so the filter
  acts on the same scales in pixels at any frame size. The DC term is never changed: the
  frame's mean is preserved.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
from scipy.linalg.blas import sgemm

from livedecon.calibration._camera import CameraCalibration

MAX_HOT_RADIUS = 3  # a hot pixel with no good pixel this close keeps its corrected value


def _hot_neighbours(hot: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each hot pixel, the flat indices of the good pixels in the smallest square ring
    around it that has any: groups of (hot index, neighbour indices (H, K), count (H,)),
    neighbour rows padded with index 0."""
    ny, nx = hot.shape
    ys, xs = np.nonzero(hot)
    groups = []
    pending = np.ones(ys.size, dtype=bool)
    for radius in range(1, MAX_HOT_RADIUS + 1):
        if not pending.any():
            break
        dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        ring = (dy != 0) | (dx != 0)
        dy, dx = dy[ring], dx[ring]
        y = ys[pending, None] + dy[None, :]
        x = xs[pending, None] + dx[None, :]
        inside = (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
        y, x = np.clip(y, 0, ny - 1), np.clip(x, 0, nx - 1)
        valid = inside & ~hot[y, x]
        count = valid.sum(axis=1)
        found = count > 0
        if found.any():
            index = np.where(valid, y * nx + x, -1)[found]
            # valid neighbours first, so a row's first `count` entries are its neighbours
            order = np.argsort(index < 0, axis=1, kind="stable")
            index = np.take_along_axis(index, order, axis=1)
            which = np.flatnonzero(pending)[found]
            groups.append((ys[which] * nx + xs[which], np.maximum(index, 0), count[found]))
            pending[which] = False
    return groups


class OffsetGainCorrection:
    """Camera counts -> float32 counts of an ideal camera (global offset and gain).

    per_pixel_offset: subtract the offset map (default for sCMOS; a CCD's single amplifier
    has one offset, and its map would only add the estimate's noise). flat_field: divide by
    the relative gain map when the calibration has one. hot_pixels: replace them by the
    median of their good neighbours.
    """

    def __init__(
        self,
        calibration: CameraCalibration,
        *,
        per_pixel_offset: bool | None = None,
        flat_field: bool = True,
        hot_pixels: bool = True,
    ) -> None:
        summary = calibration.summary
        self.shape = tuple(summary.shape)
        if per_pixel_offset is None:
            per_pixel_offset = summary.kind == "scmos"
        gain = calibration.relative_gain if flat_field else None
        offset = calibration.offset_adu.astype(np.float64) if per_pixel_offset else None
        # counts * scale + shift, with both folded once here
        scale = None if gain is None else (1.0 / gain.astype(np.float64)).astype(np.float32)
        self._scale = scale
        if offset is None and gain is None:
            self._shift = None
        else:
            offset_map = offset if offset is not None else summary.offset_adu
            shift = summary.offset_adu - offset_map * (1.0 if scale is None else scale)
            self._shift = np.broadcast_to(shift, self.shape).astype(np.float32)
        self._groups = _hot_neighbours(calibration.hot_pixels) if hot_pixels else []

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """Correct a frame (Y, X) or a stack (..., Y, X); returns float32."""
        counts = np.asarray(counts)
        if counts.shape[-2:] != self.shape:
            raise ValueError(f"frame of {counts.shape[-2:]}, the calibration is {self.shape}")
        out = np.empty(counts.shape, dtype=np.float32)
        if self._scale is not None:
            np.multiply(counts, self._scale, out=out, casting="unsafe")
        else:
            out[...] = counts
        if self._shift is not None:
            out += self._shift
        if self._groups:
            flat = out.reshape(-1, self.shape[0] * self.shape[1])
            for where, index, count in self._groups:
                values = flat[:, index]  # (planes, H, K)
                padding = np.arange(index.shape[1]) >= count[:, None]
                values[:, padding] = np.inf  # sorted past the real neighbours
                values.sort(axis=-1)
                lower = np.take_along_axis(values, ((count - 1) // 2)[None, :, None], axis=-1)
                upper = np.take_along_axis(values, (count // 2)[None, :, None], axis=-1)
                flat[:, where] = 0.5 * (lower + upper)[..., 0]
        return out


@functools.cache
def _dct_band(n: int, rows: int) -> np.ndarray:
    """The first `rows` orthonormal DCT-II basis vectors of length n, (rows, n) float32."""
    k = np.arange(rows)[:, None]
    basis = np.cos(np.pi * k * (2 * np.arange(n)[None, :] + 1) / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.astype(np.float32)


class _LineNotch:
    """Attenuates DCT coefficients near frequency 0 along `axis` (the stripes' line), except
    near frequency 0 across it: gain 1 - strength * exp(-k^2 / 2 w^2) * (1 - exp(-q^2 / 2 r^2))
    with k along `axis` (Gaussian cut at 4 w) and q across; the gain at DC is exactly 1.

    Only the first few coefficients along `axis` change, so the filter is a low-rank update:
    project onto those DCT basis vectors, filter across, add back (two thin matrix products
    instead of a full 2D transform)."""

    def __init__(
        self, shape: tuple[int, int], axis: int, width: float, radius: float, strength: float
    ) -> None:
        along, across = shape[axis], shape[1 - axis]
        sigma = width * along  # in DCT bins
        rows = min(along, math.floor(4 * sigma) + 1)
        k = np.arange(rows)
        notch = np.exp(-0.5 * (k / sigma) ** 2) if sigma > 0 else (k == 0).astype(float)
        q = np.arange(across)
        r = radius * across
        spare = 1.0 - np.exp(-0.5 * (q / r) ** 2) if r > 0 else (q > 0).astype(float)
        spare[0] = 0.0  # the line's own DC: the frame mean (k = 0) is never changed
        self.axis = axis
        self.basis = _dct_band(along, rows)  # (rows, along): only these coefficients change
        gain_minus_one = -strength * notch[:, None] * spare[None, :]  # (rows, across)
        self.gain_minus_one = (gain_minus_one if axis == 0 else gain_minus_one.T).astype(np.float32)

    def __call__(self, plane: np.ndarray) -> None:
        """Filter one C-contiguous float32 plane (Y, X) in place."""
        if self.basis.shape[0] == 1:
            self._line_only(plane)
            return
        # plane.T is Fortran-ordered, so BLAS accumulates into it without a temporary
        if self.axis == 0:
            spectrum = scipy.fft.dct(self.basis @ plane, type=2, norm="ortho", axis=1)
            spectrum *= self.gain_minus_one
            change = scipy.fft.idct(spectrum, type=2, norm="ortho", axis=1)  # (rows, X)
            done = sgemm(1.0, change, self.basis, beta=1.0, c=plane.T, trans_a=1, overwrite_c=1)
        else:
            spectrum = scipy.fft.dct(plane @ self.basis.T, type=2, norm="ortho", axis=0)
            spectrum *= self.gain_minus_one
            change = scipy.fft.idct(spectrum, type=2, norm="ortho", axis=0)  # (Y, rows)
            done = sgemm(
                1.0, self.basis, change, beta=1.0, c=plane.T, trans_a=1, trans_b=1, overwrite_c=1
            )
        if not np.may_share_memory(done, plane):  # BLAS worked on a copy after all
            plane[...] = done.T

    def _line_only(self, plane: np.ndarray) -> None:
        """The line alone is the column (row) sums: a reduction and a broadcast add, no BLAS
        (whose threads stall for tens of ms when the cores are busy)."""
        c0 = float(self.basis[0, 0])  # the constant DCT basis vector, 1 / sqrt(n)
        coeffs = plane.sum(axis=self.axis, dtype=np.float64) * c0
        spectrum = scipy.fft.dct(coeffs, type=2, norm="ortho") * self.gain_minus_one.ravel()
        change = (scipy.fft.idct(spectrum, type=2, norm="ortho") * c0).astype(np.float32)
        plane += change[None, :] if self.axis == 0 else change[:, None]


class StripeFilter:
    """Column (and optionally row) stripe suppression for frames of one shape.

    notch_width: Gaussian sigma of the notch across the stripe line, as a fraction of the
        frame's frequency axis (0 to Nyquist). 0 (default): the line alone, stripes constant
        along their whole length, as a column amplifier's offset is within a frame; the
        fastest path (sums and a broadcast add). 0.002 = 0.001 cycles/px: stripes whose
        strength drifts along them over ~160 px (1 / 2 pi sigma) too; slower (matrix products
        with ~4 sigma rows: 17 at 2048 px).
    dc_radius: Gaussian sigma of the low frequencies spared along the line, same units.
        0.01: features of the column-mean profile wider than ~30 px are kept (shading,
        large structures); narrower ones, stripes, are removed.
    strength: 1 removes the notched line, less attenuates it.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        columns: bool = True,
        rows: bool = False,
        notch_width: float = 0.0,
        dc_radius: float = 0.01,
        strength: float = 1.0,
    ) -> None:
        if len(shape) != 2 or min(shape) < 2:
            raise ValueError(f"a frame shape (Y, X) of at least 2 x 2 is needed, got {shape}")
        if not (0 <= notch_width <= 0.5 and 0 <= dc_radius <= 0.5 and 0 <= strength <= 1):
            raise ValueError(
                "notch_width and dc_radius must be in [0, 0.5], strength in [0, 1]; got"
                f" {notch_width}, {dc_radius}, {strength}"
            )
        self.shape = (int(shape[0]), int(shape[1]))
        args = (notch_width, dc_radius, strength)
        # column stripes are constant along y: their energy is at ky ~ 0 (the line along x)
        self._notches = ([_LineNotch(self.shape, 0, *args)] if columns else []) + (
            [_LineNotch(self.shape, 1, *args)] if rows else []
        )

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Filter a frame (Y, X) or a stack (..., Y, X) plane by plane; returns float32."""
        frames = np.asarray(frames)
        if frames.shape[-2:] != self.shape:
            raise ValueError(f"frame of {frames.shape[-2:]}, the filter is for {self.shape}")
        out = np.array(frames, dtype=np.float32, copy=True, order="C")
        for plane in out.reshape(-1, *self.shape):
            for notch in self._notches:
                notch(plane)
        return out


def suppress_stripes(
    frames: np.ndarray,
    *,
    columns: bool = True,
    rows: bool = False,
    notch_width: float = 0.0,
    dc_radius: float = 0.01,
    strength: float = 1.0,
) -> np.ndarray:
    """One-off StripeFilter (see there) for a frame (Y, X) or stack (..., Y, X); float32."""
    frames = np.asarray(frames)
    stripe_filter = StripeFilter(
        frames.shape[-2:],
        columns=columns,
        rows=rows,
        notch_width=notch_width,
        dc_radius=dc_radius,
        strength=strength,
    )
    return stripe_filter(frames)
