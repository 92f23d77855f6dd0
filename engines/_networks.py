"""ZS-DeconvNet networks in PyTorch: 2D two-stage U-Net, its fast variant, 3D two-stage RCAN.

Each network maps a raw frame (N, 1, Y, X) or stack (N, 1, Z, Y, X) in model units to a pair
(denoised, deconvolved): the denoised image on the input grid and the deconvolved one on the
2x lateral grid (when `upsample` is on). Inputs must be multiples of `multiple` laterally.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, TypeAlias, TypeVar, overload

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from livedecon.engines._configfile import StrictModel
from livedecon.engines._enums import NetworkKind
from livedecon.engines._selfnet import SelfNetRestorer, SelfNetSpec

if TYPE_CHECKING:
    from livedecon.engines._dps import DpsNet


class UNetSpec(StrictModel):
    """One U-Net as the ZS-DeconvNet reference builds it."""

    levels: int = Field(4, ge=1, le=6, description="encoder blocks, each halving the size")
    convs_per_block: int = Field(3, ge=1, le=6)
    base_width: int = Field(32, ge=1, le=512, description="first block; doubles per level")


class Network2DSpec(StrictModel):
    """The 2D ZS-DeconvNet: a U-Net denoising stage, then a U-Net deconvolution stage with
    a 2x upsampling tail (the fast variant is the same shape, narrower)."""

    kind: Literal[NetworkKind.ZS_DECONVNET_2D, NetworkKind.ZS_DECONVNET_2D_FAST] = (
        NetworkKind.ZS_DECONVNET_2D
    )
    unet: UNetSpec = UNetSpec()
    tail_width: int = Field(128, ge=1, le=1024, description="convolutions after upsampling")
    upsample: bool = True
    residual: bool = Field(
        False,
        description="the deconvolution stage adds its output to the (nearest-upsampled)"
        " denoised image, so it learns only the sharpening; off in the reference",
    )
    output_activation: Literal["softplus", "relu"] = Field(
        "softplus",
        description="keeps outputs non-negative; the reference's ReLU can die early in short"
        " runs (all-zero output, no gradient), softplus cannot",
    )


class Network3DSpec(StrictModel):
    """The 3D ZS-DeconvNet: two RCAN stages (denoise, then deconvolve with lateral 2x)."""

    kind: Literal[NetworkKind.ZS_DECONVNET_3D] = NetworkKind.ZS_DECONVNET_3D
    width: int = Field(64, ge=4, le=512)
    residual_groups: int = Field(2, ge=1, le=16)
    blocks_per_group: int = Field(2, ge=1, le=16)
    attention_reduction: int = Field(16, ge=1, le=64)
    upsample: bool = Field(True, description="lateral-only 2x upsampling of the second stage")
    plane_stride: int = Field(
        2,
        ge=1,
        le=2,
        description="planes apart the network sees, as in training (odd/even pairs are two"
        " steps apart); a stack is restored as that many interleaved sub-stacks, so the"
        " network never meets a plane spacing it was not trained on",
    )
    serve: Literal["deconvolved", "denoised"] = Field(
        "deconvolved",
        description="what inference returns as its second output: the deconvolution stage's"
        " estimate, or the denoising stage's stack shared onto the 2x grid for Richardson-Lucy"
        " to deconvolve (engines/_refinement.py; the deconvolution stage still trains, its"
        " loss shapes the denoiser, and is skipped at inference)",
    )


def fast_2d_spec() -> Network2DSpec:
    """The real-time variant: narrower, shallower U-Nets and a sub-pixel tail."""
    return Network2DSpec(
        kind=NetworkKind.ZS_DECONVNET_2D_FAST,
        unet=UNetSpec(levels=3, convs_per_block=2, base_width=16),
        tail_width=32,
    )


def _conv_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]


def _output_activation(spec: Network2DSpec) -> nn.Module:
    return nn.Softplus(beta=10) if spec.output_activation == "softplus" else nn.ReLU()


class UNet2D(nn.Module):
    """Encoder of `levels` blocks, bottleneck (2w then w), decoder with nearest upsampling.

    Widths follow the reference: block n has base*2^n channels; each decoder block starts with
    the full width and narrows to half. Output: features of width base/2 at input size.
    """

    def __init__(self, c_in: int, spec: UNetSpec) -> None:
        super().__init__()
        widths = [spec.base_width * 2**n for n in range(spec.levels)]
        self.encoder = nn.ModuleList()
        c = c_in
        for w in widths:
            layers = _conv_relu(c, w)
            for _ in range(spec.convs_per_block - 1):
                layers += _conv_relu(w, w)
            self.encoder.append(nn.Sequential(*layers))
            c = w
        top = widths[-1]
        self.bottleneck = nn.Sequential(*_conv_relu(top, 2 * top), *_conv_relu(2 * top, top))
        self.decoder = nn.ModuleList()
        c = top
        for w in reversed(widths):
            layers = _conv_relu(c + w, w)
            narrow = max(w // 2, 1)
            c_next = w
            for _ in range(spec.convs_per_block - 1):
                layers += _conv_relu(c_next, narrow)
                c_next = narrow
            self.decoder.append(nn.Sequential(*layers))
            c = c_next
        self.out_channels = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([self.up(x), skip], dim=1))
        return x


class ZSDeconvNet2D(nn.Module):
    """Denoising U-Net, then deconvolution U-Net with a 2x tail (nearest or sub-pixel)."""

    multiple: int  # input Y and X must be multiples of it (2 ** U-Net levels)

    def __init__(self, spec: Network2DSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or Network2DSpec()
        self.multiple = input_multiple(self.spec)
        self.upscale = 2 if self.spec.upsample else 1
        self.denoiser = UNet2D(1, self.spec.unet)
        self.denoise_out = nn.Sequential(
            nn.Conv2d(self.denoiser.out_channels, 1, 3, padding=1), _output_activation(self.spec)
        )
        self.deconvolver = UNet2D(1, self.spec.unet)
        c, w = self.deconvolver.out_channels, self.spec.tail_width
        # reference tail: nearest x2, conv, conv, conv
        if self.spec.kind == NetworkKind.ZS_DECONVNET_2D:
            up = [nn.Upsample(scale_factor=2, mode="nearest")] if self.spec.upsample else []
            self.tail = nn.Sequential(
                *up,
                *_conv_relu(c, w),
                *_conv_relu(w, w),
                nn.Conv2d(w, 1, 3, padding=1),
            )
        else:  # sub-pixel tail: the convolutions run on the coarse grid, PixelShuffle lifts
            r = self.upscale
            self.tail = nn.Sequential(
                *_conv_relu(c, w),
                nn.Conv2d(w, r * r, 3, padding=1),
                nn.PixelShuffle(r),
            )
        self.activation = _output_activation(self.spec)  # after the tail (same weight keys)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        denoised = self.denoise_out(self.denoiser(x))
        sharpening = self.tail(self.deconvolver(denoised))
        if self.spec.residual:
            sharpening = sharpening + F.interpolate(denoised, scale_factor=self.upscale)
        return denoised, self.activation(sharpening)


class ChannelAttention3D(nn.Module):
    """Squeeze-and-excitation: scales each channel by a weight from its global average."""

    def __init__(self, width: int, reduction: int) -> None:
        super().__init__()
        hidden = max(width // reduction, 1)
        self.weights = nn.Sequential(
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(width, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, width, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class RCAB3D(nn.Module):
    """Residual channel-attention block: conv, LeakyReLU, conv, LeakyReLU, attention, + x."""

    def __init__(self, width: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(width, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv3d(width, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            ChannelAttention3D(width, reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class RCANStage3D(nn.Module):
    """One RCAN3D stage: head, residual channel-attention blocks, tail (with lateral 2x upsampling
    when asked)."""

    def __init__(self, spec: Network3DSpec, upsample: bool) -> None:
        super().__init__()
        w = spec.width
        self.head = nn.Conv3d(1, w, 3, padding=1)
        self.groups = nn.Sequential(
            *[
                RCAB3D(w, spec.attention_reduction)
                for _ in range(spec.residual_groups * spec.blocks_per_group)
            ]
        )
        up = [nn.Upsample(scale_factor=(1, 2, 2), mode="nearest")] if upsample else []
        self.tail = nn.Sequential(
            *up,
            nn.Conv3d(w, w, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv3d(w, 1, 3, padding=1),
            nn.LeakyReLU(0.2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        return self.tail(features + self.groups(features))


class ZSDeconvNet3D(nn.Module):
    """Two RCAN3D stages: denoiser on the input grid, deconvolver with lateral 2x upsampling."""

    multiple = 1

    def __init__(self, spec: Network3DSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or Network3DSpec()
        self.upscale = 2 if self.spec.upsample else 1
        self.denoiser = RCANStage3D(self.spec, upsample=False)
        self.deconvolver = RCANStage3D(self.spec, upsample=self.spec.upsample)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stages on a stack at the training plane spacing (at inference, a network that
        serves its denoised stack returns it twice, the second time on the output grid)."""
        denoised = self.denoiser(x)
        if self.spec.serve == "denoised" and not self.training:
            return denoised, _lateral_zoom(denoised, self.upscale)
        return denoised, self.deconvolver(denoised)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.plane_stride == 1:
            return self.stages(x)
        # Even and odd planes as two stacks of the trained spacing, in one batch. The odd
        # stack gets the last plane repeated so both have ceil(Z / 2) planes (traced shapes
        # only, so ONNX export keeps Z dynamic).
        depth = x.shape[2]
        even = x[:, :, 0::2]
        odd = torch.cat([x[:, :, 1::2], x[:, :, -1:]], dim=2)[:, :, : even.shape[2]]
        n = x.shape[0]
        denoised, deconvolved = self.stages(torch.cat([even, odd], dim=0))
        return _interleave(denoised, n, depth), _interleave(deconvolved, n, depth)


