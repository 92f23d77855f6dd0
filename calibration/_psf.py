"""Theoretical point-spread functions from the optics (psfmodels). The one PSF code path.

Every PSF here is float64, shaped (Z, N, N) with N odd, the emitter at the centre pixel, and
scaled so that the in-focus plane sums to 1: a defocused plane then carries the fraction of
the emitter's light that lands inside the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

import numpy as np
import psfmodels

from livedecon.calibration._config import Optics


class _PsfArgs(TypedDict):
    """The keyword arguments shared by psfmodels.make_psf and psfmodels.confocal_psf."""

    nx: int
    dxy: float
    NA: float
    ns: float
    ni: float
    ni0: float
    normalize: bool
    model: Literal["vectorial", "scalar", "gaussian"]


def theoretical_psf(
    optics: Optics,
    pixel_size_um: float,
    size_px: int,
    z_offsets_um: Sequence[float] | np.ndarray = (0.0,),
) -> np.ndarray:
    """PSF planes at the given focus offsets (focal plane minus emitter), in micrometres.

    `pixel_size_um` is the lateral sampling wanted (for example half the camera pixel for the
    2x output grid); `size_px` is rounded up to odd so the centre is a pixel.
    """
    if pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be positive, got {pixel_size_um}")
    size_px = int(size_px) | 1
    offsets = np.asarray(z_offsets_um, dtype=float).ravel()
    planes = np.concatenate([[0.0], offsets])  # in-focus plane first, for the normalisation
    common: _PsfArgs = {
        "nx": size_px,
        "dxy": pixel_size_um,
        "NA": optics.na,
        "ns": optics.sample_ri,
        "ni": optics.immersion_ri,
        "ni0": optics.immersion_ri,
        "normalize": False,
        "model": "vectorial",
    }
    if optics.modality == "confocal":
        if optics.excitation_um is None:
            raise ValueError("modality 'confocal' needs optics.excitation_um")
        stack = psfmodels.confocal_psf(
            planes.tolist(),
            pinhole_au=optics.pinhole_au,
            ex_wvl=optics.excitation_um,
            em_wvl=optics.emission_um,
            **common,
        )
    else:
        # TIRF restricts the excitation to a thin layer; detection is the widefield PSF.
        stack = psfmodels.make_psf(planes.tolist(), wvl=optics.emission_um, **common)
    stack = np.clip(np.asarray(stack, dtype=np.float64), 0.0, None)
    if optics.modality == "light-sheet":
        # A sheet in the focal plane lights an emitter at offset z by its Gaussian profile;
        # detection is widefield. (A real sheet thickens away from its waist: not modelled.)
        sigma = optics.sheet_fwhm_um / (2 * np.sqrt(2 * np.log(2)))
        stack *= np.exp(-0.5 * (planes / sigma) ** 2)[:, None, None]
    in_focus_sum = stack[0].sum()
    if not np.isfinite(in_focus_sum) or in_focus_sum <= 0:
        raise ValueError(f"PSF model returned an unusable result for {optics}")
    return stack[1:] / in_focus_sum


def fwhm_px(profile: np.ndarray) -> float:
    """Full width at half maximum of a 1D peak, with linear interpolation, in samples."""
    profile = np.asarray(profile, dtype=float)
    peak = int(np.argmax(profile))
    half = profile[peak] / 2.0
    left = peak
    while left > 0 and profile[left - 1] > half:
        left -= 1
    right = peak
    while right < profile.size - 1 and profile[right + 1] > half:
        right += 1
    if left == 0 or right == profile.size - 1:
        raise ValueError("peak does not fall below half maximum inside the profile")
    x_left = left - (profile[left] - half) / (profile[left] - profile[left - 1])
    x_right = right + (profile[right] - half) / (profile[right] - profile[right + 1])
    return float(x_right - x_left)
