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
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from livedecon.calibration._calibration_bundle import CalibrationBundle, is_calibration_bundle
from livedecon.daemon._correction import InputCorrection, input_correction
from livedecon.daemon._daemon_config import Correction
from livedecon.daemon._protocol import Plan
from livedecon.daemon._writer import UINT16_BRIGHT_COUNTS
from livedecon.engines._backends import open_runtime
from livedecon.engines._bundle import BundleError, ModelBundle, find_bundle
from livedecon.engines._enums import Backend, Precision
from livedecon.engines._networks import input_multiple
from livedecon.engines._runtime import Runtime
from livedecon.engines._selfnet import axial_ratio, upsampled_depth
from livedecon.engines._selfnet_bundle import check_chain, check_z_step, restore_isotropic
from livedecon.engines._tiling import restore_batch_electrons, restore_electrons

PHOTOELECTRONS = "photoelectrons per output pixel (float32)"
CAMERA_COUNTS = "camera counts, unprocessed (pass-through)"


def _nearest(present: list[int], z: float) -> int:
    """The arrived plane nearest to `z` (the lower one on a tie)."""
    return min(present, key=lambda p: abs(p - z))


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
    nearest = [_nearest(present, z) for z in range(depth)]
    return np.stack([planes[p] for p in nearest]), present == list(range(z_count))


def group_volume(plan: Plan, planes: Mapping[int, np.ndarray]) -> tuple[np.ndarray, bool]:
    """What a processor gets of one group's arrived planes, and whether all arrived: a z-stack
    (`stack_volume`), or a SIM sequence with NaN frames where frames never came (the
    reconstruction then counts their angle as widefield only). The daemon and `reprocess`
    both use it."""
    if plan.mode != "sim":
        return stack_volume(planes, plan.z_count or 1)
    first = next(iter(planes.values()))
    frames = np.full((plan.z_count or 1, *first.shape), np.nan, np.float32)
    for index, frame in planes.items():
        frames[index] = frame
    return frames, len(planes) == len(frames)


Stream = tuple[int | str, int | str]  # (position, channel): one output file's frames


class Processor(Protocol):
    """What the daemon and `reprocess` restore frames with (read-only, as far as callers go)."""

    @property
    def name(self) -> str:
        """A short label for messages ("model", "pass-through")."""
        ...

    @property
    def bundle_id(self) -> str:
        """The identity recorded with every restored plane (the bundle's, or "pass-through")."""
        ...

    @property
    def weights_version(self) -> int:
        """The version of the weights serving now, recorded with every restored plane."""
        ...

    @property
    def upscale(self) -> int:
        """Output pixels per input pixel along Y and X (1 or 2)."""
        ...

    @property
    def is_3d(self) -> bool | None:
        """Whether it restores stacks (True) or frames (False); None: it takes both."""
        ...

    @property
    def units(self) -> str:
        """What the restored pixels hold (PHOTOELECTRONS or CAMERA_COUNTS)."""
        ...

    @property
    def backend(self) -> str:
        """The engine that runs it, as records and replies name it ("none": no engine)."""
        ...

    @property
    def finishing(self) -> str:
        """What runs after the network (BundleManifest.finishing), recorded with the
        acquisition: the bundle id names the weights only. "": nothing, or no network."""
        ...

    @property
    def bundle_dir(self) -> Path | None:
        """The model bundle's directory, recorded for `reprocess`; None without a model."""
        ...

    @property
    def correction(self) -> InputCorrection | None:
        """The input corrections applied before the model; None without a model."""
        ...

    @property
    def trained_pixel_um(self) -> float | None:
        """The input pixel size the model was trained at; None: it takes any pixel size."""
        ...

    @property
    def bright_level(self) -> float:
        """A bright restored pixel's value in `units`, fixed for the processor's life (uint16
        output stores it as UINT16_BRIGHT_COUNTS counts)."""
        ...

    def output_depth(self, depth: int) -> int:
        """Planes it makes of a stack (or SIM sequence) of `depth` planes: as many, more for
        a Self-Net chain (z resampled to the lateral output pixel), one SR image for SIM."""
        ...

    def process(
        self, items: list[np.ndarray], streams: list[Stream] | None = None
    ) -> list[np.ndarray]:
        """Same-shape raw items (Y, X) or (Z, Y, X) in, their restored planes out, in order.
        `streams`: each item's (position, channel), for a processor that keeps state per
        stream (SIM keeps each stream's pattern); the others ignore it."""
        ...


