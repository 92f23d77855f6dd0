from __future__ import annotations

import numpy as np
import pytest
import torch

from livedecon.engines._self_supervised import (
    LossConfig,
    RecorruptionConfig,
    auto_precondition,
    estimate_beta2,
    hessian_penalty,
    reblur,
    reblur_3d,
    recorrupt,
    whiten,
    zs_deconv_loss,
    zs_deconv_loss_3d,
)


def _noisy(level: float, read_noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.full((4, 1, 128, 128), level)
    noisy = torch.poisson(clean, generator=g) + read_noise * torch.randn(clean.shape, generator=g)
    return clean, noisy


def test_recorrupted_input_and_target_have_independent_noise():
    """With beta1 = 1 and beta2 = read noise^2 (photoelectron units) the pair's noises are
    uncorrelated and the target is unbiased: what makes the self-supervision valid."""
    clean, noisy = _noisy(20.0, 2.0)
    config = RecorruptionConfig(beta1_range=(1.0, 1.0), alpha_range=(1.5, 1.5), beta2=4.0)
    inputs, target = recorrupt(noisy, config, torch.Generator().manual_seed(1))
    n_in, n_tg = (inputs - clean).flatten(), (target - clean).flatten()
    assert abs(torch.corrcoef(torch.stack([n_in, n_tg]))[0, 1]) < 0.02
    assert abs(n_tg.mean()) < 0.05
    # input noise variance: (1 + alpha^2) * (shot + read)
    assert n_in.var() == pytest.approx((1 + 1.5**2) * 24.0, rel=0.05)


def test_beta2_estimated_from_background():
    for level in (5.0, 20.0):
        _, noisy = _noisy(level, 2.0, seed=3)
        assert estimate_beta2(noisy) == pytest.approx(4.0, rel=0.25)


def test_reblur_of_a_point_is_the_pooled_psf():
    psf = torch.zeros(5, 5)
    psf[2, 2], psf[2, 3] = 0.5, 0.5
    fine = torch.zeros(1, 1, 16, 16)
    fine[0, 0, 8, 8] = 4.0
    coarse = reblur(fine, psf, upscale=2)
    assert coarse.shape == (1, 1, 8, 8)
    assert coarse.sum() == pytest.approx(1.0)  # average pooling: flux / 4


def test_hessian_penalty_ignores_ramps_and_punishes_curvature():
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    assert hessian_penalty((2 * x + 3 * y)[None, None]) == pytest.approx(0.0, abs=1e-9)
    assert hessian_penalty(((x - 8) ** 2)[None, None]) > 1.0


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_loss_is_zero_for_a_perfect_reconstruction(norm):
    psf = torch.zeros(3, 3)
    psf[1, 1] = 1.0
    target = torch.rand(2, 1, 8, 8)
    deconvolved = target.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    parts = zs_deconv_loss(
        target, deconvolved, target, psf, LossConfig(norm=norm, hessian_weight=0.0)
    )
    assert parts["denoise"] == pytest.approx(0.0, abs=1e-7)
    assert parts["deconv"] == pytest.approx(0.0, abs=1e-7)
    worse = zs_deconv_loss(target + 0.1, deconvolved, target, psf, LossConfig(norm=norm))
    assert worse["total"] > parts["total"]


def test_deconvolution_loss_is_exact_on_a_patch_cut_from_a_larger_scene():
    """Light from outside a patch blurs into its border; the loss leaves that border out, so
    the true specimen of the patch scores zero."""
    torch.manual_seed(0)
    scene = torch.rand(1, 1, 64, 64)
    psf = torch.rand(7, 7)
    psf /= psf.sum()
    camera = reblur(scene, psf, upscale=2)  # (1, 1, 32, 32)
    patch, target = scene[..., 16:48, 16:48], camera[..., 8:24, 8:24]
    parts = zs_deconv_loss(target, patch, target, psf, LossConfig(hessian_weight=0.0))
    assert parts["deconv"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="too small for the PSF"):
        zs_deconv_loss(
            target[..., :4, :4], patch[..., :8, :8], target[..., :4, :4], psf, LossConfig()
        )


def test_stacks_are_recorrupted_plane_by_plane_with_independent_noise():
    g = torch.Generator().manual_seed(5)
    clean = torch.full((2, 1, 6, 64, 64), 20.0)
    noisy = torch.poisson(clean, generator=g) + 2.0 * torch.randn(clean.shape, generator=g)
    config = RecorruptionConfig(beta1_range=(1.0, 1.0), alpha_range=(1.0, 1.0), beta2=4.0)
    inputs, target = recorrupt(noisy, config, torch.Generator().manual_seed(1))
    assert inputs.shape == target.shape == noisy.shape
    n_in, n_tg = (inputs - clean).flatten(), (target - clean).flatten()
    assert abs(torch.corrcoef(torch.stack([n_in, n_tg]))[0, 1]) < 0.03
    assert n_in.var() == pytest.approx(2 * 24.0, rel=0.05)


def test_a_known_background_and_the_sparsity_term_enter_the_loss():
    """The background joins the forward model (a background-free specimen scores zero against
    a frame with background), and the L1 sparsity term grows the total by weight x mean |x|."""
    psf = torch.zeros(3, 3)
    psf[1, 1] = 1.0
    specimen = torch.rand(2, 1, 8, 8)
    frame = specimen + 0.3
    deconvolved = specimen.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    plain = LossConfig(norm="l2", hessian_weight=0.0)
    with_background = zs_deconv_loss(frame, deconvolved, frame, psf, plain, background=0.3)
    without = zs_deconv_loss(frame, deconvolved, frame, psf, plain)
    assert with_background["deconv"] == pytest.approx(0.0, abs=1e-7)
    assert without["deconv"] == pytest.approx(0.09, rel=1e-4)
    sparse = LossConfig(norm="l2", hessian_weight=0.0, sparsity_weight=0.1)
    penalised = zs_deconv_loss(frame, deconvolved, frame, psf, sparse, background=0.3)
    expected = 0.1 * float(deconvolved.abs().mean())
    assert float(penalised["total"] - with_background["total"]) == pytest.approx(expected)


def _gaussian_psf(sigma: float, k: int = 15) -> torch.Tensor:
    x = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    psf = g[:, None] * g[None, :]
    return psf / psf.sum()


def test_whitening_lifts_what_the_psf_attenuates_and_keeps_what_it_passes():
    psf = _gaussian_psf(2.0)
    x = torch.arange(32.0).expand(32, 32)
    slow = torch.cos(2 * torch.pi * x / 32)[None, None]  # one cycle per patch: passed
    fast = torch.cos(2 * torch.pi * 10 * x / 32)[None, None]  # where the OTF is ~0.1

    def lift(wave: torch.Tensor, eps: float) -> float:
        return float(whiten(wave, psf, 2, eps).std() / wave.std())

    assert lift(slow, 0.01) == pytest.approx(1.0, rel=0.05)
    assert lift(fast, 0.01) > 3
    # a larger eps lifts less: the setting is how far to trust the data's high frequencies
    assert lift(fast, 1.0) < lift(fast, 0.01)


def test_whitening_in_3d_lifts_the_axial_frequencies_a_psf_larger_than_the_patch_attenuates():
    z = torch.arange(9.0) - 4
    axial = torch.exp(-(z**2) / (2 * 1.5**2))
    psf = axial[:, None, None] * _gaussian_psf(2.0)[None]
    psf = psf / psf.sum()  # (9, 15, 15): deeper and wider (7 px on the input grid) than...
    patch = (1, 1, 6, 8, 8)  # ...this residual, so the OTF comes from the wrapped kernel
    flat = torch.ones(patch)
    alternating = ((-1.0) ** torch.arange(6.0))[:, None, None].expand(patch).contiguous()

    def lift(wave: torch.Tensor, eps: float) -> float:
        return float(whiten(wave, psf, 2, eps).std() / wave.std())

    # zero frequency passes as it is
    assert float(whiten(flat, psf, 2, 0.01).mean()) == pytest.approx(1 / 1.01**0.5, rel=1e-4)
    assert lift(alternating, 0.01) > 5  # the axial Nyquist, which the PSF all but removes
    assert lift(alternating, 1.0) < lift(alternating, 0.01)


def test_preconditioning_in_3d_keeps_a_perfect_reconstruction_at_zero_loss():
    z = torch.arange(5.0) - 2
    psf = torch.exp(-(z**2) / 2)[:, None, None] * _gaussian_psf(1.5, 9)[None]
    psf = psf / psf.sum()
    sharp = torch.rand(1, 1, 6, 32, 32)
    target = reblur_3d(sharp, psf, 2)
    config = LossConfig(norm="l2", precondition=0.05)
    parts = zs_deconv_loss_3d(target, sharp, target, None, psf, config, 2)
    assert float(parts["deconv"]) < 1e-10
    noisy = zs_deconv_loss_3d(target, sharp, target + 0.1, None, psf, config, 2)
    assert float(noisy["deconv"]) > 1e-4
    with pytest.raises(ValueError, match="auto"):
        zs_deconv_loss_3d(target, sharp, target, None, psf, LossConfig(precondition="auto"), 2)


def test_preconditioning_keeps_a_perfect_reconstruction_at_zero_loss():
    psf = _gaussian_psf(1.5, 9)
    sharp = torch.rand(2, 1, 48, 48)
    target = reblur(sharp, psf, 2)
    config = LossConfig(norm="l2", precondition=0.05)
    parts = zs_deconv_loss(target, sharp, target, psf, config, 2)
    assert float(parts["deconv"]) < 1e-10
    with pytest.raises(ValueError, match="auto"):
        zs_deconv_loss(target, sharp, target, psf, LossConfig(precondition="auto"), 2)


def test_auto_precondition_trusts_high_frequencies_more_in_brighter_frames():
    rng = np.random.default_rng(0)
    specimen = np.zeros((128, 128))
    specimen[::16, :] = 1.0
    eps = []
    for photons in (5.0, 50.0, 500.0):
        frame = rng.poisson(photons * specimen + 2.0).astype(np.float32)
        eps.append(auto_precondition([frame], read_noise_e=1.5))
    assert eps[0] > eps[1] > eps[2]
    assert all(0.005 <= e <= 1.0 for e in eps)
    assert auto_precondition([np.zeros((32, 32))], 1.5) == 1.0  # no signal: trust nothing
