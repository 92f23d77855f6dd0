"""Self-Net training from one volume: degradation learning and restoration, together.

Two domains of 2D patches come from the volume itself:
- A, "artificially anisotropic lateral": xy patches made anisotropic along rows by bicubic
  down- then up-sampling by the axial ratio (z step over lateral pixel);
- B, "real axial": xz and yz patches of the volume resliced with cubic axial upsampling, rows
  along z.
A CycleGAN pair learns the real axial degradation (G_AB: A -> B, G_BA: B -> A, PatchGAN
discriminators, least-squares GAN loss), and the restoration network learns to undo it on
pairs (G_AB(degraded xy patch), xy patch). Its loss also flows back into G_AB (the feedback
term, off in the first epoch), which keeps G_AB from inventing what R cannot undo.

The settings are the published ones by default (Adam 1e-4, betas (0.5, 0.999), halved every
15 epochs; 64^2 patches; LSGAN weight 0.1; Charbonnier eps 1e-3 + 0.1 (1 - SSIM)). An
"epoch" here is `steps_per_epoch` iterations: the published code counts passes over a patch
set, which a self-supervised run on one volume does not have.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from livedecon.engines._configfile import StrictModel
from livedecon.engines._self_supervised import ssim_torch
from livedecon.engines._selfnet import (
    PatchDiscriminator,
    SelfNetGenerator,
    SelfNetRestorer,
    SelfNetSpec,
    check_volume,
    cubic_axial,
    fast_selfnet_spec,
    upsampled_depth,
)
from livedecon.engines._training import CPU_BUDGET_MIN


class SelfNetTrainingConfig(StrictModel):
    """How Self-Net trains from one volume: its networks, schedule, patches and losses."""

    network: SelfNetSpec = SelfNetSpec()
    generator_network: SelfNetSpec | None = Field(
        None, description="the two degradation generators [default: the same as network]"
    )
    discriminator_width: int = Field(64, ge=2, le=512)
    iterations: int = Field(3000, ge=1)
    budget_min: float | None = Field(None, gt=0, description="wall-time cap, minutes")
    steps_per_epoch: int = Field(200, ge=1)
    patch_px: int = Field(64, ge=16, le=512)
    batch_size: int = Field(4, ge=1, le=256)
    learning_rate: float = Field(1e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    halve_every_epochs: int = Field(15, ge=1)
    gan_weight: float = Field(0.1, ge=0)
    ssim_weight: float = Field(0.1, ge=0)
    charbonnier_eps: float = Field(1e-3, gt=0)
    feedback_weight: float = Field(0.1, ge=0)
    feedback_from_epoch: int = Field(1, ge=0, description="epochs without the feedback term")
    foreground_tries: int = Field(
        10, ge=1, description="patches drawn until one is brighter than the volume's mean"
    )
    seed: int = 0

    @property
    def generators(self) -> SelfNetSpec:
        return self.generator_network or self.network


def default_selfnet_recipe(
    network: str = "selfnet-fast", device: str | None = None
) -> SelfNetTrainingConfig:
    """What `livedecon train --network selfnet*` uses when given no config: the network
    ("selfnet-fast" or "selfnet") and a schedule that fits the machine. On a CPU the
    short-run settings measured on 2 cores (32 x 32 patches and discriminators of width 32)
    under the 10-minute cap, at learning rate 1e-3 for the fast network and the paper's 1e-4
    for the full one (at 1e-3 its GAN collapsed within the cap: 26.3 dB against cubic's
    31.8). The fast network stops after 400 iterations (epochs of 100, so the restorer's
    feedback joins after the first): its axial PSNR peaks at 300-500 iterations and falls
    about 1 dB by 1,500, on a 128 x 128 x 32 volume as on a 64 x 64 x 16 one, whatever the
    learning-rate decay (README, Self-Net). On a GPU the paper's settings (this config's
    defaults)."""
    if network not in ("selfnet", "selfnet-fast"):
        raise ValueError(f"Self-Net networks are selfnet and selfnet-fast, not {network!r}")
    spec = fast_selfnet_spec() if network == "selfnet-fast" else SelfNetSpec()
    gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if gpu:
        return SelfNetTrainingConfig(network=spec)
    return SelfNetTrainingConfig(
        network=spec,
        iterations=400 if network == "selfnet-fast" else 1500,
        steps_per_epoch=100 if network == "selfnet-fast" else 375,
        patch_px=32,
        discriminator_width=32,
        learning_rate=1e-3 if network == "selfnet-fast" else 1e-4,
        budget_min=CPU_BUDGET_MIN,
    )


# -- losses ------------------------------------------------------------------------------------


def charbonnier(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean Charbonnier distance sqrt((a - b)^2 + eps^2): L1 with a smooth minimum."""
    return torch.sqrt((a - b) ** 2 + eps * eps).mean()


