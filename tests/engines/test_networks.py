from __future__ import annotations

import pytest
import torch

from livedecon.engines._networks import (
    Network2DSpec,
    Network3DSpec,
    UNetSpec,
    ZSDeconvNet2D,
    ZSDeconvNet3D,
    conv_flops,
    count_parameters,
    fast_2d_spec,
)


def test_reference_2d_parameter_count():
    # the reference two-stage U-Net at default widths has about 13.1 M parameters
    assert count_parameters(ZSDeconvNet2D()) == pytest.approx(13.1e6, rel=0.005)


def test_reference_3d_attention_and_size():
    net = ZSDeconvNet3D()
    attention = net.denoiser.groups[0].body[-1].weights
    assert (attention[1].in_channels, attention[1].out_channels) == (64, 4)
    assert (attention[3].in_channels, attention[3].out_channels) == (4, 64)
    assert len(net.denoiser.groups) == 4  # 2 residual groups x 2 RCAB


def test_fast_variant_is_much_cheaper():
    full, fast = ZSDeconvNet2D(), ZSDeconvNet2D(fast_2d_spec())
    frame = torch.rand(1, 1, 64, 64)
    assert count_parameters(fast) < count_parameters(full) / 10
    assert conv_flops(fast, frame) < conv_flops(full, frame) / 10
    assert isinstance(fast.tail[-1], torch.nn.PixelShuffle)


@pytest.mark.parametrize("kind", ["zs-deconvnet-2d", "zs-deconvnet-2d-fast"])
def test_2d_outputs_on_input_and_2x_grids(kind):
    spec = Network2DSpec(
        kind=kind, unet=UNetSpec(levels=2, convs_per_block=2, base_width=4), tail_width=8
    )
    net = ZSDeconvNet2D(spec)
    assert net.multiple == 4
    denoised, deconvolved = net(torch.rand(2, 1, 24, 32))
    assert denoised.shape == (2, 1, 24, 32)
    assert deconvolved.shape == (2, 1, 48, 64)
    assert (deconvolved >= 0).all()  # photon units are never negative


def test_3d_lateral_only_upsampling():
    net = ZSDeconvNet3D(Network3DSpec(width=8, attention_reduction=4))
    denoised, deconvolved = net(torch.rand(1, 1, 5, 12, 16))
    assert denoised.shape == (1, 1, 5, 12, 16)
    assert deconvolved.shape == (1, 1, 5, 24, 32)
    flat = ZSDeconvNet3D(Network3DSpec(width=8, attention_reduction=4, upsample=False))
    assert flat(torch.rand(1, 1, 5, 12, 16))[1].shape == (1, 1, 5, 12, 16)
