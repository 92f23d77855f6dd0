"""Zero-shot training of ZS-DeconvNet (2D and 3D) on the user's own noisy data.

Frames come in photoelectrons; one fixed scale (a high percentile of the training data) turns
them into model units and is kept with the model, so every later frame is normalised the same
way: no per-frame min-max, intensities stay comparable across a time-lapse.

The pieces are shared with test-time adaptation (engines/adaptation.py): `PatchSampler` cuts
random patches, `Objective` turns a batch into the self-supervised losses, `Trainer` takes one
optimiser step. `train` adds the schedule, checkpoints, resume and Ctrl-C around them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import nn
from tqdm import tqdm

from livedecon.engines.configfile import StrictModel
from livedecon.engines.networks import (
    Network2DSpec,
    Network3DSpec,
    NetworkSpec,
    build_network,
)
from livedecon.engines.self_supervised import (
    LossConfig,
    RecorruptionConfig,
    exact_margin,
    gap_amending_term,
    odd_even_pairs,
    recorrupt,
    zs_deconv_loss,
    zs_deconv_loss_3d,
)
from livedecon.engines.tiling import restore_electrons

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class TrainingConfig(StrictModel):
    network: NetworkSpec = Field(Network2DSpec(), discriminator="kind")
    recorruption: RecorruptionConfig = RecorruptionConfig()
    loss: LossConfig = LossConfig()
    patch_px: int = Field(64, ge=16, description="input patch side; a multiple of the network's")
    patch_slices: int = Field(
        16, ge=4, description="3D: raw slices per patch; odd/even pairs take half each"
    )
    batch_size: int = Field(4, ge=1)
    iterations: int = Field(5000, ge=1)
    learning_rate: float = Field(5e-5, gt=0, description="Adam start (reference: 5e-5)")
    lr_decay_factor: float = Field(0.5, gt=0, le=1)
    lr_decay_every: int = Field(10_000, ge=1, description="iterations between decays")
    checkpoint_every: int = Field(500, ge=1)
    scale_percentile: float = Field(99.9, gt=50, le=100)
    seed: int = 0

    @property
    def is_3d(self) -> bool:
        return isinstance(self.network, Network3DSpec)

    def patch_shape(self) -> tuple[int, ...]:
        lateral = (self.patch_px, self.patch_px)
        return (self.patch_slices, *lateral) if self.is_3d else lateral


@dataclass
class TrainingResult:
    model: nn.Module
    scale_e: float  # photoelectrons per model unit
    iterations_done: int
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False


def normalisation_scale(frames_e: Sequence[np.ndarray], percentile: float) -> float:
    values = np.concatenate([np.asarray(f, dtype=np.float32).ravel() for f in frames_e])
    scale = float(np.percentile(values, percentile))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("training frames hold no signal above zero photoelectrons")
    return scale


class PatchSampler:
    """Random patches (2D frames or 3D stacks) biased to foreground, with random rotations
    and flips in the lateral plane."""

    def __init__(self, images: Sequence[np.ndarray], patch_shape: tuple[int, ...], seed: int):
        self.images = [np.asarray(f, dtype=np.float32) for f in images]
        if not self.images:
            raise ValueError("no training data given")
        self.patch_shape = tuple(patch_shape)
        for image in self.images:
            if image.ndim != len(self.patch_shape) or any(
                n < p for n, p in zip(image.shape, self.patch_shape, strict=True)
            ):
                raise ValueError(
                    f"data of shape {image.shape} cannot hold a {self.patch_shape} patch"
                )
        self.rng = np.random.default_rng(seed)

    def _candidate(self) -> np.ndarray:
        image = self.images[self.rng.integers(len(self.images))]
        shape = zip(image.shape, self.patch_shape, strict=True)
        corner = [self.rng.integers(n - p + 1) for n, p in shape]
        return image[tuple(slice(c, c + p) for c, p in zip(corner, self.patch_shape, strict=True))]

    def batch(self, n: int) -> np.ndarray:
        out = np.empty((n, 1, *self.patch_shape), dtype=np.float32)
        for i in range(n):
            a, b = self._candidate(), self._candidate()
            patch = a if a.mean() >= b.mean() else b  # the brighter of two: foreground bias
            patch = np.rot90(patch, self.rng.integers(4), axes=(-2, -1))
            if self.rng.random() < 0.5:
                patch = patch[..., ::-1]
            out[i, 0] = patch
        return out


class Objective:
    """The self-supervised losses of one batch of raw patches in photoelectrons.

    2D: recorrupted pairs, made in photoelectrons where shot-noise variance equals the mean
    (beta1 ~ 1) and read noise is the camera's, then scaled to model units.
    3D: odd/even slice pairs with the gap-amending term. The 3D PSF comes at the acquisition
    z step (as stored in a bundle); the pairs are two steps apart, so the loss blurs with
    every other PSF plane, the in-focus one included.
    """

    def __init__(
        self,
        spec: NetworkSpec,
        psf: np.ndarray,
        scale_e: float,
        loss: LossConfig,
        recorruption: RecorruptionConfig,
        read_noise_e: float | None = None,
    ) -> None:
        self.is_3d = isinstance(spec, Network3DSpec)
        psf = np.asarray(psf, dtype=np.float32)
        if psf.ndim != (3 if self.is_3d else 2):
            raise ValueError(f"a {'3D' if self.is_3d else '2D'} network needs a matching PSF")
        if self.is_3d:
            centre = psf.shape[0] // 2
            psf = psf[centre % 2 :: 2] / psf[centre % 2 :: 2].sum()
        self.psf = torch.from_numpy(np.array(psf, dtype=np.float32))  # a writable copy
        self.scale_e = scale_e
        self.loss = loss
        if read_noise_e is not None and recorruption.beta2 is None:
            recorruption = recorruption.model_copy(update={"beta2": read_noise_e**2})
        self.recorruption = recorruption

    def check_patch(self, patch_px: int, upscale: int) -> None:
        """Refuse, before any training, patches the deconvolution loss cannot use."""
        margin = exact_margin(self.psf.shape[-1] // 2, upscale)
        if patch_px <= 2 * margin:
            raise ValueError(
                f"patch_px {patch_px} is too small for the {self.psf.shape[-1]}-pixel PSF: the"
                f" deconvolution loss needs more than {2 * margin} pixels per side"
            )

    def __call__(
        self, model: nn.Module, batch_e: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        upscale = model.upscale
        if self.psf.device != batch_e.device:
            self.psf = self.psf.to(batch_e.device)
        if self.is_3d:
            inputs, targets = odd_even_pairs(batch_e / self.scale_e)
            gap = gap_amending_term(model, inputs, targets)
            denoised, deconvolved = model(inputs)
            return zs_deconv_loss_3d(
                denoised, deconvolved, targets, gap, self.psf, self.loss, upscale
            )
        inputs, target = (
            p / self.scale_e for p in recorrupt(batch_e, self.recorruption, generator)
        )
        denoised, deconvolved = model(inputs)
        return zs_deconv_loss(denoised, deconvolved, target, self.psf, self.loss, upscale)


class Trainer:
    """One Adam step at a time on patches from a sampler: the unit of training and adaptation."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        sampler: PatchSampler,
        batch_size: int,
        learning_rate: float,
        seed: int,
    ) -> None:
        self.model, self.objective, self.sampler = model, objective, sampler
        self.batch_size = batch_size
        self.optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(0.9, 0.999))
        self.generator = torch.Generator().manual_seed(seed)

    def step(self) -> dict[str, float]:
        self.model.train()
        device = next(self.model.parameters()).device
        batch = torch.from_numpy(self.sampler.batch(self.batch_size)).to(device)
        losses = self.objective(self.model, batch, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}


