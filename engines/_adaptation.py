"""Test-time adaptation: fine-tune serving weights on newly acquired data, one step at a time.

The daemon's scheduler owns the timing (it steps only while no frame waits); this module owns
the maths, which is training's: the same patches, self-supervised pairs and losses. The
serving model is never touched: the adapter trains its own copy and hands out new weights,
which the caller checks (`validation_loss`) before swapping them in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from pydantic import Field

from livedecon.engines._configfile import StrictModel
from livedecon.engines._networks import DpsSpec, NetworkSpec, ZSDeconvNetwork, build_network
from livedecon.engines._self_supervised import LossConfig, RecorruptionConfig
from livedecon.engines._selfnet import SelfNetSpec
from livedecon.engines._training import Objective, PatchSampler, Trainer

Weights = dict[str, torch.Tensor]


class AdaptationConfig(StrictModel):
    """How an `Adapter` fine-tunes: learning rate, batch, patches, recorruption, loss and
    validation."""

    learning_rate: float = Field(2e-5, gt=0, description="lower than training: small nudges")
    batch_size: int = Field(4, ge=1)
    patch_px: int = Field(64, ge=16)
    patch_slices: int = Field(16, ge=4, description="3D: raw slices per patch")
    recorruption: RecorruptionConfig = RecorruptionConfig()
    loss: LossConfig = LossConfig()
    validation_batches: int = Field(4, ge=1, description="fixed batches for validation_loss")
    seed: int = 0


class Adapter:
    """Fine-tunes a private copy of a network; Adam's state carries over between timepoints."""

    def __init__(
        self,
        spec: NetworkSpec,
        weights: Mapping[str, torch.Tensor],
        psf: np.ndarray,
        scale_e: float,
        config: AdaptationConfig | None = None,
        read_noise_e: float | None = None,
        device: str | None = None,
    ) -> None:
        """`device`: where to train (default: the GPU when torch sees one, else the CPU)."""
        if isinstance(spec, SelfNetSpec):
            raise ValueError(
                "Self-Net networks are not adapted: their training is adversarial"
                " (engines/_selfnet_training.py), not these self-supervised losses"
            )
        if isinstance(spec, DpsSpec):
            raise ValueError(
                "DPS networks are not adapted: their objective (engines/_dps.py) is not these"
                " self-supervised losses"
            )
        self.config = config or AdaptationConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: ZSDeconvNetwork = build_network(spec)
        self.model.load_state_dict(copy.deepcopy(dict(weights)))
        self.model.to(self.device)
        self.objective = Objective(
            spec, psf, scale_e, self.config.loss, self.config.recorruption, read_noise_e
        )
        self.objective.check_patch(self.config.patch_px, self.model.upscale)
        lateral = (self.config.patch_px, self.config.patch_px)
        self.patch_shape = (self.config.patch_slices, *lateral) if self.objective.is_3d else lateral
        self.trainer: Trainer[ZSDeconvNetwork] | None = None
        self.steps_done = 0

    def set_data(self, data_e: Sequence[np.ndarray]) -> None:
        """The frames (Y, X) or stacks (Z, Y, X) in photoelectrons to adapt to from now on."""
        sampler = PatchSampler(data_e, self.patch_shape, self.config.seed + self.steps_done)
        if self.trainer is None:
            c = self.config
            self.trainer = Trainer(
                self.model, self.objective, sampler, c.batch_size, c.learning_rate, c.seed
            )
        else:
            self.trainer.sampler = sampler

    def step(self) -> dict[str, float]:
        """One optimiser step; raises if no data was given."""
        if self.trainer is None:
            raise RuntimeError("set_data() before step(): there is nothing to adapt to")
        losses = self.trainer.step()
        self.steps_done += 1
        return losses

    def weights(self) -> Weights:
        """A detached copy of the adapted weights, safe to hand to another thread."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Restart from given weights (after a rejected update or a rollback)."""
        self.model.load_state_dict(dict(weights))

    @torch.no_grad()
    def validation_loss(
        self, data_e: Sequence[np.ndarray], weights: Mapping[str, torch.Tensor] | None = None
    ) -> float:
        """The mean self-supervised loss on fixed patches and noise draws: comparable between
        weights (default: the adapter's own) on the same data."""
        model = self.model
        if weights is not None:
            model = copy.deepcopy(self.model)
            model.load_state_dict(dict(weights))
        # training mode under no_grad: the loss scores both trained outputs (a 3D network that
        # serves its denoised stack does so in eval mode only); no layer differs otherwise
        model.train()
        sampler = PatchSampler(data_e, self.patch_shape, seed=12345)
        generator = torch.Generator().manual_seed(12345)
        total = 0.0
        for _ in range(self.config.validation_batches):
            batch = torch.from_numpy(sampler.batch(self.config.batch_size)).to(self.device)
            total += float(self.objective(model, batch, generator)["total"])
        return total / self.config.validation_batches


def fine_tune(
    spec: NetworkSpec,
    weights: Mapping[str, torch.Tensor],
    data_e: Sequence[np.ndarray],
    psf: np.ndarray,
    scale_e: float,
    steps: int,
    config: AdaptationConfig | None = None,
    read_noise_e: float | None = None,
) -> tuple[Weights, list[dict[str, float]]]:
    """`steps` adaptation steps on `data_e` from `weights`: (new weights, loss history)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    adapter = Adapter(spec, weights, psf, scale_e, config, read_noise_e)
    adapter.set_data(data_e)
    history = [adapter.step() for _ in range(steps)]
    return adapter.weights(), history
