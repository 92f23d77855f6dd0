"""The PSF measured from a recording of sub-resolution beads, beside the theoretical one.

Input: a focus series (Z, Y, X) through a bead slide, or one in-focus frame (Y, X) for a 2D
(TIRF-like) PSF, in linear intensity units with the camera offset removed (photoelectrons,
or offset-corrected counts). A background (autofluorescence, stray light, residual offset)
is allowed: it is measured around each bead and subtracted.

Steps: detect candidates on a smoothed maximum-intensity projection; reject those near the
frame edge or the first/last plane, near another bead, saturated, too dim, or unlike the
typical bead (twice as bright or broadened: doublets and clumps); fit a sub-pixel centre to
each; cut a box around it, shift it by the sub-pixel remainder so every bead sits on the
same voxel, subtract its background, average; normalise like calibration/_psf.py (the
in-focus plane sums to 1) and clip negatives.

Centres come from a least-squares fit of a 2D Gaussian plus a constant to the in-focus core
(and of a 1D Gaussian plus a constant to the axial profile). The core of a widefield or
confocal PSF is close to Gaussian and symmetric, so the fitted centre is unbiased; the
constant absorbs the background, and pixels are weighted evenly near the peak, whereas a
centroid weights noise in the box edge by its distance and is pulled by any background
gradient or neighbour.

A camera pixel integrates the light over its area, so a bead image is the PSF convolved with
the pixel. The theory a measurement is compared with is therefore `pixel_integrated_psf`:
the psfmodels PSF computed on a grid 5x finer than the camera and summed over each camera
pixel, sampled on the camera grid with the emitter at a pixel centre, as the measured PSF is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.optimize import least_squares
from skimage.feature import peak_local_max

from livedecon.calibration._config import Optics
from livedecon.calibration._psf import fwhm_px, theoretical_psf
from livedecon.engines._ome_tiff import write_ome_tiff

# Box sizes in units of the lateral and axial FWHM, when not given in um: laterally the
# in-focus PSF is below 1e-3 of its peak 5 FWHM out; axially +-3 FWHM holds the main lobe
# and the first side lobes of a widefield PSF.
BOX_HALF_FWHM = 5.0
AXIAL_HALF_FWHM = 3.0
MIN_PLANES = 5
# Candidates: smoothed projection this many robust sigmas above its median. High, because a
# maximum projection of Poisson noise has a long upper tail (7-8 sigma in a 64x64x9 stack).
DETECT_SIGMA = 10.0
# A candidate fainter than this fraction of a brighter one nearby is taken as part of it (a
# ring of a defocused PSF in the projection, a side lobe), not as another bead.
SATELLITE_FRACTION = 0.1
PIXEL_OVERSAMPLE = 5  # theory on a 5x finer grid, summed over each camera pixel (odd: centred)
CONFOCAL_OVERSAMPLE = 3
_FWHM_UPSAMPLE = 16  # cubic-spline resampling of profiles before the half-maximum crossing

# Rejection reasons (keys of MeasuredPSF.rejected).
EDGE = "near the frame edge"
Z_EDGE = "focus too near the first or last plane"
NEIGHBOUR = "near another bead"
SATURATED = "saturated"
DIM = "too dim"
FIT = "centre fit failed"
BRIGHT = "too bright (doublet or clump)"
SHAPE = "broadened or elongated (doublet?)"


@dataclass(frozen=True)
class Bead:
    """One candidate: where it is, how it looked, and whether it went into the average."""

    centre_px: tuple[float, ...]  # sub-pixel (z, y, x) or (y, x), in input pixel indices
    peak: float  # brightest pixel above the local background, input units
    snr: float  # peak / background noise rms
    flux: float  # fitted Gaussian volume of the in-focus core, input units
    sigma_px: tuple[float, float]  # fitted Gaussian sigma (y, x), pixels
    status: str  # "used" or the reason it was rejected


@dataclass(frozen=True)
class MeasuredPSF:
    """A PSF averaged from beads, with what went into it and how it compares with theory.

    psf: (Z, Y, X) or (Y, X) float64, emitter at the centre voxel, in-focus plane (the
        central one, where the axial intensity peaks) summing to 1, non-negative.
    fwhm_um, theory_fwhm_um: (x, y, z) full widths at half maximum, z None for 2D; the theory
        (with `theory_psf`, at the same sampling and box) only when optics were given.
    """

    psf: np.ndarray
    pixel_size_um: float
    z_step_um: float | None
    beads: tuple[Bead, ...]
    fwhm_um: tuple[float, float, float | None]
    theory_fwhm_um: tuple[float, float, float | None] | None = None
    theory_psf: np.ndarray | None = None
    background: float = 0.0  # mean background subtracted per pixel, input units
    noise_rms: float = 0.0  # background noise per pixel, input units

    @property
    def beads_used(self) -> int:
        return sum(b.status == "used" for b in self.beads)

    @property
    def rejected(self) -> dict[str, int]:
        return dict(Counter(b.status for b in self.beads if b.status != "used"))

    @property
    def centres_px(self) -> np.ndarray:
        """(n, 3) or (n, 2) sub-pixel centres of the beads used."""
        used = [b.centre_px for b in self.beads if b.status == "used"]
        return np.asarray(used, dtype=float).reshape(len(used), self.psf.ndim)

    def summary(self) -> str:
        rejected = ", ".join(f"{n} {why}" for why, n in self.rejected.items()) or "none"
        lines = [f"PSF from {self.beads_used} of {len(self.beads)} beads (rejected: {rejected})"]
        for i, axis in enumerate("xyz"):
            value = self.fwhm_um[i]
            if value is None:
                continue
            text = f"  FWHM {axis}: {value * 1000:.0f} nm"
            theory = self.theory_fwhm_um[i] if self.theory_fwhm_um else None
            if theory:
                text += f" (theory {theory * 1000:.0f} nm, {value / theory - 1:+.1%})"
            lines.append(text)
        return "\n".join(lines)


# -- theory and widths -----------------------------------------------------------------------


def pixel_integrated_psf(
    optics: Optics,
    pixel_size_um: float,
    size_px: int,
    z_offsets_um: Sequence[float] | np.ndarray = (0.0,),
    oversample: int | None = None,
) -> np.ndarray:
    """The theoretical PSF as a camera records it: (Z, N, N), N = size_px rounded up to odd,
    each value the PSF integrated over a camera pixel (summed over `oversample` x
    `oversample` points, odd; default 5, 3 for confocal, whose model is slow on large
    grids), the emitter at the centre pixel's centre; the plane at offset 0 (when given)
    sums to 1 over the window."""
    n = int(size_px) | 1
    k = oversample or (CONFOCAL_OVERSAMPLE if optics.modality == "confocal" else PIXEL_OVERSAMPLE)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"oversample must be odd and positive, got {k}")
    fine = theoretical_psf(optics, pixel_size_um / k, n * k, z_offsets_um)
    return fine.reshape(fine.shape[0], n, k, n, k).sum(axis=(2, 4))


def psf_fwhm_um(
    psf: np.ndarray, pixel_size_um: float, z_step_um: float | None = None
) -> tuple[float, float, float | None]:
    """(x, y, z) FWHM in um of a PSF (Y, X) or (Z, Y, X) through its brightest voxel.

    Each profile is resampled 16x with a cubic spline before the half-maximum crossings are
    found: a PSF sampled near Nyquist has only 3-4 samples across its FWHM, where straight
    lines between samples would overestimate the width by several percent. z is None for a
    2D PSF (or a stack of one plane).
    """
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim == 3 and psf.shape[0] == 1:
        psf = psf[0]
    if psf.ndim not in (2, 3):
        raise ValueError(f"a PSF is (Y, X) or (Z, Y, X), got shape {psf.shape}")
    if psf.ndim == 3 and (z_step_um is None or z_step_um <= 0):
        raise ValueError("the axial FWHM of a (Z, Y, X) PSF needs its z step (z_step_um)")
    peak = np.unravel_index(int(np.argmax(psf)), psf.shape)
    plane = psf[peak[0]] if psf.ndim == 3 else psf
    y, x = peak[-2:]
    fx = _profile_fwhm(plane[y, :], "x") * pixel_size_um
    fy = _profile_fwhm(plane[:, x], "y") * pixel_size_um
    fz = None
    if psf.ndim == 3:
        assert z_step_um is not None  # checked above for a (Z, Y, X) PSF
        fz = _profile_fwhm(psf[:, y, x], "z") * float(z_step_um)
    return fx, fy, fz


def _profile_fwhm(profile: np.ndarray, axis: str) -> float:
    """FWHM in samples of a 1D peak, from a cubic-spline resampling."""
    n = profile.size
    if n < 3:
        raise ValueError(f"the {axis} profile has {n} samples; it needs at least 3")
    fine = np.arange((n - 1) * _FWHM_UPSAMPLE + 1) / _FWHM_UPSAMPLE
    try:
        return fwhm_px(CubicSpline(np.arange(n), profile)(fine)) / _FWHM_UPSAMPLE
    except ValueError:
        raise ValueError(
            f"the {axis} profile does not fall below half its maximum on both sides"
        ) from None


# -- measurement ---------------------------------------------------------------------------


def measure_psf(
    stack: np.ndarray,
    pixel_size_um: float,
    z_step_um: float | None = None,
    *,
    optics: Optics | None = None,
    box_um: float | None = None,
    axial_box_um: float | None = None,
    min_separation_um: float | None = None,
    min_snr: float = 20.0,
    saturation: float | None = None,
    max_flux_ratio: float = 1.6,
    max_width_ratio: float = 1.2,
    max_elongation: float = 1.25,
    min_beads: int = 5,
    average: Literal["mean", "median"] = "mean",
) -> MeasuredPSF:
    """Measure the PSF from beads: `stack` is (Z, Y, X) (focus increasing with the index) or
    (Y, X), in linear units with the camera offset removed (see the module docstring).

    box_um / axial_box_um: lateral / axial extent of the PSF (default: 5 lateral FWHM either
        side, +-3 axial FWHM, from the optics' theory when given, else from the beads).
    min_separation_um: a bead with another candidate closer than this is rejected (default:
        the lateral box width, so no neighbour's centre falls inside the box).
    min_snr: least peak above background over background noise rms.
    saturation: level at or above which a pixel is clipped, in the stack's units (give it
        when known: (full scale - offset) x gain); None: the stack's maximum when it forms a
        plateau (3 or more pixels, two side by side), else nothing is taken as saturated.
    max_flux_ratio, max_width_ratio, max_elongation: a bead brighter than max_flux_ratio x,
        or wider than max_width_ratio x, the median bead, or with fitted sigmas differing by
        more than max_elongation, is taken as a doublet or clump.
    average: "mean" (each bead weighted by its light, best for photon noise) or "median"
        (of the normalised beads, robust to the odd contaminated bead, noisier).
    """
    volume, dz = _bead_volume(stack, pixel_size_um, z_step_um, average)
    is_3d = dz is not None
    noise = _noise_rms(volume)
    sat = _saturation_level(volume) if saturation is None else float(saturation)
    scales = _scales(volume, pixel_size_um, dz, optics, box_um, min_separation_um, noise)
    candidates = _candidates(volume, scales, noise, min_snr)
    records = _check_beads(volume, candidates, scales, sat, noise, min_snr, is_3d)
    _mark_outliers(records, max_flux_ratio, max_width_ratio, max_elongation)
    hz = 0
    if dz is not None:
        hz = _axial_half_box(records, volume.shape[0], dz, axial_box_um, scales.fwhm_ax_px)
        _mark_z_edges(records, volume.shape[0], hz)
    beads = tuple(r.bead(is_3d) for r in records)
    used = _enough_beads(records, min_beads)
    psf, background = _average_beads(volume, used, scales.h, hz, average)
    fwhm = _measured_fwhm(psf, pixel_size_um, dz, volume.shape[0], scales.fwhm_ax_px)
    theory, theory_fwhm = None, None
    if optics is not None:
        theory, theory_fwhm = _theory(optics, pixel_size_um, dz, scales.h, hz)
    return MeasuredPSF(
        psf=psf if is_3d else psf[0],
        pixel_size_um=float(pixel_size_um),
        z_step_um=dz,
        beads=beads,
        fwhm_um=fwhm,
        theory_fwhm_um=theory_fwhm,
        theory_psf=theory,
        background=background,
        noise_rms=noise,
    )


def write_measured_psf(path: str | Path, measured: MeasuredPSF) -> Path:
    """The measured PSF as float32 OME-TIFF with its sampling (PhysicalSizeX/Y, and Z for a
    stack): the file `training_psf(..., psf_path=...)` takes."""
    psf = measured.psf.astype(np.float32)
    axes = "ZYX" if psf.ndim == 3 else "YX"
    description = f"PSF measured from {measured.beads_used} beads; " + "; ".join(
        line.strip() for line in measured.summary().splitlines()[1:]
    )
    return write_ome_tiff(
        path, psf, axes, measured.pixel_size_um, measured.z_step_um, description=description
    )


# -- the steps of measure_psf --------------------------------------------------------------

_MARGIN = 2  # pixels around the lateral box: room for the sub-pixel shift's spline


@dataclass(frozen=True)
class _Scales:
    """Sizes in pixels that follow from the PSF's width: fits, detection, box, separation."""

    fwhm_lat_px: float
    fwhm_ax_px: float | None  # planes; None for 2D, or when the optics are not given
    h: int  # lateral half-box
    sep_px: float  # least distance to another candidate


@dataclass
class _Record:
    """One candidate while it is checked; later checks may still reject it (status)."""

    centre: tuple[float, float, float]  # (z, y, x): integer until the fits refine it
    status: str = "used"
    peak: float = 0.0
    snr: float = 0.0
    flux: float = 0.0
    sigma: tuple[float, float] = (0.0, 0.0)

    def bead(self, is_3d: bool) -> Bead:
        """The public record: centre (z, y, x) for a focus series, (y, x) for a frame."""
        return Bead(
            centre_px=self.centre if is_3d else self.centre[1:],
            peak=self.peak,
            snr=self.snr,
            flux=self.flux,
            sigma_px=self.sigma,
            status=self.status,
        )


def _bead_volume(
    stack: np.ndarray, pixel_size_um: float, z_step_um: float | None, average: str
) -> tuple[np.ndarray, float | None]:
    """Check the input: the beads as a float64 (Z, Y, X) volume (Z = 1 for a frame), and the
    z step (None for a frame)."""
    data = np.asarray(stack, dtype=np.float64)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim not in (2, 3):
        raise ValueError(
            f"beads must be a (Z, Y, X) focus series or a (Y, X) frame, got shape {data.shape}"
        )
    if not pixel_size_um > 0:
        raise ValueError(f"pixel_size_um must be positive, got {pixel_size_um}")
    if average not in ("mean", "median"):
        raise ValueError(f"average must be 'mean' or 'median', got {average!r}")
    if not np.all(np.isfinite(data)):
        raise ValueError("the bead images contain NaN or infinite values")
    if data.ndim == 2:
        return data[None], None
    if z_step_um is None or not z_step_um > 0:
        raise ValueError(
            f"a bead focus series of {data.shape[0]} planes needs its z step (z_step_um)"
        )
    if data.shape[0] < MIN_PLANES:
        raise ValueError(
            f"the focus series has {data.shape[0]} planes: too short to hold the axial"
            f" profile; record at least {MIN_PLANES} (better +-2 um around focus)"
        )
    return data, float(z_step_um)


def _scales(
    volume: np.ndarray,
    pixel_size_um: float,
    dz: float | None,
    optics: Optics | None,
    box_um: float | None,
    min_separation_um: float | None,
    noise: float,
) -> _Scales:
    """Widths from theory when the optics are known, else from the brightest beads; the
    lateral box and the separation from them unless given; the frame must hold the box."""
    fwhm_ax_px = None
    if optics is not None:
        fwhm_lat_px, fwhm_ax_px = _theory_fwhm_px(optics, pixel_size_um, dz, volume.shape[0])
    else:
        fwhm_lat_px = _estimate_lateral_fwhm_px(volume, noise)
    if box_um is not None:
        h = max(round(box_um / 2 / pixel_size_um), 3)
    else:
        h = max(int(np.ceil(BOX_HALF_FWHM * fwhm_lat_px)), 4)
    sep_px = min_separation_um / pixel_size_um if min_separation_um is not None else 2 * h + 1.0
    if min(volume.shape[1:]) < 2 * (h + _MARGIN) + 1:
        raise ValueError(
            f"frames of {volume.shape[1:]} pixels are too small for a PSF box of"
            f" {2 * h + 1} pixels ({(2 * h + 1) * pixel_size_um:.2f} um)"
        )
    return _Scales(fwhm_lat_px, fwhm_ax_px, h, sep_px)


def _candidates(
    volume: np.ndarray, scales: _Scales, noise: float, min_snr: float
) -> list[tuple[int, int, int]]:
    """Candidate beads (z, y, x), brightest first; an error when there are none, or when even
    the brightest is below min_snr (to say so instead of rejecting each as too dim)."""
    candidates = _detect(volume, scales.fwhm_lat_px, scales.sep_px)
    if not candidates:
        raise ValueError(
            f"no beads found: nothing stands {DETECT_SIGMA:g} noise sigmas above the"
            f" background (noise {noise:.3g} per pixel)"
        )
    plane_median = np.median(volume, axis=(1, 2))
    brightest = max((volume[c] - plane_median[c[0]]) / noise for c in candidates)
    if brightest < min_snr:
        raise ValueError(
            f"no beads found: {len(candidates)} faint spots, the brightest with a peak"
            f" {brightest:.3g} times the background noise ({noise:.3g} per pixel), below"
            f" min_snr {min_snr:g}"
        )
    return candidates


def _check_beads(
    volume: np.ndarray,
    candidates: list[tuple[int, int, int]],
    scales: _Scales,
    sat: float | None,
    noise: float,
    min_snr: float,
    is_3d: bool,
) -> list[_Record]:
    """A record per candidate, in order: its sub-pixel centre and measures, or why it is
    rejected."""
    positions = np.array([c[1:] for c in candidates], dtype=float)
    w = max(int(np.ceil(1.5 * scales.fwhm_lat_px)), 2)  # half-width of the centre fit
    records = []
    for i, candidate in enumerate(candidates):
        d = np.hypot(*(positions - positions[i]).T)
        d[i] = np.inf
        records.append(
            _check_bead(volume, candidate, d.min(), w, scales, sat, noise, min_snr, is_3d)
        )
    return records


def _check_bead(
    volume: np.ndarray,
    candidate: tuple[int, int, int],
    nearest_px: float,
    w: int,
    scales: _Scales,
    sat: float | None,
    noise: float,
    min_snr: float,
    is_3d: bool,
) -> _Record:
    """One candidate's checks, in order (edge, neighbour, saturation, centre fits, SNR): the
    first that fails gives its status; a fitted bead gets its centre and measures."""
    zc, yc, xc = candidate
    rec = _Record((float(zc), float(yc), float(xc)))
    nz, ny, nx = volume.shape
    h, margin = scales.h, _MARGIN
    if not (h + margin <= yc < ny - h - margin and h + margin <= xc < nx - h - margin):
        rec.status = EDGE
        return rec
    if nearest_px < scales.sep_px:
        rec.status = NEIGHBOUR
        return rec
    z_lo, z_hi = max(zc - 1, 0), min(zc + 2, nz)
    core = volume[z_lo:z_hi, yc - w : yc + w + 1, xc - w : xc + w + 1]
    if sat is not None and core.max() >= sat:
        rec.status = SATURATED
        return rec
    fit = _fit_gaussian_2d(core.mean(axis=0), w)
    if fit is None:
        rec.status = FIT
        return rec
    amp, dy, dx, sy, sx, bg = fit
    y0, x0 = yc + dy, xc + dx
    z0 = float(zc)
    if is_3d:
        z_fit = _axial_centre(volume, zc, yc, xc, bg, scales.fwhm_ax_px)
        if z_fit is None:
            rec.status = FIT
            return rec
        z0 = z_fit
    peak = float(volume[zc, yc, xc] - bg)
    rec.centre = (z0, y0, x0)
    rec.peak = peak
    rec.snr = peak / noise
    rec.flux = float(2 * np.pi * amp * sy * sx)
    rec.sigma = (sy, sx)
    if rec.snr < min_snr:
        rec.status = DIM
    return rec


def _mark_outliers(
    records: list[_Record], max_flux_ratio: float, max_width_ratio: float, max_elongation: float
) -> None:
    """Reject beads unlike the typical (median) one: too bright, or broadened or elongated
    (doublets and clumps). Needs 3 or more beads to tell what is typical."""
    good = [r for r in records if r.status == "used"]
    if len(good) < 3:
        return
    flux = np.array([r.flux for r in good])
    width = np.array([np.sqrt(r.sigma[0] * r.sigma[1]) for r in good])
    m_flux, m_width = np.median(flux), np.median(width)
    for r, f, wd in zip(good, flux, width, strict=True):
        sy, sx = r.sigma
        if f > max_flux_ratio * m_flux:
            r.status = BRIGHT
        elif wd > max_width_ratio * m_width or max(sy, sx) > max_elongation * min(sy, sx):
            r.status = SHAPE


def _axial_half_box(
    records: list[_Record],
    nz: int,
    dz: float,
    axial_box_um: float | None,
    fwhm_ax_px: float | None,
) -> int:
    """Axial half-box in planes: as given, else +-3 axial FWHM, else all there is; never more
    than the planes around the typical bead's focus hold."""
    good = [r for r in records if r.status == "used"]
    z_typ = float(np.median([r.centre[0] for r in good])) if good else (nz - 1) / 2
    room = int(np.floor(min(z_typ, nz - 1 - z_typ))) - 1
    if axial_box_um is not None:
        hz = round(axial_box_um / 2 / dz)
    elif fwhm_ax_px is not None:
        hz = int(np.ceil(AXIAL_HALF_FWHM * fwhm_ax_px))
    else:
        hz = room
    hz = min(hz, room)
    if hz < 2:
        raise _too_short(nz, dz, fwhm_ax_px)
    return hz


def _mark_z_edges(records: list[_Record], nz: int, hz: int) -> None:
    """Reject beads whose focus is too near the first or last plane for the axial box (and
    one plane for the sub-plane shift)."""
    for r in records:
        if r.status != "used":
            continue
        zi = round(r.centre[0])
        if zi - hz - 1 < 0 or zi + hz + 1 > nz - 1:
            r.status = Z_EDGE


def _enough_beads(records: list[_Record], min_beads: int) -> list[_Record]:
    """The beads used; an error saying why the others were rejected when too few are left."""
    used = [r for r in records if r.status == "used"]
    rejected = Counter(r.status for r in records if r.status != "used")
    if len(used) < min_beads:
        why = "; ".join(f"{n} {reason}" for reason, n in rejected.most_common()) or "none"
        raise ValueError(
            f"too few isolated beads: {len(used)} usable of {len(records)} found, at least"
            f" {min_beads} needed (rejected: {why}). Use a sparser slide, a larger field, or"
            " adjust the exposure."
        )
    return used


def _average_beads(
    volume: np.ndarray, used: list[_Record], h: int, hz: int, average: str
) -> tuple[np.ndarray, float]:
    """Register, subtract the background of and average the beads' boxes: the (2hz+1, 2h+1,
    2h+1) PSF, non-negative, in-focus plane summing to 1; and the mean background."""
    boxes, backgrounds = [], []
    for r in used:
        box, bg = _registered_box(volume, r.centre, h, hz, _MARGIN)
        boxes.append(box)
        backgrounds.append(bg)
    boxes_arr = np.stack(boxes)
    if average == "median":
        sums = boxes_arr[:, hz].sum(axis=(1, 2))
        psf = np.median(boxes_arr / sums[:, None, None, None], axis=0)
    else:
        psf = boxes_arr.sum(axis=0)  # the mean with each bead weighted by its light
    psf = psf - _border_mean(psf[max(hz - 1, 0) : hz + 2])  # what the per-bead estimates missed
    psf = np.clip(psf, 0.0, None)
    in_focus = psf[hz].sum()
    if not in_focus > 0:
        raise ValueError("the averaged beads have no light above the background")
    psf /= in_focus
    return psf, float(np.mean(backgrounds))


def _measured_fwhm(
    psf: np.ndarray, pixel_size_um: float, dz: float | None, nz: int, fwhm_ax_px: float | None
) -> tuple[float, float, float | None]:
    """(x, y, z) FWHM of the averaged PSF, its failure said in terms of the recording."""
    try:
        return psf_fwhm_um(psf if dz is not None else psf[0], pixel_size_um, dz)
    except ValueError as exc:
        if dz is not None and "z profile" in str(exc):
            raise _too_short(nz, dz, fwhm_ax_px) from None
        raise ValueError(f"the measured PSF has no clear peak: {exc}") from None


def _theory(
    optics: Optics, pixel_size_um: float, dz: float | None, h: int, hz: int
) -> tuple[np.ndarray, tuple[float, float, float | None]]:
    """The pixel-integrated theoretical PSF at the measurement's sampling and box, and its
    FWHM: what the measured one is compared with."""
    theory = pixel_integrated_psf(
        optics, pixel_size_um, 2 * h + 1, (np.arange(2 * hz + 1) - hz) * (dz or 0.0)
    )
    theory = theory if dz is not None else theory[0]
    return theory, psf_fwhm_um(theory, pixel_size_um, dz)


# -- pieces ------------------------------------------------------------------------------


def _too_short(planes: int, dz: float, fwhm_ax_px: float | None) -> ValueError:
    need = (
        f" (the axial FWHM is about {fwhm_ax_px * dz:.2f} um; record at least"
        f" +-{2 * fwhm_ax_px * dz:.1f} um around focus)"
        if fwhm_ax_px
        else " (record at least +-2 um around the beads' focus)"
    )
    return ValueError(
        f"the focus series of {planes} planes at {dz:g} um is too short to hold the axial"
        f" profile{need}"
    )


def _theory_fwhm_px(
    optics: Optics, pixel_size_um: float, dz: float | None, planes: int
) -> tuple[float, float | None]:
    """Lateral and axial (None for 2D) FWHM of the pixel-integrated theory, in pixels and
    planes, to size the detection, the fits and the box."""
    lateral = 0.51 * optics.emission_um / optics.na / pixel_size_um
    size = int(np.ceil(4 * lateral)) | 1  # +-2 FWHM: enough for the width
    if dz is None:
        fx, fy, _ = psf_fwhm_um(pixel_integrated_psf(optics, pixel_size_um, size), pixel_size_um)
        return 0.5 * (fx + fy) / pixel_size_um, None
    cap = int(np.ceil(2 * AXIAL_HALF_FWHM * _axial_fwhm_guess(optics) / dz))
    hz = min((planes - 1) // 2, cap)
    stack = pixel_integrated_psf(optics, pixel_size_um, size, (np.arange(2 * hz + 1) - hz) * dz)
    fx, fy, _ = psf_fwhm_um(stack[hz], pixel_size_um)
    try:
        fz = psf_fwhm_um(stack, pixel_size_um, dz)[2]
    except ValueError:
        raise _too_short(planes, dz, None) from None
    assert fz is not None  # hz >= 1 (a focus series has >= MIN_PLANES planes): a 3D stack
    return 0.5 * (fx + fy) / pixel_size_um, fz / dz


def _axial_fwhm_guess(optics: Optics) -> float:
    """Rough axial FWHM (um), only to bound how many planes the theory is computed for."""
    n = optics.immersion_ri
    width = 0.88 * optics.emission_um / (n - np.sqrt(n**2 - optics.na**2))
    return width * (0.75 if optics.modality == "confocal" else 1.0)


def _noise_rms(volume: np.ndarray) -> float:
    """Background noise per pixel from differences of neighbouring pixels: robust (median
    absolute deviation) to the sparse beads and blind to smooth background variations."""
    diff = np.diff(volume, axis=-1).ravel()
    mad = np.median(np.abs(diff - np.median(diff)))
    rms = 1.4826 * mad / np.sqrt(2)
    return float(rms) if rms > 0 else float(np.std(diff) / np.sqrt(2) or 1.0)


def _saturation_level(volume: np.ndarray) -> float | None:
    """The stack maximum when it looks like a clipped top: shared by 3 or more pixels, two
    of them side by side in one plane (a plateau, not a chance tie of two bead peaks)."""
    top = float(volume.max())
    at_top = volume == top
    if np.count_nonzero(at_top) < 3:
        return None
    side_by_side = (at_top[:, 1:, :] & at_top[:, :-1, :]).any() or (
        at_top[:, :, 1:] & at_top[:, :, :-1]
    ).any()
    return top if side_by_side else None


def _projection(volume: np.ndarray, fwhm_lat_px: float) -> np.ndarray:
    """Maximum-intensity projection after smoothing at half the PSF's scale (keeps peaks,
    averages pixel noise)."""
    sigma = max(0.5 * fwhm_lat_px / 2.355, 0.5)
    axial = 0.7 if volume.shape[0] > 1 else 0.0
    return ndimage.gaussian_filter(volume, (axial, sigma, sigma)).max(axis=0)


def _detect(volume: np.ndarray, fwhm_lat_px: float, sep_px: float) -> list[tuple[int, int, int]]:
    """Candidate beads (z, y, x) at integer positions, brightest first, satellites dropped."""
    proj = _projection(volume, fwhm_lat_px)
    base = float(np.median(proj))
    spread = 1.4826 * float(np.median(np.abs(proj - base))) or float(proj.std()) or 1.0
    r = max(round(fwhm_lat_px), 1)
    # brightest first; a plateau or saturated top gives one peak
    yx = peak_local_max(
        proj, min_distance=r, threshold_abs=base + DETECT_SIGMA * spread, exclude_border=False
    )
    amp = proj[tuple(yx.T)] - base
    kept: list[tuple[int, int]] = []
    kept_amp: list[float] = []
    for (y, x), a in zip(yx, amp, strict=True):
        if kept:
            d = np.hypot(*(np.asarray(kept) - (y, x)).T)
            near = d < sep_px
            if near.any() and a < SATELLITE_FRACTION * max(np.asarray(kept_amp)[near]):
                continue
        kept.append((int(y), int(x)))
        kept_amp.append(float(a))
    smooth_z = ndimage.gaussian_filter1d(volume, 0.7, axis=0) if volume.shape[0] > 1 else volume
    return [(int(np.argmax(smooth_z[:, y, x])), y, x) for y, x in kept]


def _estimate_lateral_fwhm_px(volume: np.ndarray, noise: float) -> float:
    """Lateral FWHM from Gaussian fits to the brightest candidates (no optics given)."""
    candidates = _detect(volume, 2.0, 10.0)
    sigmas = []
    for z, y, x in candidates[:15]:
        w = 4
        if not (w <= y < volume.shape[1] - w and w <= x < volume.shape[2] - w):
            continue
        planes = volume[max(z - 1, 0) : z + 2, y - w : y + w + 1, x - w : x + w + 1]
        fit = _fit_gaussian_2d(planes.mean(axis=0), w)
        if fit is not None and fit[0] > 10 * noise:
            sigmas.append(np.sqrt(fit[3] * fit[4]))
    if not sigmas:
        raise ValueError(
            f"no beads found: no candidate stands clearly above the noise ({noise:.3g} per pixel)"
        )
    return float(2.3548 * np.median(sigmas))


def _fit_gaussian_2d(image: np.ndarray, w: int) -> tuple[float, ...] | None:
    """Least-squares fit of A exp(-(dy^2/2sy^2 + dx^2/2sx^2)) + B on a (2w+1)^2 window
    centred on the integer peak: (A, dy, dx, sy, sx, B), or None when it fails."""
    yy, xx = np.mgrid[-w : w + 1, -w : w + 1].astype(np.float64)
    values = image.astype(np.float64)
    bg0 = float(np.median(np.concatenate([values[0], values[-1], values[:, 0], values[:, -1]])))
    amp0 = float(values[w, w] - bg0)
    if not amp0 > 0:
        return None

    def residual(p: np.ndarray) -> np.ndarray:
        a, dy, dx, sy, sx, b = p
        model = a * np.exp(-0.5 * (((yy - dy) / sy) ** 2 + ((xx - dx) / sx) ** 2)) + b
        return (model - values).ravel()

    start = np.array([amp0, 0.0, 0.0, w / 2, w / 2, bg0])
    lower = [0.0, -1.5, -1.5, 0.3, 0.3, -np.inf]
    upper = [np.inf, 1.5, 1.5, 2.0 * w, 2.0 * w, np.inf]
    try:
        result = least_squares(residual, start, bounds=(lower, upper), x_scale="jac")
    except (ValueError, np.linalg.LinAlgError):
        return None
    a, dy, dx, sy, sx, b = result.x
    on_bound = np.isclose(result.x[1:5], np.array(lower[1:5]), rtol=0, atol=1e-6) | np.isclose(
        result.x[1:5], np.array(upper[1:5]), rtol=0, atol=1e-6
    )
    if not result.success or a <= 0 or on_bound.any():
        return None
    return float(a), float(dy), float(dx), float(sy), float(sx), float(b)


def _axial_centre(
    volume: np.ndarray, zc: int, yc: int, xc: int, bg: float, fwhm_ax_px: float | None
) -> float | None:
    """Sub-plane focus of a bead: a Gaussian plus a constant fitted to the light of its
    central 3x3 pixels around the brightest plane."""
    profile = volume[:, yc - 1 : yc + 2, xc - 1 : xc + 2].sum(axis=(1, 2)) - 9 * bg
    k = max(int(np.ceil(fwhm_ax_px)) if fwhm_ax_px else 3, 2)
    zm = int(np.argmax(profile))
    lo, hi = max(zm - k, 0), min(zm + k + 1, profile.size)
    if hi - lo < 5:
        return None
    z = np.arange(lo, hi, dtype=np.float64)
    values = profile[lo:hi]

    def residual(p: np.ndarray) -> np.ndarray:
        a, z0, s, b = p
        return a * np.exp(-0.5 * ((z - z0) / s) ** 2) + b - values

    a0 = float(values.max() - values.min())
    if not a0 > 0:
        return None
    start = [a0, float(zm), max(k / 2, 1.0), float(values.min())]
    try:
        result = least_squares(
            residual,
            start,
            bounds=([0, zm - 1.5, 0.3, -np.inf], [np.inf, zm + 1.5, 4.0 * k, np.inf]),
            x_scale="jac",
        )
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not result.success or abs(result.x[1] - zm) > 1.49:
        return None
    return float(result.x[1])


def _border_mean(planes: np.ndarray, width: int = 2) -> float:
    """Mean of the outer `width` pixels of (Z, Y, X) planes, without outliers (>5 robust
    sigma: a neighbour, a hot pixel). A mean, not a median: at a few photons per pixel the
    median of Poisson noise is biased low, which would leave a pedestal in the PSF."""
    mask = np.ones(planes.shape[-2:], dtype=bool)
    mask[width:-width, width:-width] = False
    values = planes[:, mask].ravel()
    med = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - med))
    if spread > 0:
        values = values[np.abs(values - med) <= 5 * spread]
    return float(values.mean())


