"""Image quality: PSNR and SSIM against ground truth, and resolution without ground truth.

Resolution uses image decorrelation analysis (Descloux, Grussmayer and Radenovic, Nat Methods
2019): the correlation between an image's spectrum and its phase-only (whitened) spectrum,
as a function of the cut-off radius, peaks where signal gives way to noise. Repeating it on
high-pass filtered copies finds the highest frequency that still carries signal.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _pair(estimate: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Both as float64, checked to match, with the truth's dynamic range."""
    truth = np.asarray(truth, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if estimate.shape != truth.shape:
        raise ValueError(f"shapes differ: estimate {estimate.shape}, truth {truth.shape}")
    data_range = float(truth.max() - truth.min())
    if data_range <= 0:
        raise ValueError("truth is constant: the metric is undefined")
    return estimate, truth, data_range


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB over the truth's dynamic range; both arrays in the same (photon) units."""
    estimate, truth, data_range = _pair(estimate, truth)
    return float(peak_signal_noise_ratio(truth, estimate, data_range=data_range))


def ssim(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Structural similarity over the truth's dynamic range."""
    estimate, truth, data_range = _pair(estimate, truth)
    return float(structural_similarity(truth, estimate, data_range=data_range))


def _apodize(image: np.ndarray, edge_px: int) -> np.ndarray:
    """Cosine edge taper so the frame border does not put a cross into the spectrum."""
    out = image - image.mean()
    for axis, n in enumerate(out.shape):
        ramp = np.ones(n)
        k = min(edge_px, n // 4)
        taper = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
        ramp[:k], ramp[n - k :] = taper, taper[::-1]
        shape = [1] * out.ndim
        shape[axis] = n
        out = out * ramp.reshape(shape)
    return out


def _decorrelation_curve(spectrum: np.ndarray, radius: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """d(r) for every cut-off r of the normalised-frequency grid."""
    whitened = spectrum / np.maximum(np.abs(spectrum), 1e-12)
    cross = np.real(spectrum * np.conj(whitened))  # = |I(k)|
    power = np.abs(spectrum) ** 2
    order = np.argsort(radius, axis=None)
    r_sorted = radius.ravel()[order]
    cum_cross = np.cumsum(cross.ravel()[order])
    cum_white = np.cumsum(np.ones_like(r_sorted))  # |whitened|^2 == 1 inside the mask
    total_power = power.sum()
    idx = np.searchsorted(r_sorted, radii, side="right") - 1
    valid = idx >= 0
    d = np.zeros_like(radii)
    d[valid] = cum_cross[idx[valid]] / np.sqrt(total_power * cum_white[idx[valid]])
    return d


def _peak(d: np.ndarray, radii: np.ndarray, min_amplitude: float) -> float:
    """Position of the maximum of d(r); 0 when it is too weak or sits at the Nyquist end."""
    i = int(np.argmax(d))
    if d[i] < min_amplitude or i >= len(d) - 2:
        return 0.0
    return float(radii[i])


def decorrelation_resolution(
    image: np.ndarray,
    pixel_size_um: float,
    n_radii: int = 100,
    n_filters: int = 10,
    min_amplitude: float = 0.05,
) -> float:
    """Resolution (um) of a 2D image by decorrelation analysis; inf when no signal is found."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"decorrelation analysis takes one 2D image, got shape {image.shape}")
    ny, nx = image.shape
    fy = np.fft.fftfreq(ny)[:, None] * 2  # 1.0 = Nyquist
    fx = np.fft.fftfreq(nx)[None, :] * 2
    radius = np.sqrt(fy**2 + fx**2)
    radii = np.linspace(0.0, 1.0, n_radii + 1)[1:]
    apodized = _apodize(image, edge_px=max(min(ny, nx) // 16, 2))

    peaks = [
        _peak(_decorrelation_curve(np.fft.fft2(apodized), radius, radii), radii, min_amplitude)
    ]
    # High-pass filters from coarse to fine: sigma spans the frame size down to ~ one pixel.
    for sigma in np.exp(np.linspace(np.log(min(ny, nx) / 4), np.log(0.15), n_filters)):
        high_pass = apodized - ndimage.gaussian_filter(apodized, sigma)
        curve = _decorrelation_curve(np.fft.fft2(high_pass), radius, radii)
        peaks.append(_peak(curve, radii, min_amplitude))
    k_c = max(peaks)
    return float("inf") if k_c <= 0 else 2.0 * pixel_size_um / k_c


def find_puncta(
    image: np.ndarray, fwhm_px: float, count: int = 20, isolation: float = 3.0
) -> np.ndarray:
    """Centres (row, col) of up to `count` of the brightest isolated puncta.

    Peaks are local maxima of a lightly smoothed copy; a peak is isolated when no other peak
    of at least half its amplitude lies within `isolation` FWHM, and it is that far from the
    border, so a radial profile around it sees the punctum alone.
    """
    smooth = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), fwhm_px / 4)
    radius = int(np.ceil(isolation * fwhm_px))
    is_peak = smooth == ndimage.maximum_filter(smooth, size=max(int(fwhm_px), 3))
    background = np.median(smooth)
    rows, cols = np.nonzero(is_peak & (smooth > background))
    amplitude = smooth[rows, cols] - background
    order = np.argsort(amplitude)[::-1]
    rows, cols, amplitude = rows[order], cols[order], amplitude[order]
    ny, nx = smooth.shape
    chosen: list[tuple[int, int]] = []
    for r, c, a in zip(rows, cols, amplitude, strict=True):
        if not (radius <= r < ny - radius and radius <= c < nx - radius):
            continue
        near = (np.abs(rows - r) <= radius) & (np.abs(cols - c) <= radius)
        near &= np.hypot(rows - r, cols - c) <= radius
        if np.any(near & (amplitude >= a / 2) & ~((rows == r) & (cols == c))):
            continue
        chosen.append((int(r), int(c)))
        if len(chosen) == count:
            break
    return np.array(chosen, dtype=int).reshape(-1, 2)


def ringing(
    image: np.ndarray,
    centres: np.ndarray,
    fwhm_px: float,
    reference: np.ndarray | None = None,
) -> dict[str, float]:
    """Ringing around puncta, relative to each punctum's amplitude above its surroundings.

    The surroundings' level comes from `reference` (the raw frame on the same grid and in the
    same units; default: the image itself) smoothed by one FWHM: the 20th percentile of the
    ring 3 to 5 FWHM out, beyond the reach of the blur, so every restoration of a frame is held
    to the same level. `undershoot`: how far the darkest pixels (5th percentile) of the ring 1
    to 3 FWHM out fall below that level, where negative lobes (dark halos) appear; noise
    counts too, so compare with the raw frame's value. `overshoot`: how far the azimuthal mean
    profile climbs again beyond its minimum (a bright ring). Medians over the puncta.
    """
    image = np.asarray(image, dtype=np.float64)
    reference = image if reference is None else np.asarray(reference, dtype=np.float64)
    if reference.shape != image.shape:
        raise ValueError(f"reference {reference.shape} and image {image.shape} differ")
    smooth = ndimage.gaussian_filter(reference, fwhm_px / 2.355)
    outer = int(np.ceil(5 * fwhm_px))
    yy, xx = np.mgrid[-outer : outer + 1, -outer : outer + 1]
    distance = np.hypot(yy, xx) / fwhm_px
    near, far = (distance >= 1) & (distance <= 3), (distance >= 3) & (distance <= 5)
    bins = np.minimum((distance * 4).astype(int), 12)  # quarter-FWHM rings out to 3 FWHM
    ny, nx = image.shape
    under, over = [], []
    for r, c in centres:
        if not (outer <= r < ny - outer and outer <= c < nx - outer):
            continue
        window = (slice(r - outer, r + outer + 1), slice(c - outer, c + outer + 1))
        patch = image[window]
        level = np.percentile(smooth[window][far], 20)
        amplitude = patch[outer - 1 : outer + 2, outer - 1 : outer + 2].max() - level
        if amplitude <= 0:
            continue
        under.append(max(level - np.percentile(patch[near], 5), 0.0) / amplitude)
        profile = ndimage.mean(patch, bins, np.arange(12))
        lowest = int(np.argmin(profile))
        over.append(max(profile[lowest:].max() - profile[lowest], 0.0) / amplitude)
    if not under:
        raise ValueError("no puncta to measure ringing around (none inside, none above)")
    return {"undershoot": float(np.median(under)), "overshoot": float(np.median(over))}
