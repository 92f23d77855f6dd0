"""Test-time adaptation between timepoints: when to fine-tune, whether to trust the result.

The worker thread runs the steps itself, one at a time, only while no frame waits, so a frame
that arrives waits at most one step and the swap happens between two batches. Per acquisition:

- `adapt`: after each timepoint, `steps_per_timepoint` steps on that timepoint's frames;
- `retrain`: the same, and every `retrain_every` timepoints a longer run (`retrain_steps`) on
  the frames kept from the last timepoints (background retraining for long intervals).

New weights serve only after checks against the serving weights on held-out data of the same
timepoint (frames the steps did not see, or else a strip of each frame): finite weights and
outputs, validation loss no worse beyond `validation_tolerance`, no collapse of the output's
intensity or contrast. A rejected candidate is dropped (reason logged, adapter reset to the
serving weights). Every accepted version is kept in memory and saved beside the output, so a
rollback is one swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from livedecon.daemon._protocol import AdaptationPlan
from livedecon.engines._adaptation import AdaptationConfig, Adapter

if TYPE_CHECKING:
    from livedecon.daemon._processing import AdaptableProcessor

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]


@dataclass
class Verdict:
    """Whether a candidate may serve, why, and the validation losses compared."""

    accepted: bool
    reason: str
    serving_loss: float = float("nan")
    candidate_loss: float = float("nan")


def _contrast(image: np.ndarray) -> tuple[float, float]:
    return float(np.mean(image)), float(np.std(image))


def check_candidate(
    candidate: Weights,
    serving_loss: float,
    candidate_loss: float,
    serving_output: np.ndarray,
    candidate_output: np.ndarray,
    plan: AdaptationPlan,
) -> Verdict:
    """Whether `candidate` may replace the serving weights (the reason either way)."""
    bad = [name for name, tensor in candidate.items() if not torch.isfinite(tensor).all()]
    if bad:
        return Verdict(False, f"non-finite weights in {bad[0]} (and {len(bad) - 1} more)")
    if not np.isfinite(candidate_output).all() or not np.isfinite(candidate_loss):
        return Verdict(False, "non-finite output", serving_loss, candidate_loss)
    if candidate_loss > serving_loss * (1 + plan.validation_tolerance):
        return Verdict(
            False,
            f"validation loss {candidate_loss:.5g} is worse than the serving {serving_loss:.5g}",
            serving_loss,
            candidate_loss,
        )
    (m0, s0), (m1, s1) = _contrast(serving_output), _contrast(candidate_output)
    ratio = plan.collapse_ratio
    if not (ratio * m0 <= m1 <= m0 / ratio) or s1 < ratio * s0:
        return Verdict(
            False,
            f"output collapse: mean {m1:.4g} vs {m0:.4g}, contrast {s1:.4g} vs {s0:.4g}",
            serving_loss,
            candidate_loss,
        )
    return Verdict(True, "passed", serving_loss, candidate_loss)


@dataclass
class TimepointReport:
    """What one timepoint's adaptation or retraining did: steps, time, losses, verdict and swap
    costs."""

    timepoint: int
    kind: Literal["adapt", "retrain"]
    steps: int = 0
    seconds: float = 0.0
    serving_loss: float = float("nan")
    candidate_loss: float = float("nan")
    accepted: bool = False
    reason: str = ""
    version: int = 0
    prepare_ms: float = float("nan")  # building the new engine, off the serving path
    swap_ms: float = float("nan")  # the swap itself, between two batches


@dataclass
class AcquisitionAdaptation:
    """The adaptation state of one acquisition; used by the worker thread only."""

    plan: AdaptationPlan
    adapter_factory: Callable[[AdaptationConfig], Adapter]
    infer: Callable[[np.ndarray, Weights | None], np.ndarray]  # (electrons, weights) -> output
    save_version: Callable[[int, Weights], None]
    versions: dict[int, Weights] = field(default_factory=dict)
    serving_version: int = 1
    reports: list[TimepointReport] = field(default_factory=list)
    _adapter: Adapter | None = None
    _current: dict[int, list[np.ndarray]] = field(default_factory=dict)
    _history: deque[list[np.ndarray]] = field(default_factory=lambda: deque(maxlen=100))
    _pending: TimepointReport | None = None
    _validation: list[np.ndarray] = field(default_factory=list)
    _train: list[np.ndarray] | None = None  # given to the adapter at the next step
    _budget: int = 0
    _building: threading.Thread | None = None

    def __post_init__(self) -> None:
        # Building the adapter (a network copy, the loss's PSF, first torch allocations) takes
        # longer than a step: it happens beside the stream, never in front of a frame.
        self._building = threading.Thread(target=self._build_adapter, daemon=True)
        self._building.start()

    def _build_adapter(self) -> None:
        config = AdaptationConfig(
            learning_rate=self.plan.learning_rate,
            batch_size=self.plan.batch_size,
            patch_px=self.plan.patch_px,
        )
        try:
            # A throwaway adapter takes one step first: torch's first backward pass costs about
            # a second (allocator, kernels, thread pools), which must not land on a frame.
            warmup = self.adapter_factory(config)
            side = 2 * self.plan.patch_px
            noise = np.random.default_rng(0).poisson(20, (side, side)).astype(np.float32)
            warmup.set_data([noise])
            warmup.step()
            self._adapter = self.adapter_factory(config)
        except Exception:
            log.exception("the adapter could not be built; adaptation stays off")

    @property
    def ready(self) -> bool:
        return self._adapter is not None

    def wait_ready(self, timeout_s: float = 60) -> bool:
        if self._building is not None:
            self._building.join(timeout_s)
        return self.ready

    @property
    def busy(self) -> bool:
        return self._pending is not None and self._budget > 0 and self.ready

    @property
    def awaiting_check(self) -> bool:
        return self._pending is not None and self._budget == 0 and self.ready

    def wants(self, time_index: int) -> bool:
        return self.plan.mode != "off" and (
            len(self._current.get(time_index, [])) < self.plan.frames_kept
        )

    def observe(self, time_index: int, electrons: np.ndarray) -> None:
        """Keep a restored frame's input (photoelectrons) for its timepoint's adaptation."""
        if self.plan.mode == "off":
            return
        frames = self._current.setdefault(time_index, [])
        if len(frames) < self.plan.frames_kept:
            frames.append(np.asarray(electrons, dtype=np.float32))

    def timepoint_done(self, time_index: int) -> None:
        frames = self._current.pop(time_index, [])
        if self.plan.mode == "off" or not frames:
            return
        train, held_out = _split(frames, self.plan.patch_px)
        self._history.append(train)
        retrain = self.plan.mode == "retrain" and (time_index + 1) % self.plan.retrain_every == 0
        if retrain:
            window = list(self._history)[-self.plan.timepoints_kept :]
            train = [frame for frames_ in window for frame in frames_]
        self._train = train
        self._validation = held_out
        self._budget = self.plan.retrain_steps if retrain else self.plan.steps_per_timepoint
        self._pending = TimepointReport(time_index, "retrain" if retrain else "adapt")

    def step(self) -> float:
        """One fine-tuning step; returns its duration in seconds."""
        assert self._pending is not None
        assert self._adapter is not None
        start = time.perf_counter()
        if self._train is not None:
            self._adapter.set_data(self._train)
            self._train = None
        self._adapter.step()
        elapsed = time.perf_counter() - start
        self._pending.steps += 1
        self._pending.seconds += elapsed
        self._budget -= 1
        return elapsed

    def conclude(self) -> tuple[TimepointReport, Weights | None]:
        """Check the candidate of the finished timepoint: (report, weights to serve or None)."""
        assert self._pending is not None
        assert self._adapter is not None
        report, self._pending = self._pending, None
        if report.steps == 0:  # frames kept the engine busy until the next timepoint
            report.reason = "no idle time for a step before the next timepoint"
            self.reports.append(report)
            return report, None
        start = time.perf_counter()
        candidate = self._adapter.weights()
        serving = self.versions[self.serving_version]
        verdict = self.judge(candidate, serving)
        report.seconds += time.perf_counter() - start
        report.serving_loss, report.candidate_loss = verdict.serving_loss, verdict.candidate_loss
        report.accepted, report.reason = verdict.accepted, verdict.reason
        if not verdict.accepted:
            log.warning(
                "adaptation after timepoint %d rejected: %s", report.timepoint, verdict.reason
            )
            self._adapter.load_weights(serving)
            self.reports.append(report)
            return report, None
        report.version = max(self.versions) + 1
        self.versions[report.version] = candidate
        self.save_version(report.version, candidate)
        self.reports.append(report)
        return report, candidate

    def judge(self, candidate: Weights, serving: Weights) -> Verdict:
        adapter = self._adapter
        assert adapter is not None
        try:
            serving_loss = adapter.validation_loss(self._validation, serving)
            candidate_loss = adapter.validation_loss(self._validation, candidate)
            probe = self._validation[0]
            serving_out = self.infer(probe, serving)
            candidate_out = self.infer(probe, candidate)
        except (RuntimeError, ValueError) as exc:  # NaN weights can break the forward pass
            return Verdict(False, f"the candidate fails to run: {exc}")
        return check_candidate(
            candidate, serving_loss, candidate_loss, serving_out, candidate_out, self.plan
        )

    def rollback(self, version: int | None) -> int:
        """The version to serve again (default: the one before the serving one)."""
        earlier = [v for v in self.versions if v < self.serving_version]
        target = version if version is not None else (max(earlier) if earlier else None)
        if target is None or target not in self.versions:
            raise KeyError(f"no weights version {target}; kept: {sorted(self.versions)}")
        if self._adapter is not None:
            self._adapter.load_weights(self.versions[target])
        return target

    def status(self) -> dict[str, Any]:
        last = self.reports[-1] if self.reports else None
        return {
            "mode": self.plan.mode,
            "ready": self.ready,
            "serving_version": self.serving_version,
            "versions": sorted(self.versions),
            "pending_steps": self._budget if self._pending else 0,
            "timepoints": [r.__dict__ for r in self.reports[-20:]],
            "last": None if last is None else last.__dict__,
        }


def _split(frames: list[np.ndarray], patch_px: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training and held-out data of one timepoint: the last frame held out when there are
    several, else the bottom quarter of the frame when a patch fits in it (the steps never see
    it), else the frame itself (then validation has seen the data; weaker, but still compares
    the two weights on the same patches)."""
    if len(frames) > 1:
        return frames[:-1], frames[-1:]
    frame = frames[0]
    cut = frame.shape[-2] * 3 // 4
    if frame.shape[-2] - cut >= patch_px and cut >= patch_px:
        return [frame[..., :cut, :]], [frame[..., cut:, :]]
    return [frame], [frame]


