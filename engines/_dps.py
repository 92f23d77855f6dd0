"""DPS, deep physics-informed sparsity (Ye et al., Intelligent Computing 2024), re-implemented
from the paper's description: its weights, architecture details and training code are not
public, so the choices below are this project's and are stated as such.

Two stages, trained together without clean data:
1. a denoising U-Net, trained on recorrupted pairs as ZS-DeconvNet is (widefield: pairs drawn
   from the raw frame at every step; SIM: the SR reconstructions of recorrupted raw sets);
2. a sparsity-deconvolution U-Net whose first estimate x0 goes through an error-feedback
   (back-projection) unit: x0 is re-blurred by the PSF, its residual against the denoised
   image is lifted back to the output grid by a small learned projection and added,
   x = pos(pre(x0) + P(denoised - H x0 - b)). The PSF and the background b are part of
   the model; pos, the non-negative output, is |.| (softplus, the first choice, killed the
   output on sparse specimens: `DpsSpec.output_activation`).

The physics-informed objective of the second stage, with weights as settings:
    |H x + b - t|^2 + w_ssim (1 - SSIM(H x + b, t)) + w_l1 |x|_1 + w_hessian Hessian(x)
where t, the image the estimate must explain, is the noisy target of the pair (as
ZS-DeconvNet's deconvolution term; the default, measured) or the denoised image held fixed
(the sparse deconvolution of the denoised image, as the paper's dual stage reads; it fails
here, 10 dB below Wiener SIM, for a reason not yet found); `fidelity_to` chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from livedecon.engines._configfile import StrictModel
from livedecon.engines._networks import DpsSpec, UNet2D
from livedecon.engines._self_supervised import (
    SSIM_WINDOW_PX,
    RecorruptionConfig,
    exact_margin,
    hessian_penalty,
    reblur,
    recorrupt,
    ssim_torch,
    whiten,
)
from livedecon.engines._sim import SimSettings
from livedecon.engines._sim_pattern import SimParameters
from livedecon.engines._sim_training import (
    SimRecorruption,
    SimSchedule,
    sim_training_pairs,
    split_sr_pairs,
)
from livedecon.engines._tiling import restore_electrons
from livedecon.engines._training import (
    PatchSampler,
    Trainer,
    estimate_background,
    normalisation_scale,
    run_cosine,
)


class DpsLoss(StrictModel):
    """The DPS loss terms: the stages' weighting, SSIM, sparsity, Hessian and fidelity target."""

    denoise_weight: float = Field(0.5, ge=0, le=1, description="stage 1's share of the loss")
    ssim_weight: float = Field(0.1, ge=0)
    sparsity_weight: float = Field(0.002, ge=0, description="L1 of the estimate (model units)")
    hessian_weight: float = Field(0.002, ge=0)
    # measured (README, "SIM models"): on the bench's four SIM scenes +0.60 dB over the plain
    # fidelity, line pairs 120 nm instead of 140
    precondition: float | None = Field(
        0.03,
        gt=0,
        description="eps: the fidelity residual filtered by 1/sqrt(|OTF|^2 + eps), as"
        " ZS-DeconvNet's [loss] precondition; None: plain",
    )
    fidelity_to: Literal["denoised", "target"] = Field(
        "target",
        description="what the re-blurred estimate must explain: the recorrupted target"
        " (measured: SIM 30 photons 36.56 dB vs Wiener 33.91) or the denoised image, held"
        " fixed (measured: 23.3 dB, a failure not yet understood)",
    )


class DpsConfig(SimSchedule):
    """How DPS trains: network, loss, recorruption, schedule, patches and budget."""

    network: DpsSpec = DpsSpec()
    loss: DpsLoss = DpsLoss()
    recorruption: RecorruptionConfig = RecorruptionConfig(alpha_range=(0.5, 1.0))
    sim_recorruption: SimRecorruption = SimRecorruption()
    iterations: int = Field(1200, ge=1)


