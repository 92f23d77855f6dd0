"""Preparing a PSF for training: resampled to the network's output grid, odd, cropped, sum 1.

The PSF may come from theory (calibration computes it at any sampling) or from a TIFF of a
measured PSF; either way its pixel size must be known, or the deconvolution loss would blur
with the wrong width.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# A PSF sampled more than this much off the target grid is resampled; within it, used as is.
SAMPLING_TOLERANCE = 0.01


class PSFError(ValueError):
    """A PSF that cannot be used with the data it is meant for."""


def prepare_psf(
    psf: np.ndarray,
    psf_pixel_um: float | None,
    target_pixel_um: float,
    max_size_px: int = 31,
    energy_kept: float = 0.995,
) -> np.ndarray:
    """A 2D (Y, X) or 3D (Z, Y, X) PSF resampled laterally to `target_pixel_um`.

    The result is centred on its peak, cropped to the smallest odd size holding
    `energy_kept` of the light (at most `max_size_px`), non-negative, and sums to 1.
    """
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim not in (2, 3):
        raise PSFError(f"a PSF must be 2D or 3D, got shape {psf.shape}")
    if psf_pixel_um is None or not np.isfinite(psf_pixel_um) or psf_pixel_um <= 0:
        raise PSFError(
            "the PSF's pixel size is unknown: give it (for a TIFF, PhysicalSizeX in the OME "
            "metadata) so it can be matched to the data's sampling"
        )
    if not np.all(np.isfinite(psf)) or psf.max() <= 0:
        raise PSFError("the PSF has no positive finite values")
    ratio = psf_pixel_um / target_pixel_um
    if not 0.1 <= ratio <= 10:
        raise PSFError(
            f"PSF pixel {psf_pixel_um} um is inconsistent with the data's "
            f"{target_pixel_um} um grid (ratio {ratio:.3g}); check both pixel sizes"
        )
    psf = np.clip(psf - np.median(psf[..., 0, :]), 0, None)  # remove a flat background
    psf = _centre_on_peak(psf)
    if abs(ratio - 1) > SAMPLING_TOLERANCE:
        psf = _resample_lateral(psf, ratio)
    psf = _crop_to_energy(psf, energy_kept, max_size_px)
    return (psf / psf.sum()).astype(np.float32)


def _resample_lateral(psf: np.ndarray, ratio: float) -> np.ndarray:
    """Resample (Y, X) by `ratio` = old pixel / new pixel, keeping the centre pixel fixed."""
    ny, nx = psf.shape[-2:]
    half_y = int(((ny - 1) / 2) * ratio)
    half_x = int(((nx - 1) / 2) * ratio)
    ys = (ny - 1) / 2 + np.arange(-half_y, half_y + 1) / ratio
    xs = (nx - 1) / 2 + np.arange(-half_x, half_x + 1) / ratio
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    planes = psf.reshape(-1, ny, nx)
    out = np.stack(
        [
            ndimage.map_coordinates(plane, [grid_y, grid_x], order=3, mode="constant")
            for plane in planes
        ]
    )
    return np.clip(out.reshape(*psf.shape[:-2], *grid_y.shape), 0, None)


def _centre_on_peak(psf: np.ndarray) -> np.ndarray:
    """Shift (sub-pixel, by the centroid of the peak's neighbourhood) the peak to the centre."""
    lateral = psf.max(axis=0) if psf.ndim == 3 else psf
    py, px = np.unravel_index(np.argmax(lateral), lateral.shape)
    win = lateral[max(py - 2, 0) : py + 3, max(px - 2, 0) : px + 3]
    cy, cx = ndimage.center_of_mass(win)
    cy += max(py - 2, 0)
    cx += max(px - 2, 0)
    shift = [0.0] * psf.ndim
    shift[-2] = (lateral.shape[0] - 1) / 2 - cy
    shift[-1] = (lateral.shape[1] - 1) / 2 - cx
    return np.clip(ndimage.shift(psf, shift, order=3, mode="constant"), 0, None)


def _crop_to_energy(psf: np.ndarray, energy_kept: float, max_size_px: int) -> np.ndarray:
    ny, nx = psf.shape[-2:]
    full = min(ny, nx) | 1
    if full > min(ny, nx):
        full -= 2
    total = psf.sum()
    size = 1
    while size < min(full, max_size_px | 1):
        if _central(psf, size).sum() >= energy_kept * total:
            break
        size += 2
    return _central(psf, min(size, full, max_size_px | 1))


def _central(psf: np.ndarray, size: int) -> np.ndarray:
    ny, nx = psf.shape[-2:]
    y0, x0 = (ny - size) // 2, (nx - size) // 2
    return psf[..., y0 : y0 + size, x0 : x0 + size]