def _lateral_zoom(stack: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, Z, Y, X) linearly interpolated to `factor` times Y and X (pixel centres kept,
    edges extended); intensities unchanged, as the deconvolution stage's output is."""
    if factor == 1:
        return stack
    return F.interpolate(stack, scale_factor=(1, factor, factor), mode="trilinear")


def _interleave(both: torch.Tensor, n: int, depth: int) -> torch.Tensor:
    """(2N, C, Z', Y, X) of even then odd sub-stacks -> (N, C, depth, Y, X), planes in order."""
    even, odd = both[:n], both[n:]
    stacked = torch.stack([even, odd], dim=3)  # (N, C, Z', 2, Y, X)
    shape = stacked.shape
    return stacked.reshape(shape[0], shape[1], shape[2] * 2, shape[4], shape[5])[:, :, :depth]


class DpsSpec(StrictModel):
    """DPS (engines/_dps.py): a denoising U-Net, then a deconvolution U-Net with an
    error-feedback unit around the PSF, which the network holds (`psf_px` wide)."""

    kind: Literal[NetworkKind.DPS] = NetworkKind.DPS
    unet: UNetSpec = UNetSpec(levels=3, convs_per_block=2, base_width=16)
    feedback_width: int = Field(16, ge=1, le=256, description="the back-projection's channels")
    upsample: bool = Field(True, description="2x output grid (widefield); off for SIM images")
    psf_px: int = Field(31, ge=1, description="the PSF width (odd), set from the PSF it holds")
    output_activation: Literal["abs", "softplus"] = Field(
        "abs",
        description="keeps both stages' outputs non-negative. softplus (beta 10) reaches 0 only"
        " at minus infinity, so on a sparse specimen the empty background drives the"
        " deconvolution stage there and its output dies to 0 everywhere; abs reaches 0 at 0",
    )


