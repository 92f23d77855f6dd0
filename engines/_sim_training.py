"""ZS-DeconvNet-SIM: the dual-stage network trained zero-shot on one noisy SIM acquisition.

The raw frames y (photoelectrons, 3 angles x 3 phases) are recorrupted twice with the same
noise draw z, as the published SIM recipe does:
    sigma^2 = beta1 * max(G3x3(y), 0) + beta2,   beta1 in [1.5, 3], alpha in [0.2, 0.5]
    noisier = y + alpha * sigma * z,            cleaner = y - sigma * z / alpha
(G3x3: 3 x 3 Gaussian smoothing; beta2: the camera's read-noise variance), and each set is
reconstructed with the same pattern and Wiener constant into an SR-SIM image. The network
(no further upsampling: the SR image is already on the 2x grid) learns on those pairs with
the ZS-DeconvNet loss, the deconvolution term re-blurring with the SIM PSF: the same
reconstruction of a point's noise-free frames. At inference it restores the Wiener SR image
of the original frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from scipy import ndimage, signal

from livedecon.engines._configfile import StrictModel
from livedecon.engines._enums import NetworkKind
from livedecon.engines._networks import Network2DSpec, UNetSpec, ZSDeconvNet2D, build_network
from livedecon.engines._self_supervised import LossConfig, zs_deconv_loss
from livedecon.engines._sim import (
    UPSCALE,
    SimParameters,
    SimSettings,
    _prepare,
    bin_to_camera,
    reconstruct,
    wiener_constant,
)
from livedecon.engines._tiling import restore_electrons
from livedecon.engines._training import PatchSampler, Trainer, run_cosine

SIM_PSF_PX = 31
# preconditioned as the 2D recipes are (README, "SIM models"): on the bench's four SIM scenes
# +0.41 dB over the plain loss, line pairs 120 nm instead of 160
SIM_LOSS = LossConfig(norm="l2", hessian_weight=0.002, precondition=0.03)


class SimRecorruption(StrictModel):
    """ZS-DeconvNet-SIM's recorruption of the raw frames: the published ranges, the pairs."""

    alpha_range: tuple[float, float] = Field((0.2, 0.5), description="noise split range")
    beta1_range: tuple[float, float] = Field((1.5, 3.0), description="shot-noise scale range")
    pairs: int = Field(24, ge=1, le=1000, description="recorrupted SR pairs to train on")


class SimSchedule(StrictModel):
    """The schedule and budget both SIM networks (ZS-DeconvNet-SIM, DPS) train under."""

    iterations: int = Field(600, ge=1)
    budget_min: float | None = Field(
        None, gt=0, description="stop after this wall time; the schedule follows whichever ends"
    )
    patch_px: int = Field(64, ge=16)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    scale_percentile: float = Field(99.9, gt=0, le=100)
    seed: int = 0


class SimTrainingConfig(SimSchedule):
    """How ZS-DeconvNet-SIM trains: network, recorruption, losses, schedule and budget."""

    network: Network2DSpec = Network2DSpec(
        kind=NetworkKind.ZS_DECONVNET_2D_FAST,
        unet=UNetSpec(levels=3, convs_per_block=2, base_width=16),
        tail_width=32,
        upsample=False,
    )
    recorruption: SimRecorruption = SimRecorruption()
    loss: LossConfig = SIM_LOSS

    @field_validator("loss", mode="before")
    @classmethod
    def _sim_loss_defaults(cls, value: Any) -> Any:
        # a [loss] table that sets one term keeps the SIM defaults for the others
        return SIM_LOSS.model_dump() | value if isinstance(value, dict) else value


@dataclass
class SimTrainingResult:
    """A trained ZS-DeconvNet-SIM with its scale, SIM PSF and the reconstruction it learned."""

    model: ZSDeconvNet2D
    scale_e: float  # photoelectrons per model unit of the SR images
    sim_psf: np.ndarray
    settings: SimSettings  # the reconstruction the network was trained behind (Wiener fixed)
    losses: list[float]