def pixel_loss(a: torch.Tensor, b: torch.Tensor, cfg: SelfNetTrainingConfig) -> torch.Tensor:
    """Charbonnier + ssim_weight * (1 - SSIM): the cycle and restoration loss."""
    return charbonnier(a, b, cfg.charbonnier_eps) + cfg.ssim_weight * (1 - ssim_torch(a, b))


def lsgan(score: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss of discriminator scores against real (1) or generated (0)."""
    return ((score - (1.0 if real else 0.0)) ** 2).mean()


# -- data --------------------------------------------------------------------------------------


def degrade_rows(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Artificial anisotropy: bicubic down-sampling of the rows by `ratio` (antialiased), then
    bicubic back up to the original size."""
    h, w = x.shape[-2:]
    low = max(round(h / ratio), 2)
    down = F.interpolate(x, size=(low, w), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 symmetries of the square (k in 0..7)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


class PatchSampler:
    """Random patches of a stack of 2D slices, preferring foreground: a patch is redrawn
    (up to `tries` times) while its mean is below the stack's mean, so training does not
    spend itself on empty background."""

    def __init__(self, slices: np.ndarray, patch: int, tries: int, rng: np.random.Generator):
        self.slices, self.patch, self.tries, self.rng = slices, patch, tries, rng
        self.threshold = float(slices.mean())

    def draw(self) -> np.ndarray:
        n, h, w = self.slices.shape
        p = self.patch
        for _ in range(self.tries):
            i = self.rng.integers(n)
            y, x = self.rng.integers(h - p + 1), self.rng.integers(w - p + 1)
            patch = self.slices[i, y : y + p, x : x + p]
            if patch.mean() >= self.threshold:
                break
        return patch

    def batch(self, size: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.draw() for _ in range(size)])[:, None].copy())


