"""Zero-shot training of the 2D ZS-DeconvNet on the user's own noisy frames.

Frames come in photoelectrons; one fixed scale (a high percentile of the training data) turns
them into model units and is kept with the model, so every later frame is normalised the same
way: no per-frame min-max, intensities stay comparable across a time-lapse.
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
from tqdm import tqdm

from livedecon.engines.configfile import StrictModel
from livedecon.engines.networks import Network2DSpec, ZSDeconvNet2D
from livedecon.engines.self_supervised import (
    LossConfig,
    RecorruptionConfig,
    recorrupt,
    zs_deconv_loss,
)

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class TrainingConfig(StrictModel):
    network: Network2DSpec = Network2DSpec()
    recorruption: RecorruptionConfig = RecorruptionConfig()
    loss: LossConfig = LossConfig()
    patch_px: int = Field(64, ge=16, description="input patch side; a multiple of the network's")
    batch_size: int = Field(4, ge=1)
    iterations: int = Field(5000, ge=1)
    learning_rate: float = Field(5e-5, gt=0, description="Adam start (reference: 5e-5)")
    lr_decay_factor: float = Field(0.5, gt=0, le=1)
    lr_decay_every: int = Field(10_000, ge=1, description="iterations between decays")
    checkpoint_every: int = Field(500, ge=1)
    scale_percentile: float = Field(99.9, gt=50, le=100)
    seed: int = 0


@dataclass
class TrainingResult:
    model: ZSDeconvNet2D
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
    """Random patches biased to foreground, with random rotations and flips."""

    def __init__(self, frames: Sequence[np.ndarray], patch_px: int, seed: int) -> None:
        self.frames = [np.asarray(f, dtype=np.float32) for f in frames]
        for f in self.frames:
            if f.ndim != 2 or min(f.shape) < patch_px:
                raise ValueError(f"frame of shape {f.shape} is smaller than a {patch_px} patch")
        self.patch = patch_px
        self.rng = np.random.default_rng(seed)

    def _candidate(self) -> np.ndarray:
        frame = self.frames[self.rng.integers(len(self.frames))]
        y = self.rng.integers(frame.shape[0] - self.patch + 1)
        x = self.rng.integers(frame.shape[1] - self.patch + 1)
        return frame[y : y + self.patch, x : x + self.patch]

    def batch(self, n: int) -> np.ndarray:
        out = np.empty((n, 1, self.patch, self.patch), dtype=np.float32)
        for i in range(n):
            a, b = self._candidate(), self._candidate()
            patch = a if a.mean() >= b.mean() else b  # the brighter of two: foreground bias
            patch = np.rot90(patch, self.rng.integers(4))
            if self.rng.random() < 0.5:
                patch = patch[:, ::-1]
            out[i, 0] = patch
        return out


def train_2d(
    frames_e: Sequence[np.ndarray],
    psf: np.ndarray,
    config: TrainingConfig,
    work_dir: Path | None = None,
    read_noise_e: float | None = None,
    show_progress: bool = True,
) -> TrainingResult:
    """Train from noisy frames in photoelectrons with a PSF on the output grid (sum 1).

    With `work_dir`, checkpoints are written every `checkpoint_every` iterations and a run
    resumes from the last one. Ctrl-C stops after the current step with its weights saved.
    """
    torch.manual_seed(config.seed)
    model = ZSDeconvNet2D(config.network)
    if config.patch_px % model.multiple:
        raise ValueError(f"patch_px {config.patch_px} must be a multiple of {model.multiple}")
    scale = normalisation_scale(frames_e, config.scale_percentile)
    # Recorruption happens in photoelectrons, where shot-noise variance equals the mean
    # (beta1 ~ 1) and read noise is the camera's; the pair is then scaled to model units.
    recorruption = config.recorruption
    if read_noise_e is not None and recorruption.beta2 is None:
        recorruption = recorruption.model_copy(update={"beta2": read_noise_e**2})
    sampler = PatchSampler(frames_e, config.patch_px, config.seed)
    psf_t = torch.as_tensor(np.asarray(psf, dtype=np.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay_factor
    )
    generator = torch.Generator().manual_seed(config.seed)
    start, history = 0, []
    checkpoint = work_dir / CHECKPOINT if work_dir else None
    if checkpoint and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = int(state["iteration"])
        history = json.loads((work_dir / "history.json").read_text())
        log.info("resuming training at iteration %d", start)

    def reseed(iteration: int) -> None:
        # Random streams restart at every checkpoint, so a resumed run repeats exactly
        # what an uninterrupted one does.
        sampler.rng = np.random.default_rng([config.seed, iteration])
        generator.manual_seed(config.seed * 1_000_003 + iteration)

    def save(iteration: int) -> None:
        if checkpoint is None:
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "iteration": iteration,
        }
        torch.save(state, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)  # atomic: never a half checkpoint
        (work_dir / "history.json").write_text(json.dumps(history))

    model.train()
    reseed(start)
    done, interrupted = start, False
    bar = tqdm(total=config.iterations, initial=start, disable=not show_progress, unit="it")
    try:
        for iteration in range(start, config.iterations):
            y = torch.from_numpy(sampler.batch(config.batch_size))
            inputs, target = (p / scale for p in recorrupt(y, recorruption, generator))
            denoised, deconvolved = model(inputs)
            losses = zs_deconv_loss(
                denoised, deconvolved, target, psf_t, config.loss, model.upscale
            )
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            schedule.step()
            done = iteration + 1
            history.append({k: float(v.detach()) for k, v in losses.items()})
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
def restore_2d(model: ZSDeconvNet2D, frame_e: np.ndarray, scale_e: float) -> np.ndarray:
    """Deconvolved, 2x frame in photoelectrons per output pixel (flux kept: the network's
    output is an intensity on the fine grid, so each fine pixel holds a quarter of it)."""
    frame = np.asarray(frame_e, dtype=np.float32) / scale_e
    m = model.multiple
    ny, nx = frame.shape
    pad = ((0, -ny % m), (0, -nx % m))
    padded = np.pad(frame, pad, mode="reflect")
    _, deconvolved = model(torch.from_numpy(padded)[None, None])
    up = model.upscale
    out = deconvolved[0, 0, : ny * up, : nx * up].numpy()
    return out * scale_e / (up * up)