def sim_psf(
    parameters: SimParameters,
    psf_2x: np.ndarray,
    frame_shape: tuple[int, int],
    cutoff_per_um: float,
    settings: SimSettings,
) -> np.ndarray:
    """The reconstruction's own PSF: a point at the frame's centre lit by the pattern,
    imaged, reconstructed with `settings`, cropped to SIM_PSF_PX and normalised."""
    ny, nx = (UPSCALE * n for n in frame_shape)
    point = np.zeros((ny, nx))
    point[ny // 2, nx // 2] = 1.0
    y, x = np.mgrid[:ny, :nx]
    frames = []
    for k, phases, m in zip(parameters.k, parameters.phases, parameters.modulation, strict=True):
        for phase in phases:
            lit = 1 + m * np.cos(2 * np.pi * (k[0] * y + k[1] * x) + phase)
            frames.append(bin_to_camera(signal.fftconvolve(point * lit, psf_2x, mode="same")))
    image = reconstruct(
        np.array(frames) * 1e4,
        psf_2x,
        parameters.output_pixel_um,
        cutoff_per_um,
        settings,
        parameters,
    ).image
    h = SIM_PSF_PX // 2
    crop = np.clip(image[ny // 2 - h : ny // 2 + h + 1, nx // 2 - h : nx // 2 + h + 1], 0, None)
    return crop / crop.sum()


def recorrupted_pairs(
    frames_e: np.ndarray,
    reconstruct_frames: Callable[[np.ndarray], np.ndarray],
    read_noise_e: float,
    recorruption: SimRecorruption,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """(2, 2Y, 2X) pairs: the SR images of the noisier and the cleaner recorrupted frames."""
    smooth = ndimage.gaussian_filter(frames_e, (0, 1, 1), truncate=1.0)  # 3 x 3 Gaussian
    pairs = []
    for _ in range(recorruption.pairs):
        alpha = rng.uniform(*recorruption.alpha_range)
        beta1 = rng.uniform(*recorruption.beta1_range)
        sigma = np.sqrt(beta1 * np.clip(smooth, 0, None) + read_noise_e**2)
        z = rng.standard_normal(frames_e.shape)
        noisier = reconstruct_frames(frames_e + alpha * sigma * z)
        cleaner = reconstruct_frames(frames_e - sigma * z / alpha)
        pairs.append(np.stack([noisier, cleaner]).astype(np.float32))
    return pairs


def split_sr_pairs(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisier, cleaner) inputs and targets (N, 1, P, P) from sampled pairs (N, 1, 2, P, P)."""
    return batch[:, 0, 0:1], batch[:, 0, 1:2]


class _PairObjective:
    """The ZS-DeconvNet loss on (noisier, cleaner) SR patches, re-blurring with the SIM PSF."""

    def __init__(self, psf: np.ndarray, loss: LossConfig) -> None:
        self.psf = torch.from_numpy(np.asarray(psf, dtype=np.float32))
        self.loss = loss

    def __call__(
        self, model: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        inputs, targets = split_sr_pairs(batch)
        denoised, deconvolved = model(inputs)
        return zs_deconv_loss(denoised, deconvolved, targets, self.psf, self.loss, upscale=1)


@dataclass
class SimPairs:
    """What a network learns SIM restoration from: recorrupted SR pairs (model units), the
    SIM PSF, and the reconstruction they came through."""

    pairs: list[np.ndarray]  # (2, 2Y, 2X): noisier, cleaner
    scale_e: float
    psf: np.ndarray
    settings: SimSettings


def sim_training_pairs(
    frames_e: np.ndarray,
    psf_2x: np.ndarray,
    parameters: SimParameters,
    cutoff_per_um: float,
    read_noise_e: float,
    recorruption: SimRecorruption,
    scale_percentile: float = 99.9,
    seed: int = 0,
) -> SimPairs:
    """Recorrupt one acquisition's raw frames (photoelectrons, background removed) and
    reconstruct each set with the pattern given and the Wiener constant of the frames."""
    frames_e = np.asarray(frames_e, dtype=np.float64)
    pixel = parameters.output_pixel_um
    base = SimSettings()
    w = wiener_constant(_prepare(frames_e, psf_2x, pixel, cutoff_per_um, base))
    settings = base.model_copy(update={"wiener": w})

    def reconstruct_frames(frames: np.ndarray) -> np.ndarray:
        return reconstruct(frames, psf_2x, pixel, cutoff_per_um, settings, parameters).image

    rng = np.random.default_rng(seed)
    psf = sim_psf(parameters, psf_2x, frames_e.shape[-2:], cutoff_per_um, settings)
    pairs = recorrupted_pairs(frames_e, reconstruct_frames, read_noise_e, recorruption, rng)
    scale = float(np.percentile(np.stack([p[1] for p in pairs]), scale_percentile))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("the SIM reconstructions hold no signal above zero photoelectrons")
    return SimPairs([p / scale for p in pairs], scale, psf, settings)


def train_zs_sim(
    frames_e: np.ndarray,
    psf_2x: np.ndarray,
    parameters: SimParameters,
    cutoff_per_um: float,
    read_noise_e: float,
    config: SimTrainingConfig | None = None,
    on_step: Callable[[int], None] | None = None,
) -> SimTrainingResult:
    """Train ZS-DeconvNet-SIM on one acquisition's raw frames (photoelectrons, background
    removed) with a known pattern (estimate it with `engines._sim.estimate_parameters`)."""
    config = config or SimTrainingConfig()
    if config.network.upsample:
        raise ValueError("the SIM network works on the SR grid already: upsample must be off")
    data = sim_training_pairs(
        frames_e,
        psf_2x,
        parameters,
        cutoff_per_um,
        read_noise_e,
        config.recorruption,
        config.scale_percentile,
        config.seed,
    )
    torch.manual_seed(config.seed)
    model = build_network(config.network)
    sampler = PatchSampler(data.pairs, (2, config.patch_px, config.patch_px), config.seed)
    objective = _PairObjective(data.psf, config.loss)
    trainer = Trainer(
        model, objective, sampler, config.batch_size, config.learning_rate, config.seed
    )
    budget_s = None if config.budget_min is None else 60 * config.budget_min
    losses = run_cosine(trainer, config.iterations, config.learning_rate, budget_s, on_step)
    return SimTrainingResult(model, data.scale_e, data.psf, data.settings, losses)


@torch.no_grad()
def restore_sim(result: SimTrainingResult, sr_image_e: np.ndarray) -> np.ndarray:
    """The network's deconvolved image of an SR-SIM image (photoelectrons per output pixel)."""
    model = result.model

    def infer(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch))[1].numpy()

    return restore_electrons(infer, sr_image_e, result.scale_e, model.multiple, 1)
