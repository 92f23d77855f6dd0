from __future__ import annotations

import pytest
import torch

from livedecon.engines._networks import Network3DSpec, ZSDeconvNet3D
from livedecon.engines._self_supervised import (
    LossConfig,
    gap_amending_term,
    hessian_penalty_3d,
    odd_even_pairs,
    zs_deconv_loss_3d,
)


def _tiny() -> ZSDeconvNet3D:
    torch.manual_seed(0)
    return ZSDeconvNet3D(
        Network3DSpec(width=8, attention_reduction=4, residual_groups=1, blocks_per_group=1)
    )


def test_odd_even_pairs_split_slices():
    stack = torch.arange(9.0).reshape(1, 1, 9, 1, 1).expand(1, 1, 9, 2, 2)
    inputs, targets = odd_even_pairs(stack)
    assert inputs[0, 0, :, 0, 0].tolist() == [1, 3, 5, 7]
    assert targets[0, 0, :, 0, 0].tolist() == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="Z>=4"):
        odd_even_pairs(torch.zeros(1, 1, 3, 4, 4))


def test_gap_term_carries_no_gradient_and_the_step_trains():
    model = _tiny()
    stack = torch.rand(2, 1, 8, 16, 16)
    inputs, targets = odd_even_pairs(stack)
    gap = gap_amending_term(model, inputs, targets)
    assert gap.shape == inputs.shape
    assert not gap.requires_grad
    assert gap.grad_fn is None
    model.train()
    denoised, deconvolved = model(inputs)
    psf = torch.full((3, 5, 5), 1 / 75)
    losses = zs_deconv_loss_3d(
        denoised, deconvolved, targets, gap, psf, LossConfig(hessian_weight=0.1)
    )
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_gap_is_zero_for_a_model_that_ignores_z_order():
    """A model whose denoised output is constant gives no gap: the term only corrects what
    the network itself changes between neighbouring slices."""

    class Constant(torch.nn.Module):
        def forward(self, x):
            out = torch.ones_like(x)
            return out, out

    inputs, targets = odd_even_pairs(torch.rand(1, 1, 8, 4, 4))
    assert torch.all(gap_amending_term(Constant(), inputs, targets) == 0)


def test_hessian_3d_ignores_planes_and_punishes_curvature():
    z, y, x = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), torch.arange(8.0), indexing="ij")
    assert hessian_penalty_3d((x + 2 * y - z)[None, None]) == pytest.approx(0.0, abs=1e-9)
    assert hessian_penalty_3d(((z - 3) ** 2)[None, None]) > 1.0
