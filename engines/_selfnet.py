"""Self-Net networks (Ning et al., Light Sci Appl 12:204, 2023) and isotropic inference.

Self-Net makes a volume's axial (xz, yz) slices as sharp as its lateral (xy) ones, learning
only from the volume itself. Three networks of one design (generators) and two PatchGAN
discriminators train together (engines/_selfnet_training.py); only the restoration network is
kept, bundled, exported and served: it maps an axial slice that was resliced with cubic
upsampling to the lateral pixel size to a slice of lateral quality.

Inference (`restore_volume`): reslice to xz and yz with cubic axial upsampling, restore every
axial slice in batches, average the two. The network is fully convolutional and sees one 2D
slice at a time, so restoring is bounded in memory by a band of slices, the slice batch and
tiles of very large slices (engines/_tiling.py); the result itself is held whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from livedecon.engines._configfile import StrictModel
from livedecon.engines._enums import NetworkKind

Infer = Callable[[np.ndarray], np.ndarray]  # (N, 1, H, W) -> (N, 1, H, W), model units
BAND_PX = 128  # rows (xz) or columns (yz) of a volume restored at once


class SelfNetSpec(StrictModel):
    """The generator design shared by all Self-Net generators and the restoration network.

    The published one: 64 channels, 6 residual blocks (about 0.6 M parameters). The fast
    variant (`fast_selfnet_spec`) is narrower and shallower for live use.
    """

    kind: Literal[NetworkKind.SELFNET, NetworkKind.SELFNET_FAST] = NetworkKind.SELFNET
    width: int = Field(64, ge=2, le=512, description="channels of every hidden convolution")
    blocks: int = Field(6, ge=0, le=32, description="residual blocks of two 3x3 convolutions")
    global_residual: bool = Field(
        True,
        description="output = input + network(input): the networks start as identity, so a"
        " short run never begins by destroying the slice",
    )

    @property
    def upsample(self) -> bool:
        """No lateral upsampling: output pixels are the input's (for the bundle rules)."""
        return False


def fast_selfnet_spec() -> SelfNetSpec:
    """The live variant: a quarter of the width, a third of the blocks (about 25x fewer
    multiply-adds than the published network)."""
    return SelfNetSpec(kind=NetworkKind.SELFNET_FAST, width=16, blocks=2)