def source_planes(depth_in: int, depth_out: int, present: list[int]) -> list[int]:
    """For each output plane of a stack, the arrived input plane nearest to it (its frame id,
    time stamp and raw pixels stand for it in records and recovery)."""
    step = (depth_in - 1) / (depth_out - 1) if depth_out > 1 else 0.0
    return [_nearest(present, k * step) for k in range(depth_out)]


@runtime_checkable
class AdaptableProcessor(Processor, Protocol):
    """A processor whose weights can change while it serves (test-time adaptation)."""

    @property
    def bundle(self) -> ModelBundle:
        """The bundle serving now: its manifest, PSF and current weights."""
        ...

    def electrons(self, counts: np.ndarray) -> np.ndarray:
        """Camera counts as the model's input: corrected, then photoelectrons (float32)."""
        ...

    def fork(self) -> AdaptableProcessor:
        """A processor of its own on a new engine (for an acquisition whose weights change)."""
        ...

    def prepare_weights(
        self, weights: Mapping[str, torch.Tensor], version: int
    ) -> Callable[[], None]:
        """Get `weights` ready as `version` now (slow, any thread); the commit swaps them in."""
        ...

    def update_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        """Serve `weights` as `version` from the next call of `process` on (prepare, commit)."""
        ...


class NoModel:
    """What a processor without a model bundle says of one: no bundle, no input
    corrections, any pixel size."""

    @property
    def bundle_dir(self) -> Path | None:
        return None

    @property
    def correction(self) -> InputCorrection | None:
        return None

    @property
    def trained_pixel_um(self) -> float | None:
        return None


@dataclass
class PassThrough(NoModel):
    """Frames out as they came in: no model, no engine, no weights to adapt."""

    name: str = "pass-through"
    bundle_id: str = "pass-through"
    weights_version: int = 0
    upscale: int = 1
    is_3d: bool | None = None
    units: str = CAMERA_COUNTS
    finishing: str = ""
    bright_level: float = UINT16_BRIGHT_COUNTS  # uint16 output keeps the counts as they came
    delay_s: float = 0.0  # stands in for a slow engine in overload tests and benchmarks

    @property
    def backend(self) -> str:
        return "none"

    def output_depth(self, depth: int) -> int:
        return depth

    def process(
        self, items: list[np.ndarray], streams: list[Stream] | None = None
    ) -> list[np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s * len(items))
        return items


@dataclass
class ModelProcessor:
    """A model bundle on a runtime: corrected counts in, photoelectrons on the output grid out."""

    bundle: ModelBundle
    bundle_dir: Path
    runtime: Runtime
    backend: Backend
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

    @property
    def finishing(self) -> str:
        return self.bundle.manifest.finishing

    @property
    def bright_level(self) -> float:
        # the training data's bright percentile, shared among the output pixels of one input
        # pixel; adaptation changes the weights, never this scale
        return self.bundle.manifest.normalisation.scale_e / self.upscale**2

    @property
    def trained_pixel_um(self) -> float:
        return self.bundle.manifest.input_pixel_um

    def output_depth(self, depth: int) -> int:
        return depth

    def prepare_weights(
        self, weights: Mapping[str, torch.Tensor], version: int
    ) -> Callable[[], None]:
        """Get `weights` ready to serve as `version` (slow: any thread); the returned commit
        makes them serve from the next batch on (call it between batches, from the thread that
        calls `process`). The commit of torch and onnxruntime only swaps; TensorRT's refits."""
        swap = self.runtime.prepare_weights(weights)
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

    def process(
        self, items: list[np.ndarray], streams: list[Stream] | None = None
    ) -> list[np.ndarray]:
        norm = self.bundle.manifest.normalisation
        multiple = input_multiple(self.bundle.manifest.network)
        share = self.bundle.flux_share
        fits = max(items[0].shape[-2:]) <= self.tile_px
        electrons = [self.electrons(item) for item in items]
        if fits and all(item.shape == items[0].shape for item in items):
            out = list(
                restore_batch_electrons(
                    self.runtime.infer,
                    np.stack(electrons),
                    norm.scale_e,
                    multiple,
                    self.upscale,
                    share,
                )
            )
        else:
            out = [
                restore_electrons(
                    self.runtime.infer, e, norm.scale_e, multiple, self.upscale, self.tile_px, share
                )
                for e in electrons
            ]
        return [self.bundle.refine(o, e) for o, e in zip(out, electrons, strict=True)]