NetworkSpec = Network2DSpec | Network3DSpec | SelfNetSpec | DpsSpec
T = TypeVar("T")
ZSDeconvNetwork = ZSDeconvNet2D | ZSDeconvNet3D
# what build_network makes (DpsNet imports this module, so it is named, not imported, here)
Network: TypeAlias = "ZSDeconvNet2D | ZSDeconvNet3D | SelfNetRestorer | DpsNet"


def serves_denoised(spec: NetworkSpec) -> bool:
    """A 3D ZS-DeconvNet whose inference returns its denoised stack (on the output grid) for
    Richardson-Lucy to deconvolve, in place of its deconvolution stage's estimate."""
    return isinstance(spec, Network3DSpec) and spec.serve == "denoised"


def inference_weights(spec: NetworkSpec, weights: Mapping[str, T]) -> dict[str, T]:
    """The weights an exported graph of `spec` holds: all but the deconvolution stage's when a
    3D network serves its denoised stack (inference skips that stage; training keeps it)."""
    if serves_denoised(spec):
        return {k: v for k, v in weights.items() if not k.startswith("deconvolver.")}
    return dict(weights)


def input_multiple(spec: NetworkSpec) -> int:
    """What input Y and X must be multiples of: the U-Nets halve them once per level."""
    return 2**spec.unet.levels if isinstance(spec, Network2DSpec | DpsSpec) else 1


@overload
def build_network(spec: Network2DSpec) -> ZSDeconvNet2D: ...
@overload
def build_network(spec: Network3DSpec) -> ZSDeconvNet3D: ...
@overload
def build_network(spec: SelfNetSpec) -> SelfNetRestorer: ...
@overload
def build_network(spec: DpsSpec) -> DpsNet: ...
@overload
def build_network(spec: NetworkSpec) -> Network: ...
def build_network(spec: NetworkSpec) -> Network:
    """The untrained torch network a spec describes (ZS-DeconvNet 2D or 3D, Self-Net, DPS;
    DPS with a zero PSF, which its weights replace)."""
    if isinstance(spec, DpsSpec):
        from livedecon.engines._dps import DpsNet  # dps.py builds on this module's U-Net

        return DpsNet(spec, np.zeros((spec.psf_px, spec.psf_px), np.float32))
    if isinstance(spec, SelfNetSpec):
        return SelfNetRestorer(spec)
    if isinstance(spec, Network3DSpec):
        return ZSDeconvNet3D(spec)
    return ZSDeconvNet2D(spec)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())


def conv_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates x2 of every convolution for one forward pass of `example`."""
    total = 0

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d | nn.Conv3d)  # hooked on convolutions only
        kernel = module.weight[0].numel()  # c_in/groups * k...
        total += 2 * output.numel() * kernel

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Conv3d)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return total