class DpsNet(nn.Module):
    """Denoising U-Net, then the deconvolution U-Net with the error-feedback unit. Returns
    (denoised, estimate) like the ZS-DeconvNet networks, so tiling and restore serve it."""

    psf: torch.Tensor  # buffers, registered in __init__
    background: torch.Tensor

    def __init__(self, spec: DpsSpec, psf: np.ndarray, background: float = 0.0) -> None:
        super().__init__()
        psf = np.asarray(psf, dtype=np.float32)
        if psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
            raise ValueError(f"DPS needs a square, odd 2D PSF; got shape {psf.shape}")
        self.spec = spec.model_copy(update={"psf_px": psf.shape[0]})
        self.upscale = 2 if spec.upsample else 1
        self.multiple = 2**spec.unet.levels
        r, w = self.upscale, spec.feedback_width
        self.denoiser = UNet2D(1, spec.unet)
        self.denoise_out = nn.Conv2d(self.denoiser.out_channels, 1, 3, padding=1)
        self.deconvolver = UNet2D(1, spec.unet)
        self.first = nn.Sequential(
            nn.Conv2d(self.deconvolver.out_channels, r * r, 3, padding=1), nn.PixelShuffle(r)
        )
        self.feedback = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, r * r, 3, padding=1),
            nn.PixelShuffle(r),
        )
        self.register_buffer("psf", torch.from_numpy(psf))
        self.register_buffer("background", torch.tensor(float(background)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        denoised = self.positive(self.denoise_out(self.denoiser(x)))
        pre = self.first(self.deconvolver(denoised))
        error = denoised - self.forward_model(self.positive(pre))
        return denoised, self.positive(pre + self.feedback(error))

    def positive(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.output_activation == "abs":
            return x.abs()
        return F.softplus(x, beta=10)

    def forward_model(self, estimate: torch.Tensor) -> torch.Tensor:
        """What the camera sees of an estimate: PSF blur, binning, the constant background.
        Training blurs through the FFT (fast backward pass on a CPU); inference with a direct
        convolution, the same filter, which ONNX and TensorRT run."""
        if self.training:
            return reblur(estimate, self.psf, self.upscale) + self.background
        k = self.psf.shape[-1] // 2
        padded = F.pad(estimate, (k, k, k, k), mode="reflect")
        blurred = F.conv2d(padded, self.psf[None, None])
        if self.upscale > 1:
            blurred = F.avg_pool2d(blurred, self.upscale)
        return blurred + self.background


def dps_loss(
    denoised: torch.Tensor,
    estimate: torch.Tensor,
    target: torch.Tensor,
    forward_model: Callable[[torch.Tensor], torch.Tensor],
    psf: torch.Tensor,
    loss: DpsLoss,
    upscale: int,
) -> dict[str, torch.Tensor]:
    """Total loss and its parts (see the module docstring); `psf` is the forward model's. The
    border the PSF reaches past the patch is left out of the fidelity terms."""
    denoise = ((denoised - target) ** 2).mean()
    explained = denoised.detach() if loss.fidelity_to == "denoised" else target
    margin = exact_margin(psf.shape[-1] // 2, upscale)
    index = (..., slice(margin, -margin or None), slice(margin, -margin or None))
    reblurred = forward_model(estimate)[index]
    explained = explained[index]
    residual = reblurred - explained
    if loss.precondition is not None:
        residual = whiten(residual, psf, upscale, loss.precondition)
    fidelity = (residual**2).mean()
    structure = 1 - ssim_torch(reblurred, explained)
    sparsity = estimate.abs().mean()
    hessian = hessian_penalty(estimate)
    mu = loss.denoise_weight
    total = (
        mu * denoise
        + (1 - mu) * (fidelity + loss.ssim_weight * structure)
        + loss.sparsity_weight * sparsity
        + loss.hessian_weight * hessian
    )
    return {
        "total": total,
        "denoise": denoise,
        "fidelity": fidelity,
        "ssim": structure,
        "sparsity": sparsity,
        "hessian": hessian,
    }


PairMaker = Callable[[torch.Tensor, "torch.Generator | None"], tuple[torch.Tensor, torch.Tensor]]


class _DpsObjective:
    def __init__(self, loss: DpsLoss, make_pairs: PairMaker) -> None:
        self.loss, self.make_pairs = loss, make_pairs

    def __call__(
        self, model: DpsNet, batch: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        inputs, targets = self.make_pairs(batch, generator)
        denoised, estimate = model(inputs)
        return dps_loss(
            denoised, estimate, targets, model.forward_model, model.psf, self.loss, model.upscale
        )


@dataclass
class DpsResult:
    """A trained DPS network, its normalisation, loss history and SIM settings."""

    model: DpsNet
    scale_e: float  # photoelectrons per model unit
    losses: list[float]
    sim_settings: SimSettings | None = None  # SIM: the reconstruction it was trained behind


def _fit(
    model: DpsNet,
    sampler: PatchSampler,
    make_pairs: PairMaker,
    config: DpsConfig,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    margin = exact_margin(model.spec.psf_px // 2, model.upscale)
    if config.patch_px < 2 * margin + SSIM_WINDOW_PX:
        raise ValueError(
            f"patch_px {config.patch_px} is too small for the {model.spec.psf_px}-pixel PSF: the"
            f" fidelity and SSIM terms need at least {2 * margin + SSIM_WINDOW_PX}"
        )
    objective = _DpsObjective(config.loss, make_pairs)
    trainer = Trainer(
        model, objective, sampler, config.batch_size, config.learning_rate, config.seed
    )
    budget_s = None if config.budget_min is None else 60 * config.budget_min
    return run_cosine(trainer, config.iterations, config.learning_rate, budget_s, on_step)


def train_dps(
    frames_e: list[np.ndarray],
    psf_2x: np.ndarray,
    read_noise_e: float,
    config: DpsConfig | None = None,
) -> DpsResult:
    """DPS on widefield (or TIRF) frames in photoelectrons with the PSF on the 2x grid
    (K, K), summing to 1: recorrupted pairs drawn from the frames at every step. The frames'
    constant background (`training.estimate_background`) is part of the forward model, so
    the estimate holds the specimen alone and the sparsity term does not fight a constant."""
    config = config or DpsConfig()
    if not config.network.upsample:
        raise ValueError("widefield DPS restores onto the 2x grid: upsample must be on")
    scale = normalisation_scale(frames_e, config.scale_percentile)
    background = estimate_background(frames_e) / scale
    recorruption = config.recorruption.model_copy(update={"beta2": read_noise_e**2})

    def make_pairs(
        batch_e: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisier, cleaner = recorrupt(batch_e, recorruption, generator)
        return noisier / scale, cleaner / scale

    torch.manual_seed(config.seed)
    model = DpsNet(config.network, psf_2x, background)
    sampler = PatchSampler(frames_e, (config.patch_px, config.patch_px), config.seed)
    return DpsResult(model, scale, _fit(model, sampler, make_pairs, config))


def train_dps_sim(
    frames_e: np.ndarray,
    psf_2x: np.ndarray,
    parameters: SimParameters,
    cutoff_per_um: float,
    read_noise_e: float,
    config: DpsConfig | None = None,
    on_step: Callable[[int], None] | None = None,
) -> DpsResult:
    """DPS on one SIM acquisition's raw frames (photoelectrons, background removed) behind the
    Wiener reconstruction with a known pattern, re-blurring with the SIM PSF: the same pairs
    and PSF ZS-DeconvNet-SIM trains on. Restore the SR image reconstructed with the result's
    `sim_settings` through `restore_dps`."""
    config = config or DpsConfig(network=DpsSpec(upsample=False))
    if config.network.upsample:
        raise ValueError("SIM images are on the SR grid already: upsample must be off")
    data = sim_training_pairs(
        frames_e,
        psf_2x,
        parameters,
        cutoff_per_um,
        read_noise_e,
        config.sim_recorruption,
        config.scale_percentile,
        config.seed,
    )

    def make_pairs(
        batch: torch.Tensor, _generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return split_sr_pairs(batch)

    torch.manual_seed(config.seed)
    model = DpsNet(config.network, data.psf)
    sampler = PatchSampler(data.pairs, (2, config.patch_px, config.patch_px), config.seed)
    losses = _fit(model, sampler, make_pairs, config, on_step)
    return DpsResult(model, data.scale_e, losses, data.settings)


@torch.no_grad()
def restore_dps(result: DpsResult, image_e: np.ndarray) -> np.ndarray:
    """The DPS estimate of a frame (widefield: onto the 2x grid) or of a Wiener SR-SIM image,
    in photoelectrons per output pixel, background excluded."""
    model = result.model.eval()

    def infer(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch))[1].numpy()

    return restore_electrons(infer, image_e, result.scale_e, model.multiple, model.upscale)