def train(
    data_e: Sequence[np.ndarray],
    psf: np.ndarray,
    config: TrainingConfig,
    work_dir: Path | None = None,
    read_noise_e: float | None = None,
    show_progress: bool = True,
    device: str | None = None,
) -> TrainingResult:
    """Train from noisy frames (Y, X) or stacks (Z, Y, X) in photoelectrons, with a PSF on the
    output grid summing to 1 (2D: (K, K); 3D: (Kz, K, K)).

    With `work_dir`, checkpoints are written every `checkpoint_every` iterations and a run
    resumes from the last one. Ctrl-C stops after the current step with its weights saved.
    `device`: where to train (default: the GPU when torch sees one, else the CPU).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    model = build_network(config.network).to(device)
    if config.patch_px % model.multiple:
        raise ValueError(f"patch_px {config.patch_px} must be a multiple of {model.multiple}")
    scale = normalisation_scale(data_e, config.scale_percentile)
    objective = Objective(
        config.network, psf, scale, config.loss, config.recorruption, read_noise_e
    )
    objective.check_patch(config.patch_px, model.upscale)
    sampler = PatchSampler(data_e, config.patch_shape(), config.seed)
    trainer = Trainer(
        model, objective, sampler, config.batch_size, config.learning_rate, config.seed
    )
    schedule = torch.optim.lr_scheduler.StepLR(
        trainer.optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay_factor
    )
    start, history = 0, []
    checkpoint = work_dir / CHECKPOINT if work_dir else None
    if checkpoint and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = int(state["iteration"])
        history = json.loads((work_dir / "history.json").read_text())
        log.info("resuming training at iteration %d", start)

    def reseed(iteration: int) -> None:
        # Random streams restart at every checkpoint, so a resumed run repeats exactly
        # what an uninterrupted one does.
        sampler.rng = np.random.default_rng([config.seed, iteration])
        trainer.generator.manual_seed(config.seed * 1_000_003 + iteration)

    def save(iteration: int) -> None:
        if checkpoint is None:
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "iteration": iteration,
        }
        torch.save(state, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)  # atomic: never a half checkpoint
        (work_dir / "history.json").write_text(json.dumps(history))

    reseed(start)
    done, interrupted = start, False
    bar = tqdm(total=config.iterations, initial=start, disable=not show_progress, unit="it")
    try:
        for iteration in range(start, config.iterations):
            history.append(trainer.step())
            schedule.step()
            done = iteration + 1
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['total']:.4f}")
            if done % config.checkpoint_every == 0:
                save(done)
                reseed(done)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("training interrupted at iteration %d; last good weights kept", done)
    finally:
        bar.close()
    save(done)
    model.eval()
    return TrainingResult(model, scale, done, history, interrupted)


@torch.no_grad()
def restore(model: nn.Module, image_e: np.ndarray, scale_e: float) -> np.ndarray:
    """Deconvolved, laterally 2x frame (Y, X) or stack (Z, Y, X) in photoelectrons per output
    pixel, straight from a torch model (the runtimes do the same through engines.runtime)."""
    model.eval()
    device = next(model.parameters()).device

    def infer(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch).to(device))[1].float().cpu().numpy()

    return restore_electrons(infer, image_e, scale_e, model.multiple, model.upscale)