@dataclass
class IsotropicProcessor:
    """A 3D model, then Self-Net: each stack restored (denoised, deconvolved, 2x lateral),
    then resampled along z to the lateral output pixel and made isotropic. Its weights do not
    adapt (neither stage is fine-tuned between timepoints yet)."""

    first: ModelProcessor
    selfnet: ModelBundle
    selfnet_dir: Path
    runtime: Runtime
    z_step_um: float  # of the stacks it restores: Self-Net undoes the blur of this z step
    name: str = "3D model + Self-Net"
    is_3d: bool = True
    units: str = PHOTOELECTRONS  # per output pixel, of a plane at the acquired z step

    @property
    def bundle_id(self) -> str:
        return f"{self.first.bundle_id}+{self.selfnet.bundle_id}"

    @property
    def weights_version(self) -> int:
        return self.first.weights_version

    @property
    def finishing(self) -> str:
        return self.first.finishing  # Self-Net runs on what the first model finished

    @property
    def upscale(self) -> int:
        return self.first.upscale

    @property
    def backend(self) -> str:
        return self.first.backend

    @property
    def bundle_dir(self) -> Path:
        return self.first.bundle_dir

    @property
    def correction(self) -> InputCorrection:
        return self.first.correction

    @property
    def trained_pixel_um(self) -> float:
        return self.first.trained_pixel_um

    @property
    def bright_level(self) -> float:
        return self.first.bright_level

    @property
    def axial_ratio(self) -> float:
        """Lateral output pixels per z step: how much finer the planes are sampled out."""
        return axial_ratio(self.selfnet.manifest.input_pixel_um, self.z_step_um)

    def output_depth(self, depth: int) -> int:
        return upsampled_depth(depth, self.axial_ratio)

    @property
    def output_z_step_um(self) -> float:
        return self.selfnet.manifest.input_pixel_um

    def process(
        self, items: list[np.ndarray], streams: list[Stream] | None = None
    ) -> list[np.ndarray]:
        restored = []
        tile_px = self.first.tile_px
        for volume in self.first.process(items):
            # axial slices wider than an engine tile go through in blended lateral tiles
            depth = self.output_depth(len(volume))
            tile = tile_px if max(depth, *volume.shape[1:]) > tile_px else None
            isotropic = restore_isotropic(
                self.selfnet, self.runtime.infer, volume, self.z_step_um, tile_px=tile
            )
            restored.append(isotropic)
        return restored


def open_isotropic(
    first: ModelProcessor,
    selfnet: str | Path,
    z_step_um: float,
    backend: Backend = Backend.AUTO,
    precision: Precision | None = None,
) -> IsotropicProcessor:
    """`first` (a 3D model) chained with a Self-Net bundle for stacks of `z_step_um`: refused
    (ValueError, BundleError) when the grids do not meet or the z step is not the trained one."""
    selfnet_dir = find_bundle(selfnet)
    loaded = ModelBundle.load(selfnet_dir)
    check_chain(first.bundle, loaded)
    z_step = check_z_step(loaded, z_step_um)
    runtime, _ = open_runtime(loaded, selfnet_dir, backend, precision, max_batch=8)
    return IsotropicProcessor(first, loaded, selfnet_dir, runtime, z_step)


def open_processor(
    bundle: str | Path,
    backend: Backend = Backend.AUTO,
    precision: Precision | None = None,
    frame_shapes: tuple[tuple[int, ...], ...] = ((1024, 1024),),
    max_batch: int = 4,
    tile_px: int = 1024,
    correction: Correction | None = None,
) -> ModelProcessor:
    """A bundle on the chosen engine, through the accuracy gate. `bundle` is a model bundle
    (directory or shipped name) or a calibration bundle, whose model serves behind its camera
    corrections (as `correction` chooses). Self-Net serves only chained after a 3D model
    (`open_isotropic`)."""
    bundle_dir = find_bundle(bundle)
    calibration = None
    if is_calibration_bundle(bundle_dir):
        calibration = CalibrationBundle.load(bundle_dir)
        bundle_dir = calibration.model_dir
    corrections = input_correction(correction or Correction(), calibration)
    loaded = ModelBundle.load(bundle_dir)
    if loaded.manifest.is_selfnet:
        raise BundleError(
            f"{bundle_dir}: a Self-Net bundle serves after a 3D model: start a 3d acquisition"
            " with that model and `isotropic` naming this bundle in its plan"
        )
    runtime, choice = open_runtime(loaded, bundle_dir, backend, precision, frame_shapes, max_batch)
    return ModelProcessor(loaded, bundle_dir, runtime, choice.backend, tile_px, corrections)
