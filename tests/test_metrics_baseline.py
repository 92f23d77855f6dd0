from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from livedecon.calibration.baseline import best_richardson_lucy, upsample_2x
from livedecon.calibration.forward_model import ForwardModel, counts_to_electrons
from livedecon.calibration.metrics import decorrelation_resolution, psnr, ssim
from livedecon.calibration.psf import theoretical_psf


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
