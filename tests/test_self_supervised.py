from __future__ import annotations

import pytest
import torch

from livedecon.engines.self_supervised import (
    LossConfig,
    RecorruptionConfig,
    estimate_beta2,
    hessian_penalty,
    reblur,
    recorrupt,
    zs_deconv_loss,
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