def save_weights(directory: Path, version: int, weights: Weights) -> Path:
    """Weights of an accepted version beside the acquisition's output (for reprocessing)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"weights-v{version}.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


def adaptation_for(
    processor: AdaptableProcessor, plan: AdaptationPlan, acquisition: Any
) -> AcquisitionAdaptation:
    """The adaptation state of an acquisition served by `processor` (its own fork)."""
    from livedecon.engines._runtime import TorchRuntime
    from livedecon.engines._tiling import restore_electrons

    bundle = processor.bundle
    manifest = bundle.manifest
    norm = manifest.normalisation

    def adapter(config: AdaptationConfig) -> Adapter:
        serving = processor.bundle.state_dict
        return Adapter(
            manifest.network, serving, bundle.psf, norm.scale_e, config, norm.read_noise_e
        )

    def infer(electrons: np.ndarray, weights: Weights | None) -> np.ndarray:
        runtime = TorchRuntime(manifest.network, weights or processor.bundle.state_dict)
        return restore_electrons(
            runtime.infer,
            electrons,
            norm.scale_e,
            runtime.multiple,
            processor.upscale,
            flux_share=bundle.flux_share,
        )

    def save(version: int, weights: Weights) -> None:
        if acquisition.record.plan.save:
            save_weights(acquisition.directory / "weights", version, weights)

    version = manifest.weights_version
    return AcquisitionAdaptation(
        plan, adapter, infer, save, {version: dict(bundle.state_dict)}, version
    )