def _conv(c_in: int, c_out: int, k: int) -> list[nn.Module]:
    """Reflection padding then a convolution: no zero border for the network to learn from."""
    return [nn.ReflectionPad2d(k // 2), nn.Conv2d(c_in, c_out, k)]


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convolutions with a LeakyReLU between, added to the input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv(width, width, 3), nn.LeakyReLU(0.2), *_conv(width, width, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SelfNetGenerator(nn.Module):
    """7x7 in, 3x3, residual blocks, 3x3, 7x7 out; LeakyReLU 0.2; no normalisation (so a
    slice's intensity scale passes through unchanged)."""

    multiple = 1

    def __init__(self, spec: SelfNetSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or SelfNetSpec()
        w = self.spec.width
        self.body = nn.Sequential(
            *_conv(1, w, 7),
            nn.LeakyReLU(0.2),
            *_conv(w, w, 3),
            nn.LeakyReLU(0.2),
            *[ResidualBlock(w) for _ in range(self.spec.blocks)],
            *_conv(w, w, 3),
            nn.LeakyReLU(0.2),
            *_conv(w, 1, 7),
        )
        if self.spec.global_residual:  # start as the identity (see global_residual)
            out = self.body[-1]
            assert isinstance(out, nn.Conv2d)  # the convolution of the last _conv
            assert out.bias is not None  # made with one
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.spec.global_residual else out


class SelfNetRestorer(SelfNetGenerator):
    """The served network: one output, named `restored` in ONNX (engines/_export.py)."""

    output_names = ("restored",)


class PatchDiscriminator(nn.Module):
    """PatchGAN with two strided layers and instance norm: judges 64^2 patches by their local
    texture (the axial blur), one score per receptive field."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.InstanceNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 4, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# -- slicing -----------------------------------------------------------------------------------


MIN_PLANES = 4  # the fewest planes a volume needs for axial slices worth restoring


def axial_ratio(lateral_um: float, z_step_um: float) -> float:
    """How many lateral pixels one z step spans; Self-Net needs it above 1."""
    if lateral_um <= 0 or z_step_um <= 0:
        raise ValueError(
            f"pixel sizes must be positive, got lateral {lateral_um} um, z step {z_step_um} um"
        )
    ratio = z_step_um / lateral_um
    if ratio < 1.0 + 1e-6:
        raise ValueError(
            f"z step {z_step_um} um is not coarser than the lateral pixel {lateral_um} um:"
            " the volume is already isotropically sampled"
        )
    return ratio


def upsampled_depth(planes: int, ratio: float) -> int:
    """Planes on the lateral-pixel grid spanning the same first-to-last range."""
    return round((planes - 1) * ratio) + 1


def cubic_axial(volume: np.ndarray, ratio: float) -> np.ndarray:
    """(Z, Y, X) -> (Z', Y, X), cubic along z to the lateral pixel size; plane k lands at
    row k * ratio (corners aligned), so no half-step shift is introduced."""
    volume = np.asarray(volume, dtype=np.float32)
    depth = upsampled_depth(volume.shape[0], ratio)
    t = torch.from_numpy(np.ascontiguousarray(volume.transpose(1, 0, 2)))[:, None]  # (Y,1,Z,X)
    up = F.interpolate(t, size=(depth, volume.shape[2]), mode="bicubic", align_corners=True)
    return up[:, 0].numpy().transpose(1, 0, 2).copy()


def check_volume(volume: np.ndarray, what: str = "volume") -> np.ndarray:
    """A (Z, Y, X) float32 volume, or a clear error for anything Self-Net cannot take."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(
            f"{what}: Self-Net takes one volume (Z, Y, X), got shape {volume.shape}"
            + (" (a single 2D frame has no axial slices)" if volume.ndim == 2 else "")
        )
    if volume.shape[0] < MIN_PLANES:
        raise ValueError(f"{what}: {volume.shape[0]} planes; Self-Net needs at least {MIN_PLANES}")
    if min(volume.shape[1:]) < 8:
        raise ValueError(f"{what}: lateral size {volume.shape[1:]} is below 8 pixels")
    volume = volume.astype(np.float32, copy=False)
    if not np.all(np.isfinite(volume)):
        raise ValueError(f"{what}: holds NaN or infinite values")
    return volume


def _restore_slices(infer: Infer, slices: np.ndarray, batch: int) -> np.ndarray:
    """Restore (N, H, W) slices `batch` at a time (memory bounded by the batch). Each slice
    keeps its input's mean: restoring resolution moves light, it adds none, and the trained
    network otherwise lifted every slice by a level (~0.006 model units, 6% of a sparse
    volume's mean)."""
    out = np.empty_like(slices)
    for start in range(0, len(slices), batch):
        chunk = np.ascontiguousarray(slices[start : start + batch, None])
        restored = infer(chunk)[:, 0]
        lift = restored.mean(axis=(-2, -1), keepdims=True) - chunk[:, 0].mean(
            axis=(-2, -1), keepdims=True
        )
        out[start : start + batch] = restored - lift
    return out


def restore_volume(
    infer: Infer,
    volume: np.ndarray,
    ratio: float,
    slice_batch: int = 8,
    tile_px: int | None = None,
    band_px: int = BAND_PX,
) -> np.ndarray:
    """Isotropic volume (Z', Y, X) on the lateral pixel grid from a (Z, Y, X) volume in
    model units: cubic axial upsampling, every xz and every yz slice restored, averaged.

    Memory is bounded in all three dimensions. The xz slices are restored in bands of
    `band_px` rows, the yz slices in bands of `band_px` columns: the cubic upsampling runs
    along z only and each slice is restored whole, so a band needs no halo and the result is
    the whole volume's exactly. Beside the result only one band's upsampled slices are held
    (the whole volume at once took about three times the result). Within a slice, `tile_px`
    sends slices wider or deeper than that through the network in blended tiles
    (engines/_tiling.py).
    """
    volume = check_volume(volume)
    if band_px < 1:
        raise ValueError(f"band_px must be at least 1, got {band_px}")
    run = infer if tile_px is None else _tiled(infer, tile_px)
    planes, rows, cols = isotropic_shape(volume.shape, ratio)
    out = np.empty((planes, rows, cols), dtype=np.float32)
    for y in range(0, rows, band_px):
        up = cubic_axial(volume[:, y : y + band_px], ratio)  # (Z', band, X)
        xz = _restore_slices(run, np.ascontiguousarray(up.transpose(1, 0, 2)), slice_batch)
        out[:, y : y + band_px] = 0.5 * xz.transpose(1, 0, 2)
    for x in range(0, cols, band_px):
        up = cubic_axial(volume[:, :, x : x + band_px], ratio)  # (Z', Y, band)
        yz = _restore_slices(run, np.ascontiguousarray(up.transpose(2, 0, 1)), slice_batch)
        out[:, :, x : x + band_px] += 0.5 * yz.transpose(1, 2, 0)
    return out


def _tiled(infer: Infer, tile_px: int) -> Infer:
    from livedecon.engines._tiling import infer_tiled

    def run(batch: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                infer_tiled(infer, item[0], 1, 1, tile_px, overlap_px=min(32, tile_px // 2))[None]
                for item in batch
            ]
        )

    return run


def torch_infer(model: nn.Module) -> Infer:
    """`infer` on a torch module (float32, CPU), for training-time evaluation."""

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return run


def parameter_count(spec: SelfNetSpec) -> int:
    """Trainable parameters of one Self-Net generator of this spec."""
    return sum(p.numel() for p in SelfNetGenerator(spec).parameters())


def macs_per_pixel(spec: SelfNetSpec) -> int:
    """Multiply-adds per output pixel: 2 x 7x7 convs, 2 + 2*blocks 3x3 convs at width w."""
    w = spec.width
    return 2 * 49 * w + (2 + 2 * spec.blocks) * 9 * w * w


def isotropic_shape(shape: tuple[int, int, int], ratio: float) -> tuple[int, int, int]:
    """(Z, Y, X) of a volume's isotropic result: its depth upsampled by the axial ratio."""
    return (upsampled_depth(shape[0], ratio), shape[1], shape[2])