def training_slices(volume: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(lateral xy slices, axial slices): the volume's planes, and its xz and yz slices after
    cubic axial upsampling, rows along z (both sets of axial slices stacked when their shapes
    agree, else the larger set)."""
    up = cubic_axial(volume, ratio)
    xz = up.transpose(1, 0, 2)  # (Y, Z', X)
    yz = up.transpose(2, 0, 1)  # (X, Z', Y)
    axial = np.concatenate([xz, yz]) if xz.shape[1:] == yz.shape[1:] else xz
    return np.ascontiguousarray(volume), np.ascontiguousarray(axial)


def patch_size(cfg: SelfNetTrainingConfig, volume: np.ndarray, ratio: float) -> int:
    """The configured patch, or the largest that fits both lateral and axial slices."""
    depth = upsampled_depth(volume.shape[0], ratio)
    fits = min(depth, *volume.shape[1:])
    if fits < 16:
        raise ValueError(
            f"volume {volume.shape} at axial ratio {ratio:.3g} gives slices of {fits} pixels;"
            " Self-Net needs at least 16 (more planes or a larger field)"
        )
    return min(cfg.patch_px, fits)


# -- training ----------------------------------------------------------------------------------


@dataclass
class SelfNetNets:
    """The five networks trained together: two degradation generators, the restorer and two
    discriminators."""

    g_ab: SelfNetGenerator
    g_ba: SelfNetGenerator
    restorer: SelfNetRestorer
    d_a: PatchDiscriminator
    d_b: PatchDiscriminator

    @classmethod
    def build(cls, cfg: SelfNetTrainingConfig) -> SelfNetNets:
        return cls(
            SelfNetGenerator(cfg.generators),
            SelfNetGenerator(cfg.generators),
            SelfNetRestorer(cfg.network),
            PatchDiscriminator(cfg.discriminator_width),
            PatchDiscriminator(cfg.discriminator_width),
        )


@dataclass
class SelfNetResult:
    """A finished (or interrupted) training: the restorer, how far it got, its loss history."""

    restorer: SelfNetRestorer
    iterations: int
    final_loss: float | None
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False


def _adam(params: Iterable[torch.nn.Parameter], cfg: SelfNetTrainingConfig) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


class SelfNetTrainer:
    """One volume (Z, Y, X) in model units, its axial ratio, and the networks in training."""

    def __init__(self, volume: np.ndarray, ratio: float, cfg: SelfNetTrainingConfig) -> None:
        volume = check_volume(volume, "training volume")
        self.cfg, self.ratio = cfg, ratio
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        patch = patch_size(cfg, volume, ratio)
        lateral, axial = training_slices(volume, ratio)
        self.lateral = PatchSampler(lateral, patch, cfg.foreground_tries, self.rng)
        self.axial = PatchSampler(axial, patch, cfg.foreground_tries, self.rng)
        self.nets = SelfNetNets.build(cfg)
        n = self.nets
        self.opt_g = _adam([*n.g_ab.parameters(), *n.g_ba.parameters()], cfg)
        self.opt_r = _adam(n.restorer.parameters(), cfg)
        self.opt_d = _adam([*n.d_a.parameters(), *n.d_b.parameters()], cfg)
        step = cfg.halve_every_epochs * cfg.steps_per_epoch
        self.schedules = [
            torch.optim.lr_scheduler.StepLR(o, step, gamma=0.5)
            for o in (self.opt_g, self.opt_r, self.opt_d)
        ]
        self.iteration = 0

    def _batches(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.cfg.batch_size
        lateral = self.lateral.batch(b)
        lateral = torch.cat(
            [dihedral(lateral[i : i + 1], int(k)) for i, k in enumerate(self.rng.integers(0, 8, b))]
        )
        axial = self.axial.batch(b)
        flips = self.rng.integers(0, 4, b)  # flips only: rows must stay along z
        axial = torch.cat(
            [
                torch.flip(axial[i : i + 1], dims=[d for d, on in ((-1, k & 1), (-2, k & 2)) if on])
                if k
                else axial[i : i + 1]
                for i, k in enumerate(flips)
            ]
        )
        return lateral, degrade_rows(lateral, self.ratio), axial

    def step(self) -> dict[str, float]:
        cfg, n = self.cfg, self.nets
        lateral, degraded, axial = self._batches()
        epoch = self.iteration // cfg.steps_per_epoch
        feedback = cfg.feedback_weight if epoch >= cfg.feedback_from_epoch else 0.0

        # generators: adversarial + cycle (+ feedback through the restorer)
        fake_axial = n.g_ab(degraded)
        fake_lateral = n.g_ba(axial)
        adv = lsgan(n.d_b(fake_axial), True) + lsgan(n.d_a(fake_lateral), True)
        cycle = pixel_loss(n.g_ba(fake_axial), degraded, cfg) + pixel_loss(
            n.g_ab(fake_lateral), axial, cfg
        )
        loss_g = cfg.gan_weight * adv + cycle
        if feedback > 0:
            loss_g = loss_g + feedback * pixel_loss(n.restorer(fake_axial), lateral, cfg)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()

        # restorer: (realistic axial version of a lateral patch) -> the lateral patch
        restored = n.restorer(fake_axial.detach())
        loss_r = pixel_loss(restored, lateral, cfg)
        self.opt_r.zero_grad(set_to_none=True)
        loss_r.backward()
        self.opt_r.step()

        # discriminators: real axial vs generated axial; artificial lateral vs generated
        loss_d = 0.5 * (
            lsgan(n.d_b(axial), True)
            + lsgan(n.d_b(fake_axial.detach()), False)
            + lsgan(n.d_a(degraded), True)
            + lsgan(n.d_a(fake_lateral.detach()), False)
        )
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        for schedule in self.schedules:
            schedule.step()
        self.iteration += 1
        return {
            "generator": loss_g.item(),
            "cycle": cycle.item(),
            "restorer": loss_r.item(),
            "discriminator": loss_d.item(),
        }


def train_selfnet(
    volume: np.ndarray,
    ratio: float,
    cfg: SelfNetTrainingConfig,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> SelfNetResult:
    """Train on one volume in model units (Z, Y, X) with z step = `ratio` lateral pixels;
    returns the restoration network (eval mode). Ctrl-C stops with the weights so far."""
    trainer = SelfNetTrainer(volume, ratio, cfg)
    started = time.perf_counter()
    deadline = started + cfg.budget_min * 60 if cfg.budget_min else None
    history: list[dict[str, float]] = []
    interrupted = False
    try:
        for i in range(cfg.iterations):
            losses = trainer.step()
            history.append(losses)
            if progress:
                progress(i + 1, losses)
            if deadline and time.perf_counter() > deadline:
                break
    except KeyboardInterrupt:
        interrupted = True
    restorer = trainer.nets.restorer.eval()
    tail = [h["restorer"] for h in history[-20:]]
    return SelfNetResult(
        restorer,
        trainer.iteration,
        float(np.mean(tail)) if tail else None,
        time.perf_counter() - started,
        history,
        interrupted,
    )
