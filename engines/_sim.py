"""2D structured illumination (SIM): pattern parameters from the data, then a generalised
Wiener reconstruction on the 2x grid. Written here; no external SIM program.

A raw frame of angle a and phase p sees the specimen S under I(r) = 1 + m cos(2 pi k.r + phi):
    D_p(k) = OTF(k) [S(k) + (m/2) e^{i phi_p} S(k - k0) + (m/2) e^{-i phi_p} S(k + k0)]
The P >= 3 phases of an angle separate the three bands (B0, B+, B-) by solving that mixing.
Parameters, each from the data (as fairSIM and HiFi-SIM do):
- k0: the peak of the cross-correlation of B0 with B+ (a spectral shift), searched in a ring of
  the detection cut-off and refined below a pixel by evaluating the correlation off the grid;
- phi_p: each raw frame moved by k0 against the frames' mean, the specimen's own part (the
  same in every frame) taken off;
- m: the least-squares ratio of the shifted B+ to B0 where both OTF copies overlap.
Reconstruction: the bands are shifted back to their true place (a phase ramp in real space),
combined by a generalised Wiener filter sum(H_j^* B_j) / (sum |H_j|^2 + w^2), apodised out to
the extended support. Each band is attenuated near its own centre (a notch: the "OTF
attenuation" of fairSIM, which HiFi-SIM refines), which suppresses the residual peaks at the
pattern frequencies that otherwise print honeycomb artefacts.

Frequencies are in cycles per output (2x) pixel inside this module; `SimParameters` states
them in cycles per micrometre too.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from pydantic import Field
from scipy import fft, ndimage

from livedecon.engines._configfile import StrictModel
from livedecon.engines._sim_pattern import SimParameters

UPSCALE = 2
# phases this far from evenly spread make the band separation amplify noise (1: even)
MAX_MIXING_CONDITION = 2.0
# how far the frames' variation at k must outweigh the specimen's own correlation there
PATTERN_CONTRAST = 1.5


class SimSettings(StrictModel):
    """How to reconstruct: the pattern sequence (angles x phases) and the Wiener filter's
    constant, apodisation and notch."""

    angles: int = Field(3, ge=1, le=8)
    phases: int = Field(3, ge=3, le=9)
    wiener: float | None = Field(
        None, gt=0, description="w, the Wiener constant (OTF peak = 1); None: from the noise"
    )
    apodization: float = Field(
        1.0, gt=0, le=1.5, description="apodisation reach, a fraction of the extended support"
    )
    notch_strength: float = Field(
        0.9, ge=0, lt=1, description="attenuation of each band at its own centre; 0: off"
    )
    notch_width: float = Field(
        0.15, gt=0, description="notch width (Gaussian sigma), a fraction of the cut-off"
    )
    search_ring: tuple[float, float] = Field(
        (0.5, 1.05), description="where to look for the pattern frequency, x the cut-off"
    )
    border_px: int = Field(8, ge=0, description="raw frame borders faded to the mean")
    estimate_crop_px: int = Field(
        256, ge=32, description="parameters come from the central crop this wide (camera px)"
    )
    min_modulation: float = Field(
        0.15,
        ge=0,
        le=1,
        description="a pattern estimated weaker than this is taken as not found (too few"
        " photons to see it): its angle then adds widefield information only",
    )


class SimResult(StrictModel, arbitrary_types_allowed=True):
    """A reconstruction: the SR image, the widefield mean and the parameters it used."""

    image: np.ndarray  # SR image on the 2x grid, photoelectrons per output pixel
    widefield: np.ndarray  # mean of the raw frames (camera grid), photoelectrons
    parameters: SimParameters


def detection_cutoff_per_um(na: float, sample_ri: float, emission_um: float) -> float:
    """2 NA / lambda, with the NA no larger than the sample's index: light from a watery
    sample beyond its critical angle is evanescent, so a 1.49 NA objective collects an
    effective NA of ~1.33 (the PSF model's OTF is ~1% of its peak at 0.95 of that)."""
    return 2 * min(na, sample_ri) / emission_um


# -- spectra ---------------------------------------------------------------------------------


def _frequencies(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return fft.fftfreq(shape[0])[:, None], fft.fftfreq(shape[1])[None, :]


def psf_at_origin(psf_2x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A centred PSF on the output grid, padded to `shape`, its centre moved to index 0 and
    its sum to 1 (so its spectrum is the OTF with peak 1)."""
    psf = np.asarray(psf_2x, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] > shape[0] or psf.shape[1] > shape[1]:
        raise ValueError(f"need a 2D PSF no larger than the output {shape}, got {psf.shape}")
    if not np.isfinite(psf).all() or psf.sum() <= 0:
        raise ValueError("the PSF must be finite with a positive sum")
    padded = np.zeros(shape)
    padded[: psf.shape[0], : psf.shape[1]] = psf / psf.sum()
    return np.roll(padded, (-(psf.shape[0] // 2), -(psf.shape[1] // 2)), (0, 1))


def bin_to_camera(fine: np.ndarray) -> np.ndarray:
    """An image on the output (2x) grid summed onto the camera grid it came from."""
    ny, nx = (n // UPSCALE for n in fine.shape[-2:])
    shape = (*fine.shape[:-2], ny, UPSCALE, nx, UPSCALE)
    return fine[..., : ny * UPSCALE, : nx * UPSCALE].reshape(shape).sum(axis=(-3, -1))


def _fade_borders(frames: np.ndarray, width: int) -> np.ndarray:
    """Blend each frame to its mean over `width` pixels at the edges, so the periodic
    spectra see no jump at the frame's borders."""
    if width == 0:
        return frames
    ny, nx = frames.shape[-2:]

    def ramp(n: int) -> np.ndarray:
        edge = np.minimum(np.arange(n), np.arange(n)[::-1])
        return np.clip(edge / width, 0, 1) ** 2 * (3 - 2 * np.clip(edge / width, 0, 1))

    weight = ramp(ny)[:, None] * ramp(nx)[None, :]
    means = frames.mean(axis=(-2, -1), keepdims=True)
    return means + (frames - means) * weight


def _upsampled_spectra(frames: np.ndarray) -> np.ndarray:
    """Spectra of the frames on the 2x grid (zero-padded): the same image, flux kept. Each
    frequency goes straight to its place on the larger grid (non-negative ones first, the
    rest at the end), which holds for odd frame sizes too; centring with fftshift and back
    does not (an odd size landed every frequency one bin off, DC included)."""
    n, ny, nx = frames.shape
    spectra = fft.fft2(frames, workers=-1)
    big_y, big_x = UPSCALE * ny, UPSCALE * nx
    out = np.zeros((n, big_y, big_x), dtype=complex)
    py, px = (ny + 1) // 2, (nx + 1) // 2  # the non-negative frequencies along each axis
    rows = [(slice(0, py), slice(0, py)), (slice(py, ny), slice(big_y - (ny - py), big_y))]
    cols = [(slice(0, px), slice(0, px)), (slice(px, nx), slice(big_x - (nx - px), big_x))]
    for (src_y, dst_y), (src_x, dst_x) in ((r, c) for r in rows for c in cols):
        out[:, dst_y, dst_x] = spectra[:, src_y, src_x]
    # camera pixel i is centred on output coordinate 2i + 1/2 (it covers 2i and 2i + 1), the
    # zero-padded image on 2i: move it half an output pixel so both grids agree (separable)
    fy, fx = _frequencies((big_y, big_x))
    out *= np.exp(-1j * np.pi * fy)
    out *= np.exp(-1j * np.pi * fx)
    return out


def _mixing(phases: np.ndarray) -> np.ndarray:
    """Rows: raw frames; columns: bands 0, +1, -1."""
    phases = np.asarray(phases, dtype=float)
    return np.stack([np.ones_like(phases), np.exp(1j * phases), np.exp(-1j * phases)], axis=1)


def separate_bands(spectra: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """Bands (B0, B+, B-) of one angle from its raw spectra (P, Y, X)."""
    unmix = np.linalg.pinv(_mixing(phases))
    return np.tensordot(unmix, spectra, axes=(1, 0))


def _ramp_axes(
    shape: tuple[int, int], k: np.ndarray, signed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The two factors of exp(2 pi i k.r) = exp(2 pi i k_y y) exp(2 pi i k_x x), as a column
    and a row; `signed`: r wraps to negative past the middle, as for a kernel centred at
    index 0. Separable, so a ramp costs two short exponentials and a product."""
    y, x = np.arange(shape[0]), np.arange(shape[1])
    if signed:
        y = (y + shape[0] // 2) % shape[0] - shape[0] // 2
        x = (x + shape[1] // 2) % shape[1] - shape[1] // 2
    return np.exp(2j * np.pi * k[0] * y)[:, None], np.exp(2j * np.pi * k[1] * x)[None, :]


def _ramp(shape: tuple[int, int], k: np.ndarray, signed: bool = False) -> np.ndarray:
    """exp(2 pi i k.r) for k in cycles per pixel (see _ramp_axes)."""
    column, row = _ramp_axes(shape, k, signed)
    return column * row


def _correlation_at(product: np.ndarray, k: np.ndarray) -> complex:
    """sum_q conj(A(q)) B(q + k) / N for real-space a, b given as product = conj(a) * b, at
    any (sub-pixel) shift k: sum_r product(r) exp(-2 pi i k.r), one factor per axis."""
    column, row = _ramp_axes(product.shape, k)
    return complex(np.conj(column[:, 0]) @ (product @ np.conj(row[0])))


def _shift_image(image: np.ndarray, k: np.ndarray) -> np.ndarray:
    """B(q + k) from the real-space image of a band B: a phase ramp (sub-pixel exact)."""
    return fft.fft2(image * np.conj(_ramp(image.shape, k)), workers=-1)


def _shift_band(band: np.ndarray, k: np.ndarray) -> np.ndarray:
    """B(q + k) for a band B(q)."""
    return _shift_image(fft.ifft2(band, workers=-1), k)


def _shifted_otf(psf: np.ndarray, k: np.ndarray, cutoff: float) -> np.ndarray:
    """|OTF(q + k)| from the PSF centred at index 0 (exact off the grid too), zero where
    |q + k| is beyond the cut-off (a sampled PSF leaves a floor of ~0.2% there)."""
    otf = np.abs(fft.fft2(psf * np.conj(_ramp(psf.shape, k, signed=True)), workers=-1))
    fy, fx = _frequencies(psf.shape)
    return np.where(np.hypot(fy + k[0], fx + k[1]) <= cutoff, otf, 0.0)


@dataclass
class _Prepared:
    """Raw spectra on the output grid, the PSF and OTF there, and the cut-off."""

    spectra: np.ndarray
    psf: np.ndarray
    otf: np.ndarray
    cutoff: float  # cycles per output pixel
    radius: np.ndarray  # |q| of each output frequency, cycles per pixel

    @cached_property
    def strong(self) -> np.ndarray:
        """Where band 0 is trusted for the modulation: the OTF well above 0, away from DC."""
        return (self.otf > 0.005) & (self.radius > 0.15 * self.cutoff)


# -- parameters ------------------------------------------------------------------------------


def _refine_peak(a: np.ndarray, b: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Sub-pixel maximum of |correlation| around a grid peak: a shrinking grid search."""
    best, step = start.astype(float), 0.5 / max(a.shape)
    product = np.conj(a) * b
    for _ in range(7):
        grid = [best + step * np.array([dy, dx]) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        values = [abs(_correlation_at(product, k)) for k in grid]
        best = grid[int(np.argmax(values))]
        step /= 2
    return best


def _turn(angle: np.ndarray | float) -> np.ndarray:
    """Smallest angle between two directions of a line (k and -k are one pattern)."""
    return np.abs(np.angle(np.exp(2j * np.asarray(angle)))) / 2


def _peakiness(magnitude: np.ndarray) -> np.ndarray:
    """How far each point of a spectrum's modulus stands above its 7 x 7 neighbourhood."""
    return magnitude - ndimage.uniform_filter(magnitude, 7, mode="wrap")


def _pattern_vector(bands: np.ndarray, prepared: _Prepared, ring: tuple[float, ...]) -> np.ndarray:
    """k0 of one angle, in three steps:
    1. the sharpest peak of |B+(q)| and |B-(-q)| inside the ring (the specimen's mean, moved
       to +-k0 by the pattern: a spike on a smooth spectrum, where imperfect separation
       leaves only smooth leakage);
    2. where B+ correlates best with B0 (OTF-weighted), off the grid;
    3. where the modulation ratio |c(k)| (B+ moved by k against B0, where both OTF copies
       overlap) is largest. The ratio is normalised by band 0's power there, so unlike the
       correlation peak it is not pulled toward low frequencies by the falling OTF: measured
       0.01-0.05 px from the true k on the output grid, against 0.1-0.3 px for step 2."""
    otf = prepared.otf
    fy, fx = _frequencies(otf.shape)
    radius = np.hypot(fy, fx)
    allowed = (radius >= ring[0]) & (radius <= ring[1])
    if len(ring) > 2:  # (inner, outer, *directions): within 10 degrees of one (or of -k)
        direction = np.arctan2(fy, fx)
        near = [_turn(direction - d) < np.radians(10) for d in ring[2:]]
        allowed &= np.logical_or.reduce(near)
    mirrored = np.roll(np.flip(np.abs(bands[2]), (0, 1)), (1, 1), (0, 1))  # |B-(-q)|
    score = _peakiness(np.abs(bands[1])) + _peakiness(mirrored)
    peak = np.unravel_index(int(np.argmax(np.where(allowed, score, -np.inf))), score.shape)
    b0 = fft.ifft2(bands[0] * otf, workers=-1)
    b1 = fft.ifft2(bands[1] * otf, workers=-1)
    k = _refine_peak(b0, b1, np.array([fy[peak[0], 0], fx[0, peak[1]]]))
    return _refine_by_modulation(bands, prepared, k)


def _refine_by_modulation(bands: np.ndarray, prepared: _Prepared, k: np.ndarray) -> np.ndarray:
    """The k near `k` where |c(k)| is largest: a shrinking 3 x 3 grid search from 1/4 pixel."""

    plus = fft.ifft2(bands[1], workers=-1)  # B+ in real space, moved by each candidate

    def strength(candidate: np.ndarray) -> float:
        otf_k = _shifted_otf(prepared.psf, candidate, prepared.cutoff)
        moved = _shift_image(plus, candidate)
        return abs(_modulation(bands[0], moved, prepared, otf_k))

    best, step = k, 0.25 / max(prepared.otf.shape)
    best_value = strength(best)  # each round's centre is the last round's best: kept
    for _ in range(6):
        grid = [best + step * np.array([dy, dx]) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        values = [best_value if i == 4 else strength(c) for i, c in enumerate(grid)]
        best, best_value = grid[int(np.argmax(values))], max(values)
        step /= 2
    return best


@dataclass
class _FramePhases:
    """One angle's frame phases, and whether the frames show its pattern at all."""

    phases: np.ndarray
    contrast: float  # how far the frames' variation at k outweighs the specimen's correlation

    @property
    def shows_pattern(self) -> bool:
        return self.contrast >= PATTERN_CONTRAST

    @property
    def usable(self) -> bool:
        """Shown, and spread evenly enough for the band separation not to amplify noise."""
        return self.shows_pattern and np.linalg.cond(_mixing(self.phases)) <= MAX_MIXING_CONDITION


def _frame_phases(raw: np.ndarray, prepared: _Prepared, k: np.ndarray) -> _FramePhases:
    """Phases of one angle's raw frames (spectra (P, Y, X)) for its pattern vector k.

    Each frame, moved by k, is correlated with the frames' mean (band 0) where both OTF
    copies overlap: c_p = beta + gamma e^{i phi_p} (+ a small e^{-i phi_p} term), gamma real
    and positive. beta is the specimen's own correlation at k, the same in every frame: it
    biases each frame's phase alone (the autocorrelation estimate of Wicker et al. 2013 was
    0.1-0.6 rad off on the simulator's filaments), and it cancels in c_p - mean(c).

    The frames show the pattern when what varies from frame to frame outweighs beta by
    PATTERN_CONTRAST: a k that noise or sparse puncta passed off as the pattern gives frames
    that vary little there (measured on the SIM bench: 0.4-1.9 where k was wrong, 1.7-8.3
    where it was right)."""
    otf_k = _shifted_otf(prepared.psf, k, prepared.cutoff)
    overlap = (prepared.otf > 0.005) & (otf_k > 0.005)
    band0 = (raw.mean(axis=0) * otf_k)[overlap]
    moved = [(_shift_band(spectrum, k) * prepared.otf)[overlap] for spectrum in raw]
    c = np.array([np.vdot(band0, frame) for frame in moved])
    varying = c - c.mean()
    contrast = float(np.sqrt(np.mean(np.abs(varying) ** 2)) / max(abs(c.mean()), 1e-300))
    return _FramePhases(np.angle(varying), contrast)


def _modulation(
    b0: np.ndarray, b_plus_shifted: np.ndarray, prepared: _Prepared, otf_k: np.ndarray
) -> complex:
    """m/2 e^{i delta}: B+(q + k0) OTF(q) against B0(q) OTF(q + k0) where both are strong."""
    overlap = prepared.strong & (otf_k > 0.005)
    x = (b0 * otf_k)[overlap]
    y = (b_plus_shifted * prepared.otf)[overlap]
    denominator = np.sum(np.abs(x) ** 2)
    return complex(np.sum(np.conj(x) * y) / denominator) if denominator > 0 else 0j


def _prepare(
    frames: np.ndarray,
    psf_2x: np.ndarray,
    output_pixel_um: float,
    cutoff_per_um: float,
    settings: SimSettings,
) -> _Prepared:
    if output_pixel_um <= 0 or cutoff_per_um <= 0:
        raise ValueError("output_pixel_um and cutoff_per_um (2 NA / wavelength) must be positive")
    cutoff = cutoff_per_um * output_pixel_um
    if cutoff >= 0.5:
        raise ValueError(
            f"the detection cut-off {cutoff_per_um:g}/um is beyond the output grid's Nyquist"
            f" frequency at {output_pixel_um:g} um: the camera undersamples the raw frames"
        )
    spectra = _upsampled_spectra(_fade_borders(_checked(frames, settings), settings.border_px))
    psf = psf_at_origin(psf_2x, spectra.shape[-2:])
    fy, fx = _frequencies(psf.shape)
    radius = np.hypot(fy, fx)
    otf = np.where(radius <= cutoff, np.abs(fft.fft2(psf, workers=-1)), 0.0)
    return _Prepared(spectra, psf, otf, cutoff, radius)


def estimate_parameters(
    frames: np.ndarray,
    psf_2x: np.ndarray,
    output_pixel_um: float,
    cutoff_per_um: float,
    settings: SimSettings | None = None,
) -> SimParameters:
    """Pattern vector, phases and modulation of every angle from the raw frames alone
    (their central `estimate_crop_px` square; phases are stated for the whole frame).

    The angles of one setup share the pattern's period: an angle whose first search lands
    more than 3% off the others' median frequency (noise outshone its peak) is searched
    again in a narrow ring about that median."""
    settings = settings or SimSettings()
    frames = _checked(frames, settings)
    crop, origin = _central_crop(frames, settings.estimate_crop_px)
    prepared = _prepare(crop, psf_2x, output_pixel_um, cutoff_per_um, settings)
    cutoff = prepared.cutoff
    ring = (settings.search_ring[0] * cutoff, settings.search_ring[1] * cutoff)
    nominal = 2 * np.pi * np.arange(settings.phases) / settings.phases
    raws = [
        prepared.spectra[a * settings.phases : (a + 1) * settings.phases]
        for a in range(settings.angles)
    ]
    ks = [_pattern_vector(separate_bands(raw, nominal), prepared, ring) for raw in raws]
    magnitude = float(np.median([np.hypot(*k) for k in ks]))
    good = [abs(np.hypot(*k) / magnitude - 1) <= 0.03 for k in ks]
    # one setup, one period: unless two angles agree on it, what was found is noise (sparse
    # puncta, too few photons) and no angle counts as patterned
    seen = sum(good) >= min(2, settings.angles)
    measured = [_frame_phases(raw, prepared, k) for raw, k in zip(raws, ks, strict=True)]
    good = _without_repeated_directions(ks, good, [m.contrast for m in measured], settings.angles)
    if seen and not all(good):
        # evenly spread angles, 180/A degrees apart: look where no good angle is
        first = np.arctan2(*ks[good.index(True)])
        taken = [np.arctan2(*k) for k, ok in zip(ks, good, strict=True) if ok]
        free = [
            first + j * np.pi / settings.angles
            for j in range(settings.angles)
            if all(_turn(first + j * np.pi / settings.angles - t) > np.radians(10) for t in taken)
        ]
        window = (0.98 * magnitude, 1.02 * magnitude, *free)
        for a, raw in enumerate(raws):
            if not good[a]:
                ks[a] = _pattern_vector(separate_bands(raw, nominal), prepared, window)
                measured[a] = _frame_phases(raw, prepared, ks[a])
    phases, modulations = [], []
    for raw, k, frame_phases in zip(raws, ks, measured, strict=True):
        phi = frame_phases.phases
        bands = separate_bands(raw, phi)
        otf_k = _shifted_otf(prepared.psf, k, cutoff)
        m = 2 * abs(_modulation(bands[0], _shift_band(bands[1], k), prepared, otf_k))
        if not seen or m < settings.min_modulation or not frame_phases.usable:
            m, phi = 0.0, nominal  # no pattern found: this angle counts as widefield only
        phases.append([float(p) for p in phi])
        modulations.append(float(min(m, 1.5)))
    phases = [_at_origin(row, k, origin) for row, k in zip(phases, ks, strict=True)]
    return SimParameters(
        k=[(float(k[0]), float(k[1])) for k in ks],
        phases=phases,
        modulation=modulations,
        output_pixel_um=output_pixel_um,
    )


def _without_repeated_directions(
    ks: list[np.ndarray], good: list[bool], contrasts: list[float], angles: int
) -> list[bool]:
    """`good` less the angles that found another angle's direction: the angles of a sequence
    point 180/A degrees apart, so of two good ones within 90/A degrees of each other the one
    whose frames vary less there saw the specimen's structure or a neighbour's pattern (a
    sparse scene at 30 photons put its third angle 7 degrees from the second), and is
    searched again where no angle is."""
    good = list(good)
    for i, j in itertools.combinations(range(len(ks)), 2):
        close = _turn(np.arctan2(*ks[i]) - np.arctan2(*ks[j])) < np.pi / (2 * angles)
        if good[i] and good[j] and close:
            good[i if contrasts[i] < contrasts[j] else j] = False
    return good


def _at_origin(phases: list[float], k: np.ndarray, origin: np.ndarray) -> list[float]:
    """A crop's phases at the whole frame's origin: cos(2 pi k.(r - o) + phi)."""
    return [float(np.angle(np.exp(1j * (p - 2 * np.pi * np.dot(k, origin))))) for p in phases]


def refresh_phases(
    frames: np.ndarray,
    psf_2x: np.ndarray,
    output_pixel_um: float,
    cutoff_per_um: float,
    parameters: SimParameters,
    settings: SimSettings | None = None,
) -> SimParameters:
    """`parameters` with the phases of every patterned angle measured again in `frames`
    (pattern vectors and modulation kept): a pattern that drifts sideways over a long
    acquisition (thermal drift of the grating or SLM image) shifts its phases, and a stale
    pattern then reconstructs with artefacts. About the cost of one reconstruction. An angle
    whose new phases would make the band separation ill-conditioned keeps the old ones."""
    settings = settings or SimSettings()
    frames = _checked(frames, settings)
    crop, origin = _central_crop(frames, settings.estimate_crop_px)
    prepared = _prepare(crop, psf_2x, output_pixel_um, cutoff_per_um, settings)
    phases = []
    for a, (k_a, old, m) in enumerate(
        zip(parameters.k, parameters.phases, parameters.modulation, strict=True)
    ):
        raw = prepared.spectra[a * settings.phases : (a + 1) * settings.phases]
        k = np.asarray(k_a)
        if m > 0 and (measured := _frame_phases(raw, prepared, k)).usable:
            phases.append(_at_origin(list(measured.phases), k, origin))
        else:
            phases.append(list(old))
    return parameters.model_copy(update={"phases": phases})


def _central_crop(frames: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The central size x size part of the frames, and its origin on the output grid."""
    ny, nx = frames.shape[-2:]
    y0, x0 = max((ny - size) // 2, 0), max((nx - size) // 2, 0)
    crop = frames[:, y0 : y0 + min(size, ny), x0 : x0 + min(size, nx)]
    return crop, UPSCALE * np.array([y0, x0], dtype=float)


def wiener_constant(prepared: _Prepared) -> float:
    """w from the data: the ratio of the noise's power (where the camera grid holds no light:
    beyond the cut-off, below the camera's Nyquist frequency) to the specimen's power at half
    the cut-off (the band-0 power there, less noise, through the OTF)."""
    spectra, otf, cutoff = prepared.spectra, prepared.otf, prepared.cutoff
    fy, fx = _frequencies(otf.shape)
    radius = np.hypot(fy, fx)
    camera_band = (np.abs(fy) < 0.24) & (np.abs(fx) < 0.24)
    outside = camera_band & (radius > 1.1 * cutoff)
    middle = (radius > 0.55 * cutoff) & (radius < 0.75 * cutoff)
    if not outside.any():
        raise ValueError("the camera grid has no frequencies beyond the cut-off to gauge noise")
    power = np.mean(np.abs(spectra) ** 2, axis=0)  # per raw frame
    noise = float(power[outside].mean())
    signal_power = float(np.mean(np.clip(power[middle] - noise, 0, None) / otf[middle] ** 2))
    return float(np.sqrt(noise / max(signal_power, 1e-12)))


# -- reconstruction --------------------------------------------------------------------------


def _checked(frames: np.ndarray, settings: SimSettings) -> np.ndarray:
    frames = np.asarray(frames, dtype=np.float64)
    expected = settings.angles * settings.phases
    if frames.ndim != 3 or frames.shape[0] != expected:
        raise ValueError(
            f"SIM needs {expected} raw frames ({settings.angles} angles x {settings.phases}"
            f" phases, angle by angle) as (N, Y, X); got shape {frames.shape}"
        )
    if min(frames.shape[-2:]) < 32:
        raise ValueError(f"SIM frames must be at least 32 x 32 pixels, got {frames.shape[-2:]}")
    if not np.all(np.isfinite(frames)):
        raise ValueError("SIM frames hold NaN or infinite values")
    return frames


def _notch(shape: tuple[int, int], centre: np.ndarray, cutoff: float, s: SimSettings) -> np.ndarray:
    fy, fx = _frequencies(shape)
    distance2 = (fy - centre[0]) ** 2 + (fx - centre[1]) ** 2
    return 1 - s.notch_strength * np.exp(-distance2 / (2 * (s.notch_width * cutoff) ** 2))


def _wrapped(k: np.ndarray) -> np.ndarray:
    return (k + 0.5) % 1.0 - 0.5


@dataclass(frozen=True)
class _WienerTerms:
    """What the generalised Wiener filter takes from the pattern (vectors and modulation),
    the PSF and the frame size, not from the data or the phases: each angle's bands with
    their shift and weight (notch^2 x transfer), the denominator, the apodisation. A live
    stream keeps its pattern, so these are built once (`_terms_for`) and reused."""

    bands: list[list[tuple[int, np.ndarray, np.ndarray]]]  # per angle: (band, shift, weight)
    denominator: np.ndarray
    apodization: np.ndarray


def _build_terms(
    prepared: _Prepared, settings: SimSettings, parameters: SimParameters
) -> _WienerTerms:
    psf, otf, cutoff = prepared.psf, prepared.otf, prepared.cutoff
    shape = otf.shape
    denominator = np.zeros(shape)
    bands: list[list[tuple[int, np.ndarray, np.ndarray]]] = []
    reach = 0.0
    for a in range(settings.angles):
        k = np.asarray(parameters.k[a])
        half_m = parameters.modulation[a] / 2
        # each band on the specimen's frequencies: data M_j = H_j S, with its transfer H_j
        # (B+ moved by k0 sees (m/2) OTF(q + k0)); each notched at the band's own centre.
        # No pattern found for an angle: its mean is a widefield image, band 0 alone
        shifts = [(0, 0 * k, 1.0)] + ([(1, k, half_m), (2, -k, half_m)] if half_m > 0 else [])
        if half_m > 0:  # the support extends only where a pattern was found
            reach = max(reach, float(np.hypot(*k)))
        terms = []
        for band, shift, weight in shifts:
            transfer = weight * (_shifted_otf(psf, shift, cutoff) if shift.any() else otf)
            notch = _notch(shape, _wrapped(-shift), cutoff, settings)
            terms.append((band, shift, notch**2 * transfer))
            denominator += (notch * transfer) ** 2
        bands.append(terms)
    fy, fx = _frequencies(shape)
    support = settings.apodization * (cutoff + reach)
    return _WienerTerms(bands, denominator, np.clip(1 - np.hypot(fy, fx) / support, 0, None))


_TERMS_KEPT = 2  # live streams share one pattern per (position, channel); each set is ~10 maps
_terms_cache: OrderedDict[tuple[object, ...], _WienerTerms] = OrderedDict()
_terms_lock = threading.Lock()


def _terms_for(
    prepared: _Prepared, psf_2x: np.ndarray, settings: SimSettings, parameters: SimParameters
) -> _WienerTerms:
    """The filter terms of this pattern, PSF, frame size and settings: from the last few
    built, or built now."""
    key = (
        prepared.otf.shape,
        prepared.cutoff,
        hashlib.sha1(np.ascontiguousarray(psf_2x, dtype=np.float64).tobytes()).hexdigest(),
        settings.model_dump_json(exclude={"wiener"}),
        tuple(tuple(k) for k in parameters.k),
        tuple(parameters.modulation),
    )
    with _terms_lock:
        if key in _terms_cache:
            _terms_cache.move_to_end(key)
            return _terms_cache[key]
    terms = _build_terms(prepared, settings, parameters)
    with _terms_lock:
        _terms_cache[key] = terms
        while len(_terms_cache) > _TERMS_KEPT:
            _terms_cache.popitem(last=False)
    return terms


def reconstruct(
    frames: np.ndarray,
    psf_2x: np.ndarray,
    output_pixel_um: float,
    cutoff_per_um: float,
    settings: SimSettings | None = None,
    parameters: SimParameters | None = None,
) -> SimResult:
    """The SR image of one set of raw frames (photoelectrons, angle by angle), estimating the
    pattern from them unless `parameters` are given (a live run estimates once and reuses).
    `psf_2x` is the detection PSF on the output grid, `cutoff_per_um` its cut-off 2 NA/lambda."""
    settings = settings or SimSettings()
    if parameters is None:
        parameters = estimate_parameters(frames, psf_2x, output_pixel_um, cutoff_per_um, settings)
    prepared = _prepare(frames, psf_2x, output_pixel_um, cutoff_per_um, settings)
    terms = _terms_for(prepared, psf_2x, settings, parameters)
    numerator = np.zeros(prepared.otf.shape, dtype=complex)
    for a, angle_terms in enumerate(terms.bands):
        raw = prepared.spectra[a * settings.phases : (a + 1) * settings.phases]
        separated = separate_bands(raw, np.asarray(parameters.phases[a]))
        for band, shift, weight in angle_terms:
            moved = _shift_band(separated[band], shift) if shift.any() else separated[band]
            numerator += weight * moved
    w = settings.wiener if settings.wiener is not None else wiener_constant(prepared)
    estimate = numerator / (terms.denominator + w**2) * terms.apodization
    # photometry: the DC term is the raw frames' flux (before their borders were faded),
    # unattenuated by notch or Wiener constant
    estimate[0, 0] = float(np.mean(np.sum(frames, axis=(-2, -1))))
    image = fft.ifft2(estimate, workers=-1).real
    return SimResult(
        image=image.astype(np.float32),
        widefield=np.asarray(frames, dtype=np.float32).mean(axis=0),
        parameters=parameters,
    )
