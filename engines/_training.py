"""Zero-shot training of ZS-DeconvNet (2D and 3D) on the user's own noisy data.

Frames come in photoelectrons; one fixed scale (a high percentile of the training data) turns
them into model units and is kept with the model, so every later frame is normalised the same
way: no per-frame min-max, intensities stay comparable across a time-lapse.

The pieces are shared with test-time adaptation (engines/_adaptation.py): `PatchSampler` cuts
random patches, `Objective` turns a batch into the self-supervised losses, `Trainer` takes one
optimiser step. `train` adds the schedule, checkpoints, resume and Ctrl-C around them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, Protocol, Self, TypeVar

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm import tqdm

from livedecon.engines._configfile import StrictModel
from livedecon.engines._networks import (
    Network2DSpec,
    Network3DSpec,
    ZSDeconvNet3D,
    ZSDeconvNetwork,
    build_network,
    fast_2d_spec,
    serves_denoised,
)
from livedecon.engines._refinement import MAX_ITERATIONS as MAX_REFINE_ITERATIONS
from livedecon.engines._self_supervised import (
    LossConfig,
    RecorruptionConfig,
    auto_precondition,
    exact_margin,
    gap_amending_term,
    odd_even_pairs,
    recorrupt,
    zs_deconv_loss,
    zs_deconv_loss_3d,
)
from livedecon.engines._tiling import restore_electrons

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
# Richardson-Lucy steps after a 2D network by default. Measured (README, "Refinement against
# the frame"), on the bench's 16 scenes at 15 and 50 photons: 2 steps +0.08 dB on average
# (+0.21 at 15 photons, -0.29 at worst), dim recall never lower; 4 steps +0.05, 8 steps 0.00
REFINE_ITERATIONS_2D = 2
# 3D: RL steps on the denoised stack; 1-3 scored within 0.4 dB of each other on the bench's
# volumes, more drifts toward RL's noisier optimum (engines/_refinement.py)
REFINE_ITERATIONS_3D = 2


class TrainingConfig(StrictModel):
    """How ZS-DeconvNet trains: network, recorruption, loss, patches, schedule and budget
    (`default_recipe` picks one for the machine)."""

    # ZS-DeconvNet only: Self-Net trains through engines/_selfnet_training.py
    network: Network2DSpec | Network3DSpec = Field(Network2DSpec(), discriminator="kind")
    recorruption: RecorruptionConfig = RecorruptionConfig()
    loss: LossConfig = LossConfig()
    patch_px: int = Field(64, ge=16, description="input patch side; a multiple of the network's")
    patch_slices: int = Field(
        16, ge=4, description="3D: raw slices per patch; odd/even pairs take half each"
    )
    batch_size: int = Field(4, ge=1)
    iterations: int = Field(5000, ge=1)
    max_passes: float | None = Field(
        None,
        gt=0,
        description="cap training at this many passes over the data (patch pixels drawn /"
        " pixels given): zero-shot training on little data degrades when it runs long, so a"
        " small dataset trains for fewer iterations; None: no cap",
    )
    learning_rate: float = Field(5e-5, gt=0, description="Adam start (reference: 5e-5)")
    schedule: Literal["step", "cosine"] = Field(
        "step",
        description="step: the reference's decay by lr_decay_factor every lr_decay_every;"
        " cosine: one smooth decay to 1% over the run (its iterations or its time budget)",
    )
    lr_decay_factor: float = Field(0.5, gt=0, le=1)
    lr_decay_every: int = Field(10_000, ge=1, description="iterations between decays")
    budget_min: float | None = Field(
        None,
        gt=0,
        description="wall-time cap in minutes: training stops at `iterations` or when the"
        " time is spent, whichever comes first; a cosine schedule then follows the time",
    )
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="keep an exponential moving average of the weights and bundle it"
        " (smooths the last steps' noise); None: the last step's weights",
    )
    checkpoint_every: int = Field(500, ge=1)
    scale_percentile: float = Field(99.9, gt=50, le=100)
    background: Literal["off", "estimate"] = Field(
        "off",
        description="estimate: a constant background (a low percentile of block means) joins"
        " the deconvolution loss's forward model, so the network restores the specimen alone;"
        " off: the reference's model, where the deconvolved image must also carry it",
    )
    refine_iterations: int | None = Field(
        None,
        ge=0,
        le=MAX_REFINE_ITERATIONS,
        description="restoring: Richardson-Lucy steps after the network"
        " (engines/_refinement.py), stored in the bundle. 2D: against the frame. 3D: they"
        " deconvolve the denoising stage's stack in place of the deconvolution stage. 0: the"
        f" network alone (the reference); None: {REFINE_ITERATIONS_2D} in 2D,"
        f" {REFINE_ITERATIONS_3D} in 3D",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _refinement_fits(self) -> Self:
        told = _serves(self.network)
        if told is not None and (told == "denoised") != bool(self.refinement):
            raise ValueError(
                "a 3D network serves its denoised stack exactly when Richardson-Lucy deconvolves"
                " it: leave network.serve unset (refine_iterations decides), or set"
                " refine_iterations = 0 for the deconvolution stage"
            )
        if self.refine_iterations and self.background == "estimate":
            raise ValueError(
                "refine_iterations needs background 'off': with 'estimate' the network's"
                " output lacks a background the refinement cannot know"
            )
        return self

    @property
    def is_3d(self) -> bool:
        return isinstance(self.network, Network3DSpec)

    @property
    def refinement(self) -> int:
        """The Richardson-Lucy steps a bundle of this recipe takes after its network."""
        if self.refine_iterations is not None:
            return self.refine_iterations
        if self.background == "estimate":
            return 0
        return REFINE_ITERATIONS_3D if self.is_3d else REFINE_ITERATIONS_2D

    @property
    def served_network(self) -> Network2DSpec | Network3DSpec:
        """The network as its bundle serves it: a 3D network serves its denoised stack when
        the recipe refines (Richardson-Lucy deconvolves it), else its deconvolution stage."""
        if isinstance(self.network, Network3DSpec):
            serve = "denoised" if self.refinement else "deconvolved"
            return self.network.model_copy(update={"serve": serve})
        return self.network

    @property
    def serves_denoised(self) -> bool:
        """Its bundle deconvolves the denoised stack with Richardson-Lucy (3D)."""
        return serves_denoised(self.served_network)

    def patch_shape(self) -> tuple[int, ...]:
        lateral = (self.patch_px, self.patch_px)
        return (self.patch_slices, *lateral) if self.is_3d else lateral


CPU_BUDGET_MIN = 10.0  # what a first model may cost on a 2-core machine
CPU_MAX_PASSES_2D = 1500.0  # passes over the data where the CPU recipes stop (measured)
# 3D, where the denoised stack serves (RL deconvolves it), on 64 x 64 x 16 volumes at 10, 30
# and 100 photons, denoised + 2 RL (dB): 300 passes 37.30 / 40.66 / 41.43, 600 passes 37.31 /
# 41.19 / 41.86; on the 30-photon volume 150 passes 40.07 and 1,200 passes 40.98 (README)
CPU_MAX_PASSES_3D = 600.0


def default_recipe(network: str | None = None, device: str | None = None) -> TrainingConfig:
    """The recipe `livedecon train` uses when given no config: on a CPU the fast network
    under a 10-minute budget with a cosine schedule over it; on a GPU the full network with
    the reference schedule (50,000 iterations on 128 x 128 patches, Adam 5e-5 halved every
    10,000). `network` ("fast", "full", "3d") overrides the architecture, not the schedule."""
    gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    # Measured (README, "Restoration quality", fourth round): preconditioning the
    # deconvolution residual by the OTF lifts the fast network from RL-0.3 to RL+0.9 dB at
    # 15-50 photons; a residual deconvolution stage adds up to 0.3 dB. Not measured on a GPU.
    preconditioned = LossConfig(norm="l2", precondition="auto")
    if gpu:
        recipe = TrainingConfig(
            network=Network2DSpec(residual=True),
            loss=preconditioned,
            patch_px=128,
            batch_size=4,
            iterations=50_000,
            learning_rate=5e-5,
            lr_decay_every=10_000,
        )
    else:
        # Measured (README, "Restoration quality"): recorrupting with alpha in [0.5, 1] and an
        # L2 loss each beat the reference's alpha in [1, 2] and L1 against Richardson-Lucy.
        recipe = TrainingConfig(
            network=fast_2d_spec().model_copy(update={"residual": True}),
            recorruption=RecorruptionConfig(alpha_range=(0.5, 1.0)),
            loss=preconditioned,
            patch_px=64,
            batch_size=4,
            iterations=1_000_000,
            learning_rate=1e-3,
            schedule="cosine",
            budget_min=CPU_BUDGET_MIN,
            # Measured (README, "Training length"): on one 128 x 128 frame quality peaks near
            # 1,500 passes and falls 1.8 dB by 6,000; four times the data peaks later and
            # falls 0.1 dB. The cap ends small datasets early, large ones run to the budget
            max_passes=CPU_MAX_PASSES_2D,
        )
    if network == "3d":
        return recipe.model_copy(
            update={
                # Pairs by recorruption (plane_stride 1) measured 1.6 dB above odd/even
                # planes at equal iterations, without their plane alternation (README)
                "network": Network3DSpec(
                    width=16,
                    residual_groups=1,
                    blocks_per_group=2,
                    attention_reduction=4,
                    plane_stride=1,
                )
                if not gpu
                else Network3DSpec(plane_stride=1),
                "patch_px": 32 if not gpu else 64,
                "patch_slices": 8 if not gpu else 26,
                # 3D measured with the reference's L1 (L2 was no better) and a faster start
                "loss": LossConfig(),
                "learning_rate": 3e-3 if not gpu else recipe.learning_rate,
                # one small volume over-fits too, later than its deconvolution stage did
                # (README, "Training length")
                "max_passes": CPU_MAX_PASSES_3D if not gpu else None,
            }
        )
    if network is not None:
        spec = fast_2d_spec() if network == "fast" else Network2DSpec()
        return recipe.model_copy(update={"network": spec.model_copy(update={"residual": True})})
    return recipe


@dataclass
class TrainingResult:
    """A trained network with its normalisation, loss history and the config as trained."""

    model: ZSDeconvNetwork
    scale_e: float  # photoelectrons per model unit
    iterations_done: int
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False
    config: TrainingConfig | None = None  # as trained: settings chosen from the data resolved


def normalisation_scale(frames_e: Sequence[np.ndarray], percentile: float) -> float:
    """Photoelectrons per model unit: the given percentile of the training frames."""
    values = np.concatenate([np.asarray(f, dtype=np.float32).ravel() for f in frames_e])
    scale = float(np.percentile(values, percentile))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("training frames hold no signal above zero photoelectrons")
    return scale


def estimate_background(frames_e: Sequence[np.ndarray], block_px: int = 8) -> float:
    """A constant background in photoelectrons: the 5th percentile of the frames' block means
    (8 x 8 blocks average the shot noise away; the low percentile finds cell-free areas and
    errs low where there are none, leaving the network a little constant to carry)."""
    means = []
    for frame in frames_e:
        frame = np.asarray(frame, dtype=np.float32)
        for plane in frame.reshape(-1, *frame.shape[-2:]):
            ny, nx = (n // block_px for n in plane.shape)
            blocks = plane[: ny * block_px, : nx * block_px]
            means.append(blocks.reshape(ny, block_px, nx, block_px).mean(axis=(1, 3)).ravel())
    return max(float(np.percentile(np.concatenate(means), 5)), 0.0)


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
            patch = np.rot90(patch, int(self.rng.integers(4)), axes=(-2, -1))
            if self.rng.random() < 0.5:
                patch = patch[..., ::-1]
            out[i, 0] = patch
        return out


ModelT = TypeVar("ModelT", bound=nn.Module)
ModelT_contra = TypeVar("ModelT_contra", bound=nn.Module, contravariant=True)


class TrainingObjective(Protocol[ModelT_contra]):
    """What a `Trainer` minimises: the losses of one batch of patches, the sum as "total"
    (ZS-DeconvNet's `Objective`, and the SIM and DPS objectives)."""

    def __call__(
        self, model: ModelT_contra, batch: torch.Tensor, generator: torch.Generator | None, /
    ) -> dict[str, torch.Tensor]: ...


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
        spec: Network2DSpec | Network3DSpec,
        psf: np.ndarray,
        scale_e: float,
        loss: LossConfig,
        recorruption: RecorruptionConfig,
        read_noise_e: float | None = None,
        background_e: float = 0.0,
    ) -> None:
        self.is_3d = isinstance(spec, Network3DSpec)
        self.background = background_e / scale_e
        psf = np.asarray(psf, dtype=np.float32)
        if psf.ndim != (3 if self.is_3d else 2):
            raise ValueError(f"a {'3D' if self.is_3d else '2D'} network needs a matching PSF")
        self.odd_even = isinstance(spec, Network3DSpec) and spec.plane_stride == 2
        if self.odd_even:
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
        self,
        model: ZSDeconvNetwork,
        batch_e: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        upscale = model.upscale
        if self.psf.device != batch_e.device:
            self.psf = self.psf.to(batch_e.device)
        if self.odd_even:
            assert isinstance(model, ZSDeconvNet3D)  # odd/even pairs: a 3D spec (__init__)
            inputs, targets = odd_even_pairs(batch_e / self.scale_e)
            gap = gap_amending_term(model, inputs, targets)
            denoised, deconvolved = model.stages(inputs)  # the pairs are already 2 apart
            return zs_deconv_loss_3d(
                denoised, deconvolved, targets, gap, self.psf, self.loss, upscale
            )
        inputs, target = (
            p / self.scale_e for p in recorrupt(batch_e, self.recorruption, generator)
        )
        denoised, deconvolved = model(inputs)
        if self.is_3d:
            return zs_deconv_loss_3d(
                denoised, deconvolved, target, None, self.psf, self.loss, upscale
            )
        return zs_deconv_loss(
            denoised, deconvolved, target, self.psf, self.loss, upscale, self.background
        )


