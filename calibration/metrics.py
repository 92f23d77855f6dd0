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
        chosen.append((r, c))
        if len(chosen) == count:
            break
    return np.array(chosen, dtype=int).reshape(-1, 2)


def ringing(image: np.ndarray, centres: np.ndarray, fwhm_px: float) -> dict[str, float]:
    """Ringing around puncta, from their azimuthally averaged radial profiles.

    Per punctum, relative to its amplitude above the local background (the profile's median
    between 2.5 and 3 FWHM): `undershoot` is how far the profile dips below that background
    (a dark ring, what negative lobes become in a non-negative image) and `overshoot` how far
    it climbs again beyond its minimum (a bright ring). Medians over the puncta; 0 for a
    clean, monotonic fall-off.
    """
    image = np.asarray(image, dtype=np.float64)
    if len(centres) == 0:
        raise ValueError("no puncta to measure ringing around")
    outer = int(np.ceil(3 * fwhm_px))
    yy, xx = np.mgrid[-outer : outer + 1, -outer : outer + 1]
    distance = np.hypot(yy, xx)
    bins = np.minimum((distance / (fwhm_px / 4)).astype(int), 12)  # quarter-FWHM rings
    under, over = [], []
    for r, c in centres:
        patch = image[r - outer : r + outer + 1, c - outer : c + outer + 1]
        profile = ndimage.mean(patch, bins, np.arange(12))
        far = np.median(patch[(distance >= 2.5 * fwhm_px) & (distance <= 3 * fwhm_px)])
        amplitude = patch[outer - 1 : outer + 2, outer - 1 : outer + 2].max() - far
        if amplitude <= 0:
            continue
        first_min = int(np.argmin(profile))
        under.append(max(far - profile.min(), 0.0) / amplitude)
        after = profile[first_min:]
        over.append(max(after.max() - profile[first_min], 0.0) / amplitude)
    if not under:
        raise ValueError("no punctum stands above its background")
    return {"undershoot": float(np.median(under)), "overshoot": float(np.median(over))}