def _registered_box(
    volume: np.ndarray, centre: tuple[float, float, float], h: int, hz: int, margin: int
) -> tuple[np.ndarray, float]:
    """(2hz+1, 2h+1, 2h+1) box around a bead, background-subtracted, shifted so that the
    sub-pixel centre falls on the central voxel; and the background it had."""
    idx = [round(c) for c in centre]
    frac = [c - i for c, i in zip(centre, idx, strict=True)]
    mz = 1 if volume.shape[0] > 1 else 0
    if volume.shape[0] == 1:
        frac[0] = 0.0
    zi, yi, xi = idx
    box = volume[
        zi - hz - mz : zi + hz + mz + 1,
        yi - h - margin : yi + h + margin + 1,
        xi - h - margin : xi + h + margin + 1,
    ]
    bg = _border_mean(box[max(mz + hz - 1, 0) : mz + hz + 2])
    # cubic spline: interpolating, so a whole-pixel shift is exact and a half-pixel shift
    # barely smooths a Nyquist-sampled PSF; "nearest" avoids ringing from a hard edge
    shifted = ndimage.shift(box - bg, [-f for f in frac], order=3, mode="nearest")
    inner = shifted[mz : mz + 2 * hz + 1, margin : margin + 2 * h + 1, margin : margin + 2 * h + 1]
    return inner, bg