class Trainer(Generic[ModelT]):
    """One Adam step at a time on patches from a sampler: the unit of training and adaptation."""

    def __init__(
        self,
        model: ModelT,
        objective: TrainingObjective[ModelT],
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
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    model = build_network(config.served_network).to(torch_device)
    if config.patch_px % model.multiple:
        raise ValueError(f"patch_px {config.patch_px} must be a multiple of {model.multiple}")
    scale = normalisation_scale(data_e, config.scale_percentile)
    background = estimate_background(data_e) if config.background == "estimate" else 0.0
    if config.loss.precondition == "auto":
        eps = auto_precondition(list(data_e), read_noise_e)
        log.info("deconvolution residual preconditioned with eps %.3g (from the data)", eps)
        config = config.model_copy(
            update={"loss": config.loss.model_copy(update={"precondition": eps})}
        )
    objective = Objective(
        config.network, psf, scale, config.loss, config.recorruption, read_noise_e, background
    )
    objective.check_patch(config.patch_px, model.upscale)
    config = capped_by_passes(config, data_e)
    sampler = PatchSampler(data_e, config.patch_shape(), config.seed)
    trainer = Trainer(
        model, objective, sampler, config.batch_size, config.learning_rate, config.seed
    )
    average = WeightAverage(model, config.ema_decay) if config.ema_decay is not None else None
    start, history, elapsed_before = 0, [], 0.0
    checkpoint = work_dir / CHECKPOINT if work_dir else None
    if work_dir is not None and checkpoint and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=torch_device)
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if average is not None and "average" in state:
            average.model.load_state_dict(state["average"])
        start = int(state["iteration"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        history = json.loads((work_dir / "history.json").read_text())
        log.info("resuming training at iteration %d", start)
    budget_s = config.budget_min * 60 if config.budget_min is not None else None
    started = time.perf_counter() - elapsed_before

    def elapsed() -> float:
        return time.perf_counter() - started

    def reseed(iteration: int) -> None:
        # Random streams restart at every checkpoint, so a resumed run repeats exactly
        # what an uninterrupted one does.
        sampler.rng = np.random.default_rng([config.seed, iteration])
        trainer.generator.manual_seed(config.seed * 1_000_003 + iteration)

    def save(iteration: int) -> None:
        if work_dir is None or checkpoint is None:  # both or neither
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "iteration": iteration,
            "elapsed_s": elapsed(),
        }
        if average is not None:
            state["average"] = average.model.state_dict()
        torch.save(state, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)  # atomic: never a half checkpoint
        (work_dir / "history.json").write_text(json.dumps(history))

    reseed(start)
    done, interrupted = start, False
    bar = tqdm(total=config.iterations, initial=start, disable=not show_progress, unit="it")
    try:
        for iteration in range(start, config.iterations):
            if budget_s is not None and elapsed() >= budget_s:
                log.info("time budget of %.1f min spent at iteration %d", config.budget_min, done)
                break
            progress = iteration / config.iterations
            if budget_s is not None:
                progress = max(progress, elapsed() / budget_s)
            rate = config.learning_rate * learning_rate_factor(config, iteration, progress)
            for group in trainer.optimizer.param_groups:
                group["lr"] = rate
            history.append(trainer.step())
            if average is not None:
                average.update(model)
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
    if average is not None:
        model.load_state_dict(average.model.state_dict())
    model.eval()
    return TrainingResult(model, scale, done, history, interrupted, config)


def capped_by_passes(config: TrainingConfig, data: Sequence[np.ndarray]) -> TrainingConfig:
    """`config` with its iterations cut to `max_passes` passes over `data` (the schedule then
    ends there too); unchanged without a cap or when the cap lies beyond its iterations."""
    if config.max_passes is None:
        return config
    data_px = sum(int(np.asarray(d).size) for d in data)
    per_iteration = config.batch_size * math.prod(config.patch_shape())
    cap = max(math.ceil(config.max_passes * data_px / per_iteration), 1)
    if cap >= config.iterations:
        return config
    log.info(
        "%d iterations: %g passes over %d data pixels (max_passes)", cap, config.max_passes, data_px
    )
    return config.model_copy(update={"iterations": cap})


def run_cosine(
    trainer: Trainer[ModelT],
    iterations: int,
    learning_rate: float,
    budget_s: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Steps with a cosine learning-rate schedule over `iterations`, or over `budget_s`
    seconds when that ends first; the total loss of each step (`on_step` hears each step's
    number, from 1). The short runs (SIM, DPS) use it; `train` adds checkpoints and
    resuming."""
    losses = []
    started = time.perf_counter()
    for iteration in range(iterations):
        progress = iteration / iterations
        if budget_s is not None:
            spent = (time.perf_counter() - started) / budget_s
            if spent >= 1:
                break
            progress = max(progress, spent)
        for group in trainer.optimizer.param_groups:
            group["lr"] = learning_rate * cosine_factor(progress)
        losses.append(trainer.step()["total"])
        if on_step is not None:
            on_step(iteration + 1)
    trainer.model.eval()
    return losses


def _serves(spec: Network2DSpec | Network3DSpec) -> str | None:
    """What a 3D spec was told to serve, if the config said (None: left to the recipe)."""
    if isinstance(spec, Network3DSpec) and "serve" in spec.model_fields_set:
        return spec.serve
    return None


def learning_rate_factor(config: TrainingConfig, iteration: int, progress: float) -> float:
    """Multiplier of the start learning rate: the reference's steps, or a cosine over the run's
    progress (0..1, by iterations or by the time budget, whichever is further)."""
    if config.schedule == "step":
        return config.lr_decay_factor ** (iteration // config.lr_decay_every)
    return cosine_factor(progress)


def cosine_factor(progress: float, floor: float = 0.01) -> float:
    """A cosine from 1 at the start (progress 0) down to `floor` at the end (progress 1)."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class WeightAverage:
    """Exponential moving average of a model's weights (no batch-norm statistics to track)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for averaged, current in zip(self.model.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current, 1 - self.decay)


@torch.no_grad()
def restore(model: ZSDeconvNetwork, image_e: np.ndarray, scale_e: float) -> np.ndarray:
    """Deconvolved, laterally 2x frame (Y, X) or stack (Z, Y, X) in photoelectrons per output
    pixel, straight from a torch model (the runtimes do the same through engines._runtime)."""
    model.eval()
    device = next(model.parameters()).device

    def infer(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch).to(device))[1].float().cpu().numpy()

    return restore_electrons(infer, image_e, scale_e, model.multiple, model.upscale)
