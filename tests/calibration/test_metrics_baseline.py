from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from livedecon.calibration._baseline import best_richardson_lucy, upsample_2x
from livedecon.calibration._forward_model import ForwardModel, counts_to_electrons
from livedecon.calibration._metrics import (
    decorrelation_resolution,
    find_puncta,
    psnr,
    ringing,
    ssim,
)
from livedecon.calibration._psf import theoretical_psf


def test_psnr_and_ssim_rank_estimates():
    rng = np.random.default_rng(0)
    truth = ndimage.gaussian_filter(rng.random((64, 64)), 2) * 100
    close = truth + rng.normal(0, 0.5, truth.shape)
    far = truth + rng.normal(0, 5, truth.shape)
    assert psnr(close, truth) > psnr(far, truth) + 15  # 10x the noise: 20 dB
    assert ssim(close, truth) > ssim(far, truth)
    assert psnr(truth + 1e-3, truth) > 60


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_metrics_refuse_mismatched_shapes(metric):
    with pytest.raises(ValueError, match="shapes differ"):
        metric(np.zeros((8, 8)), np.ones((8, 9)))


def test_psnr_refuses_constant_truth():
    with pytest.raises(ValueError, match="constant"):
        psnr(np.zeros((8, 8)), np.ones((8, 8)))


def _points(blur_px: float, noise: bool) -> np.ndarray:
    rng = np.random.default_rng(1)
    image = np.zeros((256, 256))
    idx = rng.integers(0, 256, (400, 2))
    image[idx[:, 0], idx[:, 1]] = 1.0
    image = ndimage.gaussian_filter(image, blur_px) * 1000
    return rng.poisson(image + 5).astype(float) if noise else image


def test_decorrelation_resolution_tracks_blur():
    """Noise-free: the measured resolution is the blur's FWHM (2.355 sigma) within 15%.

    With shot noise the finest frequencies drown and the measured value is coarser (here 1.2x
    to 1.5x the FWHM), but it still grows with the blur.
    """
    sigmas = (1.5, 3.0, 4.0)
    clean = [decorrelation_resolution(_points(s, False), 0.1) for s in sigmas]
    noisy = [decorrelation_resolution(_points(s, True), 0.1) for s in sigmas]
    for sigma, c, n in zip(sigmas, clean, noisy, strict=True):
        fwhm = 2.355 * sigma * 0.1
        assert c == pytest.approx(fwhm, rel=0.15)
        assert fwhm <= n <= 1.6 * fwhm
    assert noisy == sorted(noisy)


def test_decorrelation_of_pure_noise_finds_no_resolution():
    noise = np.random.default_rng(2).normal(size=(128, 128))
    assert np.isinf(decorrelation_resolution(noise, 1.0))


def test_upsample_preserves_flux():
    image = np.random.default_rng(3).random((32, 32))
    fine = upsample_2x(image)
    assert fine.shape == (64, 64)
    assert fine.sum() == pytest.approx(image.sum(), rel=0.01)


def test_richardson_lucy_beats_interpolated_raw(small_microscope):
    scope = small_microscope
    model = ForwardModel(scope)
    obs = model.acquire(0.0, 0.0, 50)
    electrons = counts_to_electrons(obs.counts, scope.camera)
    background = scope.sample.background_photons_px_s * 0.05
    psf = theoretical_psf(scope.optics, model.truth_pixel_um, 63)[0]
    raw_psnr = psnr(np.clip(upsample_2x(electrons) - background / 4, 0, None), obs.truth)
    iterations, rl_psnr, estimate = best_richardson_lucy(
        electrons, psf, obs.truth, background_e=background
    )
    assert estimate.shape == obs.truth.shape
    assert iterations > 1
    assert rl_psnr > raw_psnr + 0.3


def _puncta_image(ring_depth: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Gaussian puncta (FWHM 6 px) on a background of 10; each with a dark ring of
    `ring_depth` x its amplitude 1.5 FWHM out, and a bright one beyond it, as ringing makes."""
    yy, xx = np.mgrid[:160, :160]
    image = np.full((160, 160), 10.0)
    centres = [(40, 40), (40, 120), (120, 40), (120, 120)]
    sigma = 6 / 2.355
    for cy, cx in centres:
        r = np.hypot(yy - cy, xx - cx)
        image += 100 * np.exp(-(r**2) / (2 * sigma**2))
        image -= 100 * ring_depth * np.exp(-((r - 9) ** 2) / 8)
        image += 50 * ring_depth * np.exp(-((r - 14) ** 2) / 8)
    return image, centres


def test_ringing_is_zero_for_clean_puncta_and_grows_with_rings():
    clean, centres = _puncta_image(0.0)
    found = find_puncta(clean, 6.0, count=10)
    assert sorted(map(tuple, found)) == centres
    assert ringing(clean, found, 6.0) == pytest.approx({"undershoot": 0, "overshoot": 0}, abs=0.01)
    rings = ringing(_puncta_image(0.1)[0], found, 6.0)
    assert 0.07 < rings["undershoot"] < 0.13
    assert 0.05 < rings["overshoot"] < 0.2
    with pytest.raises(ValueError, match="no puncta"):
        ringing(clean, np.empty((0, 2), int), 6.0)


def test_find_puncta_skips_crowded_and_border_peaks():
    image, _ = _puncta_image(0.0)
    yy, xx = np.mgrid[:160, :160]
    image += 80 * np.exp(-((yy - 40) ** 2 + (xx - 48) ** 2) / 4)  # a close, bright neighbour
    image += 100 * np.exp(-((yy - 3) ** 2 + (xx - 80) ** 2) / 4)  # at the border
    found = {tuple(c) for c in find_puncta(image, 6.0, count=10)}
    assert (40, 40) not in found
    assert all(5 < r < 155 for r, _ in found)
    assert {(40, 120), (120, 40), (120, 120)} <= found
