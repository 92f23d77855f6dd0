"""Self-supervised pairs and losses of ZS-DeconvNet: 2D recorruption, 3D odd/even slices.

Recorruption turns one noisy frame y into an (input, target) pair with independent noise:
    sigma^2 = beta1 * max(H(y) - b, 0) + beta2       (H: 5x5 mean filter)
    input  = y + alpha * sigma * z,   target = y - sigma * z / alpha,   z ~ N(0, 1)
beta1 scales the signal-dependent (Poisson) part, beta2 is the signal-independent (read noise)
variance, b the background level below which no shot noise is assumed.

Loss = mu * |denoised - target| + (1 - mu) * |pool2(PSF * deconvolved) - target|
       + lambda * Hessian(deconvolved), L1 by default as in the reference code (L2 optional).
The deconvolution term skips a border as wide as the PSF's reach: there the re-blurred patch
would need light from outside it.

3D pairs are odd slices (input) and even slices (target). Half a slice apart, they differ by
more than noise; the gap-amending term, the network's own change between the two positions
computed without gradient on the interleaved stack, is added to the target in a second term.
"""

from __future__ import annotations

from types import EllipsisType
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from livedecon.engines._configfile import StrictModel

HESSIAN_WEIGHT_2D, HESSIAN_WEIGHT_3D = 0.02, 0.1  # the reference code's defaults


class RecorruptionConfig(StrictModel):
    """Recorrupting a noisy image into a noisier input and its target: noise scales, read-noise
    variance and background."""

    beta1_range: tuple[float, float] = Field((0.5, 1.5), description="shot-noise scale range")
    alpha_range: tuple[float, float] = Field((1.0, 2.0), description="noise split range")
    beta2: float | None = Field(
        None, ge=0, description="read-noise variance in model units; None: from background"
    )
    background: float = Field(0.0, description="level b below which no shot noise is assumed")


class LossConfig(StrictModel):
    """The ZS-DeconvNet loss: stage weighting, Hessian, norm, preconditioning and sparsity."""

    denoise_weight: float = Field(0.5, ge=0, le=1, description="mu")
    hessian_weight: float | None = Field(
        None, ge=0, description="lambda; None: the reference's 0.02 in 2D, 0.1 in 3D"
    )
    norm: Literal["l1", "l2"] = "l1"
    precondition: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        None,
        description="filter the deconvolution residual by 1/sqrt(|OTF|^2 + eps) before the"
        " norm: the same minimiser, but frequencies the PSF attenuates are learnt as fast as"
        " the rest; eps, or 'auto' (from the training frames' noise, see auto_precondition);"
        " None: off, as in the reference",
    )
    sparsity_weight: float = Field(
        0.0,
        ge=0,
        description="L1 weight on the deconvolved image (model units): the sparsity prior of"
        " DPS and sparse deconvolution; 0: off, as in the reference",
    )


