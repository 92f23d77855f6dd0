"""What the daemon does to a batch of camera frames: a model bundle on an engine, or nothing.

A `Processor` turns same-shape raw items (2D frames (Y, X) or 3D stacks (Z, Y, X), camera
counts) into restored ones. `ModelProcessor` applies the bundle's fixed normalisation (never
per-frame min-max) and returns float32 photoelectrons per output pixel on the 2x grid;
`PassThrough` returns the frames untouched (transport benchmarks, raw display).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from livedecon.calibration.calibration_bundle import CalibrationBundle, is_calibration_bundle
from livedecon.daemon.correction import InputCorrection, input_correction
from livedecon.daemon.daemon_config import Correction
from livedecon.engines.backends import open_runtime
from livedecon.engines.bundle import BundleError, ModelBundle, find_bundle
from livedecon.engines.networks import input_multiple
from livedecon.engines.runtime import Runtime
from livedecon.engines.tiling import restore_batch_electrons, restore_electrons

PHOTOELECTRONS = "photoelectrons per output pixel (float32)"
CAMERA_COUNTS = "camera counts, unprocessed (pass-through)"


def stack_volume(planes: Mapping[int, np.ndarray], z_count: int) -> tuple[np.ndarray, bool]:
    """The volume a 3D network restores from the planes of one stack that arrived (by z):
    at least `z_count` deep, a plane that never arrived borrowing the pixels of its nearest
    arrived neighbour, so the network sees a continuous volume (only arrived planes are
    written). Also whether the stack was complete. The daemon and `reprocess` both use this
    rule, so a recovered plane equals the one the daemon would have written."""
    present = sorted(planes)
    if not present:
        raise ValueError("a stack needs at least one plane")
    depth = max(z_count, present[-1] + 1)
    nearest = [min(present, key=lambda p, z=z: abs(p - z)) for z in range(depth)]
    return np.stack([planes[p] for p in nearest]), present == list(range(z_count))


class Processor(Protocol):
    name: str
    bundle_id: str
    weights_version: int
    upscale: int
    is_3d: bool | None  # None: takes both
    units: str

    def process(self, items: list[np.ndarray]) -> list[np.ndarray]: ...


@dataclass
class PassThrough:
    name: str = "pass-through"
    bundle_id: str = "pass-through"
    weights_version: int = 0
    upscale: int = 1
    is_3d: bool | None = None
    units: str = CAMERA_COUNTS
    delay_s: float = 0.0  # stands in for a slow engine in overload tests and benchmarks

    def process(self, items: list[np.ndarray]) -> list[np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s * len(items))
        return items


@dataclass
class ModelProcessor:
    bundle: ModelBundle
    bundle_dir: Path
    runtime: Runtime
    backend: str
    tile_px: int = 1024
    correction: InputCorrection = field(default_factory=InputCorrection)
    name: str = "model"
    units: str = PHOTOELECTRONS
    upscale: int = field(init=False)
    is_3d: bool = field(init=False)

    def __post_init__(self) -> None:
        self.upscale = 2 if self.bundle.manifest.network.upsample else 1
        self.is_3d = self.bundle.manifest.is_3d

    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    @property
    def weights_version(self) -> int:
        return self.bundle.manifest.weights_version

    def prepare_weights(
        self, weights: Mapping[str, torch.Tensor], version: int
    ) -> Callable[[], None]:
        """Get `weights` ready to serve as `version` (slow: any thread); the returned commit
        makes them serve from the next batch on (fast: call it between batches, from the thread
        that calls `process`). Runtimes without a two-phase update swap inside the commit."""
        prepare = getattr(self.runtime, "prepare_weights", None)
        swap = prepare(weights) if prepare else (lambda: self.runtime.update_weights(weights))
        bundle = self.bundle.with_weights(weights)
        bundle = replace(
            bundle, manifest=bundle.manifest.model_copy(update={"weights_version": version})
        )

        def commit() -> None:
            swap()
            self.bundle = bundle

        return commit

    def update_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        self.prepare_weights(weights, version)()

    def fork(self) -> ModelProcessor:
        """A processor of its own (an acquisition whose weights will change)."""
        runtime, _ = open_runtime(self.bundle, self.bundle_dir, self.backend, max_batch=4)
        return replace(self, runtime=runtime)

    def electrons(self, counts: np.ndarray) -> np.ndarray:
        """Camera counts as the model's input: corrected, then photoelectrons (float32)."""
        return self.bundle.manifest.normalisation.electrons(self.correction(counts))

    def process(self, items: list[np.ndarray]) -> list[np.ndarray]:
        norm = self.bundle.manifest.normalisation
        multiple = input_multiple(self.bundle.manifest.network)
        fits = max(items[0].shape[-2:]) <= self.tile_px
        if fits and all(item.shape == items[0].shape for item in items):
            batch = np.stack([self.electrons(item) for item in items])
            out = restore_batch_electrons(
                self.runtime.infer, batch, norm.scale_e, multiple, self.upscale
            )
            return list(out)
        return [
            restore_electrons(
                self.runtime.infer,
                self.electrons(item),
                norm.scale_e,
                multiple,
                self.upscale,
                self.tile_px,
            )
            for item in items
        ]


def open_processor(
    bundle: str | Path,
    backend: str = "auto",
    precision: str | None = None,
    frame_shapes: tuple[tuple[int, ...], ...] = ((1024, 1024),),
    max_batch: int = 4,
    tile_px: int = 1024,
    correction: Correction | None = None,
) -> ModelProcessor:
    """A bundle on the chosen engine, through the accuracy gate. `bundle` is a model bundle
    (directory or shipped name) or a calibration bundle, whose model serves behind its camera
    corrections (as `correction` chooses)."""
    bundle_dir = find_bundle(bundle)
    calibration = None
    if is_calibration_bundle(bundle_dir):
        calibration = CalibrationBundle.load(bundle_dir)
        bundle_dir = calibration.model_dir
    corrections = input_correction(correction or Correction(), calibration)
    loaded = ModelBundle.load(bundle_dir)
    if loaded.manifest.is_selfnet:  # its chain after the 3D network is not composed yet
        raise BundleError(
            f"{bundle_dir}: Self-Net bundles are not served by the daemon yet; make volumes"
            " isotropic offline with `livedecon restore`"
        )
    runtime, choice = open_runtime(loaded, bundle_dir, backend, precision, frame_shapes, max_batch)
    return ModelProcessor(loaded, bundle_dir, runtime, choice.backend, tile_px, corrections)