def box_mean_5x5(y: torch.Tensor) -> torch.Tensor:
    """Mean over each pixel's 5x5 neighbourhood, edges replicated."""
    return F.avg_pool2d(F.pad(y, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


def estimate_beta2(y: torch.Tensor, background: float = 0.0) -> float:
    """Signal-independent variance, from the darkest fifth of the frame.

    In photoelectron units shot noise has variance equal to the mean, so the read-noise
    variance is what the dark regions' variance has beyond their mean above `background`.
    """
    mean = box_mean_5x5(y)
    residual = y - mean
    local_var = box_mean_5x5(residual**2) * 25 / 24  # unbiased for a 5x5 window
    dark = mean <= torch.quantile(mean.flatten(), 0.2)
    excess = local_var[dark].mean() - torch.clamp(mean[dark] - background, min=0).mean()
    return max(float(excess), 1e-6)


def recorrupt(
    y: torch.Tensor, config: RecorruptionConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) from noisy frames y (N, 1, Y, X); beta1 and alpha drawn per frame.
    Stacks (N, 1, Z, Y, X) are recorrupted plane by plane (camera noise is independent from
    pixel to pixel in z as in y and x)."""
    if y.ndim == 5:
        n, c, depth, h, w = y.shape
        planes = y.transpose(1, 2).reshape(n * depth, c, h, w)
        noisier, cleaner = recorrupt(planes, config, generator)
        return (
            noisier.reshape(n, depth, c, h, w).transpose(1, 2),
            cleaner.reshape(n, depth, c, h, w).transpose(1, 2),
        )
    n = y.shape[0]
    shape = (n, 1, 1, 1)
    # Draw where the generator lives (a seeded CPU generator keeps runs repeatable on a GPU).
    noise_device = generator.device if generator is not None else y.device

    def uniform(bounds: tuple[float, float]) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, device=noise_device, dtype=y.dtype)
        return bounds[0] + (bounds[1] - bounds[0]) * u

    beta1, alpha = (
        uniform(config.beta1_range).to(y.device),
        uniform(config.alpha_range).to(y.device),
    )
    beta2 = config.beta2 if config.beta2 is not None else estimate_beta2(y, config.background)
    variance = beta1 * torch.clamp(box_mean_5x5(y) - config.background, min=0) + beta2
    sigma = torch.sqrt(variance)
    z = torch.randn(y.shape, generator=generator, device=noise_device, dtype=y.dtype)
    z = z.to(y.device)
    return y + alpha * sigma * z, y - sigma * z / alpha


def _distance(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    return (a - b).abs().mean() if norm == "l1" else ((a - b) ** 2).mean()


def psf_filter(padded: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
    """`padded` (..., [Z,] Y, X) correlated with `psf` ([Kz,] K, K), keeping only the 'valid'
    part, as F.conv2d/conv3d would, through the FFT: a 31 x 31 PSF costs a direct
    convolution's backward pass about 50x more on a CPU (most of a training step)."""
    dims = psf.ndim
    size = padded.shape[-dims:]
    kernel = torch.zeros(size, dtype=padded.dtype, device=padded.device)
    kernel[tuple(slice(0, k) for k in psf.shape)] = psf.flip(tuple(range(-dims, 0)))
    half = tuple(k // 2 for k in psf.shape)
    kernel = torch.roll(kernel, tuple(-h for h in half), tuple(range(-dims, 0)))
    axes = tuple(range(-dims, 0))
    spectrum = torch.fft.rfftn(padded, dim=axes) * torch.fft.rfftn(kernel, dim=axes)
    full = torch.fft.irfftn(spectrum, s=size, dim=axes)
    return full[(..., *[slice(h, n - h) for h, n in zip(half, size, strict=True)])]


def reblur(deconvolved: torch.Tensor, psf: torch.Tensor, upscale: int) -> torch.Tensor:
    """The forward model of the loss: PSF blur on the fine grid, then average-pool back."""
    k = psf.shape[-1] // 2
    blurred = psf_filter(F.pad(deconvolved, (k, k, k, k), mode="reflect"), psf)
    return F.avg_pool2d(blurred, upscale) if upscale > 1 else blurred


def exact_margin(psf_half_width: int, upscale: int) -> int:
    """Raw pixels at a patch border whose re-blurred value depends on light from outside
    the patch (which the network cannot see): the deconvolution loss leaves them out.

    The reference code gets the same effect by padding inputs with zeros and cropping; here the
    network sees real neighbouring data in the margin instead of zeros.
    """
    return -(-psf_half_width // upscale)


def _inner(x: torch.Tensor, margin: int, dims: int = 2) -> torch.Tensor:
    if margin == 0:
        return x
    if min(x.shape[-dims:]) <= 2 * margin:
        raise ValueError(
            f"patch {tuple(x.shape[-dims:])} is too small for the PSF: the deconvolution loss"
            f" needs more than {2 * margin} pixels per side"
        )
    index: tuple[EllipsisType | slice, ...] = (..., *[slice(margin, -margin)] * dims)
    return x[index]


def hessian_penalty(x: torch.Tensor) -> torch.Tensor:
    """Mean squared second differences (xx, yy and both mixed terms), as in the reference."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    dxx = dx[..., :, 1:] - dx[..., :, :-1]
    dyy = dy[..., 1:, :] - dy[..., :-1, :]
    dxy = dy[..., :, 1:] - dy[..., :, :-1]
    dyx = dx[..., 1:, :] - dx[..., :-1, :]
    total = 0.5 * (dxx**2).mean()
    for d in (dyy, dxy, dyx):
        total = total + 0.5 * (d**2).mean()
    return total


SSIM_WINDOW_PX = 11  # the SSIM's Gaussian window: the smallest image it compares


def _gauss_window(size: int = SSIM_WINDOW_PX, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


_SSIM_WINDOW = _gauss_window()


def ssim_torch(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM (Gaussian window 11, sigma 1.5) of (N, 1, H, W) batches, differentiable."""
    w = _SSIM_WINDOW.to(a)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean()


PRECONDITION_PER_NOISE_RATIO = 0.165


def auto_precondition(frames_e: list[np.ndarray], read_noise_e: float | None) -> float:
    """eps for `precondition = "auto"`: 0.165 * sqrt(noise variance / signal variance) of the
    frames (photoelectrons: shot noise is the mean, plus the read noise), within [0.005, 1].
    Measured on the bench's mixed TIRF scenes (README): at 15 photons peak (noise 3.4x the
    signal variance; this rule: 0.30) eps 0.3 matches the unpreconditioned recipe over 2500
    iterations where 0.1 loses 1.2 dB to noise it sharpens; at 50 (0.42x; 0.11) eps 0.1 gains
    1.1 dB; at 200 (0.06x; 0.04) eps 0.01-0.03 gain 2 dB. Noisier frames need the residual's
    high frequencies weighted less."""
    ratios = []
    for frame in frames_e:
        values = np.asarray(frame, dtype=np.float64)
        noise = float(np.clip(values, 0, None).mean()) + (read_noise_e or 0.0) ** 2
        signal = float(values.var()) - noise
        ratios.append(noise / signal if signal > 0 else np.inf)
    eps = PRECONDITION_PER_NOISE_RATIO * float(np.sqrt(np.median(ratios)))
    return float(np.clip(eps, 0.005, 1.0))


def _fold(kernel: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`kernel` wrapped onto a periodic grid of `shape` (its last dimensions): the samples whose
    DFT is the kernel's spectrum at that grid's frequencies, however large the kernel."""
    for axis, n in zip(range(-len(shape), 0), shape, strict=True):
        size = kernel.shape[axis]
        pad = [0, 0] * (-axis - 1) + [0, -size % n]
        kernel = F.pad(kernel, pad)
        kernel = kernel.unflatten(axis, (-1, n)).sum(dim=axis - 1)
    return kernel


def whiten(residual: torch.Tensor, psf: torch.Tensor, upscale: int, eps: float) -> torch.Tensor:
    """`residual` (N, 1, [Z,] Y, X) on the input grid filtered by 1/sqrt(|OTF|^2 + eps), where
    the OTF is the forward model's (PSF blur, then lateral binning; 3D for a (Kz, K, K) PSF) at
    the residual's own frequencies, scaled to 1 at zero frequency."""
    dims = psf.ndim
    point_shape = (*psf.shape[:-2], upscale * psf.shape[-1], upscale * psf.shape[-1])
    fine = torch.zeros(1, 1, *point_shape, dtype=psf.dtype, device=psf.device)
    fine[(0, 0, *(n // 2 for n in point_shape))] = 1.0
    forward = reblur_3d if dims == 3 else reblur
    kernel = forward(fine, psf, upscale)[0, 0]
    shape = tuple(residual.shape[-dims:])
    axes = tuple(range(-dims, 0))
    otf = torch.fft.rfftn(_fold(kernel * upscale**2, shape), dim=axes).abs()
    weight = 1 / torch.sqrt((otf / otf.flatten()[0]) ** 2 + eps)
    return torch.fft.irfftn(torch.fft.rfftn(residual, dim=axes) * weight, s=shape, dim=axes)


def zs_deconv_loss(
    denoised: torch.Tensor,
    deconvolved: torch.Tensor,
    target: torch.Tensor,
    psf: torch.Tensor,
    config: LossConfig,
    upscale: int = 2,
    background: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Total loss and its parts. `psf` is (K, K) on the deconvolved grid, summing to 1.
    `background` (model units per input pixel) is added to the re-blurred image, so the
    deconvolved image holds the specimen alone."""
    denoise = _distance(denoised, target, config.norm)
    margin = exact_margin(psf.shape[-1] // 2, upscale)
    reblurred = reblur(deconvolved, psf, upscale) + background
    residual = _inner(reblurred, margin) - _inner(target, margin)
    if config.precondition == "auto":
        raise ValueError("precondition 'auto' is resolved from the data before training")
    if config.precondition is not None:
        residual = whiten(residual, psf, upscale, config.precondition)
    deconv = _distance(residual, torch.zeros_like(residual), config.norm)
    hessian = hessian_penalty(deconvolved)
    sparsity = deconvolved.abs().mean()
    mu = config.denoise_weight
    weight = HESSIAN_WEIGHT_2D if config.hessian_weight is None else config.hessian_weight
    total = mu * denoise + (1 - mu) * deconv + weight * hessian + config.sparsity_weight * sparsity
    return {
        "total": total,
        "denoise": denoise,
        "deconv": deconv,
        "hessian": hessian,
        "sparsity": sparsity,
    }


# -- 3D: odd/even slices with the gap-amending term ---------------------------------------


def odd_even_pairs(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) from noisy stacks (N, 1, Z, Y, X): odd slices in, even slices out."""
    if stack.ndim != 5 or stack.shape[2] < 4:
        raise ValueError(f"need stacks (N, 1, Z>=4, Y, X), got shape {tuple(stack.shape)}")
    inputs, targets = stack[:, :, 1::2], stack[:, :, 0::2]
    depth = min(inputs.shape[2], targets.shape[2])
    return inputs[:, :, :depth], targets[:, :, :depth]


@torch.no_grad()
def gap_amending_term(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """What the network's denoised output changes over the half-slice between a target slice
    and its input slice, from the interleaved stack; a constant for the loss (no gradient)."""
    n, c, z, y, x = inputs.shape
    interleaved = torch.empty((n, c, 2 * z, y, x), dtype=inputs.dtype, device=inputs.device)
    interleaved[:, :, 0::2] = targets
    interleaved[:, :, 1::2] = inputs
    denoised = model(interleaved)[0]
    return denoised[:, :, 1::2] - denoised[:, :, 0::2]


def reblur_3d(deconvolved: torch.Tensor, psf: torch.Tensor, upscale: int) -> torch.Tensor:
    """3D PSF blur on the fine lateral grid, then lateral average pooling back."""
    kz, ky, kx = (s // 2 for s in psf.shape)
    padded = F.pad(deconvolved, (kx, kx, ky, ky, kz, kz), mode="replicate")
    blurred = psf_filter(padded, psf)
    return F.avg_pool3d(blurred, (1, upscale, upscale)) if upscale > 1 else blurred


def hessian_penalty_3d(x: torch.Tensor) -> torch.Tensor:
    """Mean squared second differences along every pair of (z, y, x) axes, as the reference."""
    total = x.new_zeros(())
    for first_axis in (-3, -2, -1):
        first = torch.diff(x, dim=first_axis)
        for second_axis in (-3, -2, -1):
            if first.shape[second_axis] > 1:
                total = total + (torch.diff(first, dim=second_axis) ** 2).mean()
    return total


def zs_deconv_loss_3d(
    denoised: torch.Tensor,
    deconvolved: torch.Tensor,
    target: torch.Tensor,
    gap: torch.Tensor | None,
    psf: torch.Tensor,
    config: LossConfig,
    upscale: int = 2,
) -> dict[str, torch.Tensor]:
    """Odd/even pairs: both terms compare with the target as it is and as amended by the gap.
    Recorrupted pairs (no gap): with the target alone."""
    margin = exact_margin(psf.shape[-1] // 2, upscale)
    reblurred = _inner(reblur_3d(deconvolved, psf, upscale), margin)
    inner_target = _inner(target, margin)
    if config.precondition == "auto":
        raise ValueError("precondition 'auto' is resolved from the data before training")
    eps = config.precondition

    def deconv_distance(goal: torch.Tensor) -> torch.Tensor:
        residual = reblurred - goal
        if eps is not None:
            residual = whiten(residual, psf, upscale, eps)
        return _distance(residual, torch.zeros_like(residual), config.norm)

    denoise = _distance(denoised, target, config.norm)
    deconv = deconv_distance(inner_target)
    if gap is not None:
        denoise = denoise + _distance(denoised, target + gap, config.norm)
        deconv = deconv + deconv_distance(inner_target + _inner(gap, margin))
    hessian = hessian_penalty_3d(deconvolved)
    mu = config.denoise_weight
    weight = HESSIAN_WEIGHT_3D if config.hessian_weight is None else config.hessian_weight
    total = mu * denoise + (1 - mu) * deconv + weight * hessian
    return {"total": total, "denoise": denoise, "deconv": deconv, "hessian": hessian}
