"""Choosing, building and checking a runtime for a bundle.

`open_runtime` is the one entry point: it picks the backend (`auto`: tensorrt > torch-cuda >
onnxruntime > torch, from what is present, saying why), builds or reuses its cached artifact,
and before the runtime serves, compares it with the torch float32 reference on a fixed input.
Below the precision's PSNR threshold it refuses with an `AccuracyGateError`; the result is
cached with the artifact.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio

from livedecon.engines._artifacts import artifact_dir, artifact_key, cache_root, seal
from livedecon.engines._bundle import ModelBundle
from livedecon.engines._enums import Backend, Precision
from livedecon.engines._networks import input_multiple
from livedecon.engines._runtime import OnnxRuntime, Runtime, TorchCudaRuntime, TorchRuntime

if TYPE_CHECKING:  # imported where used: it imports onnx (about a second)
    from livedecon.engines._tensorrt_runtime import ShapeProfile

log = logging.getLogger(__name__)

# fastest first: auto takes the first one present
BACKENDS = (Backend.TENSORRT, Backend.TORCH_CUDA, Backend.ONNXRUNTIME, Backend.TORCH)
DEFAULT_PRECISION = {
    Backend.TENSORRT: Precision.FP16,
    Backend.TORCH_CUDA: Precision.FP16,
    Backend.ONNXRUNTIME: Precision.FP32,
    Backend.TORCH: Precision.FP32,
}
# PSNR (dB, over the reference output's range) a backend must reach against torch float32.
# Float32 backends differ only by summation order; half precision keeps about 3 decimal
# digits, and 40 dB (1% of the range at worst-case RMS) is invisible in a restored frame.
GATE_DB = {Precision.FP32: 60.0, Precision.FP16: 40.0, Precision.BF16: 35.0}


class AccuracyGateError(RuntimeError):
    """A compiled backend whose output strays too far from the float32 reference."""


@dataclass(frozen=True)
class Choice:
    """The backend chosen, why, and its accuracy-gate PSNR once checked."""

    backend: Backend
    reason: str
    gate_db: float | None = None  # PSNR against torch float32, once checked


def available_backends() -> dict[Backend, str | None]:
    """Each backend and why it cannot run here (None: it can)."""
    cuda = torch.cuda.is_available()
    has = lambda module: importlib.util.find_spec(module) is not None  # noqa: E731
    return {
        Backend.TENSORRT: None
        if has("tensorrt") and cuda
        else "needs the tensorrt package and a CUDA GPU",
        Backend.TORCH_CUDA: None if cuda else "torch sees no CUDA GPU",
        Backend.ONNXRUNTIME: None if has("onnxruntime") else "onnxruntime is not installed",
        Backend.TORCH: None,
    }


def choose_backend(requested: str = Backend.AUTO) -> Choice:
    """The backend for `requested`: a Backend or its name (ValueError for any other name)."""
    availability = available_backends()
    if requested != Backend.AUTO:
        if requested not in availability:
            raise ValueError(f"unknown backend {requested!r}; one of auto, {', '.join(BACKENDS)}")
        backend = Backend(requested)
        if availability[backend]:
            raise RuntimeError(f"backend {backend} is not available: {availability[backend]}")
        return Choice(backend, "requested")
    skipped: list[str] = []
    for name in BACKENDS:
        if availability[name] is None:
            why = "; ".join(skipped) if skipped else "the fastest backend"
            return Choice(name, f"auto: {name} ({why})")
        skipped.append(f"not {name}: {availability[name]}")
    raise AssertionError("torch is always available")


def gate_input(is_3d: bool, multiple: int, size: int = 64, seed: int = 7) -> np.ndarray:
    """A fixed, specimen-like input in model units: sparse bright blobs on a dim background
    with shot-like noise (the same for every backend and every run)."""
    rng = np.random.default_rng(seed)
    size = max(size // multiple, 1) * multiple
    shape = (8, size, size) if is_3d else (size, size)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    image = np.full(shape, 0.05)
    for _ in range(24):
        centre = [rng.uniform(0, n) for n in shape]
        r2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
        image += rng.uniform(0.2, 1.0) * np.exp(-r2 / (2 * rng.uniform(1.0, 3.0) ** 2))
    image = rng.poisson(image * 50) / 50.0
    return image[None, None].astype(np.float32)


def psnr_against(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR (dB) of `candidate` over the reference's range; infinite when they are equal."""
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    if np.array_equal(reference, candidate):
        return float("inf")
    span = float(reference.max() - reference.min()) or 1.0
    return float(peak_signal_noise_ratio(reference, candidate, data_range=span))


def accuracy_gate(
    runtime: Runtime,
    bundle: ModelBundle,
    precision: Precision,
    record: Path | None = None,
    reuse: bool = False,
) -> float:
    """PSNR of `runtime` against torch float32 on the fixed input; raises below the gate.
    The result is stored in `record`; with `reuse` (a valid cached artifact) a stored result
    is taken instead of measuring again."""
    if reuse and record is not None and record.is_file():
        stored = json.loads(record.read_text())
        psnr, threshold = stored["psnr_db"], stored["threshold_db"]
    else:
        reference = TorchRuntime(bundle.manifest.network, bundle.state_dict)
        batch = gate_input(bundle.manifest.is_3d, reference.multiple)
        psnr = psnr_against(reference.infer(batch), runtime.infer(batch))
        threshold = GATE_DB[precision]
        if record is not None:
            record.write_text(json.dumps({"psnr_db": psnr, "threshold_db": threshold}))
    if psnr < threshold:
        raise AccuracyGateError(
            f"{runtime.describe()['backend']} ({precision}) reaches {psnr:.1f} dB against torch"
            f" float32, below the {threshold:.0f} dB gate: refusing to serve with it"
        )
    return psnr


# ONNX node-name prefixes of the output heads: the layers an FP16 engine keeps in FP32 when it
# misses the gate without them (the last convolutions set the output's absolute level).
FP32_HEADS = {False: ("/denoise_out/", "/tail/"), True: ("/denoiser/tail/", "/deconvolver/tail/")}


def _checked_tensorrt(
    bundle: ModelBundle, directory: Path, profile: ShapeProfile, precision: Precision, cached: bool
) -> tuple[Runtime, float]:
    """A TensorRT runtime that passes the gate: all-FP16 first, then (fp16 only) with the
    output heads in FP32. Each variant's plan and gate result are cached side by side."""
    from livedecon.engines import _tensorrt_runtime as trt_rt

    spec, weights = bundle.manifest.network, bundle.state_dict
    trt_precision = trt_rt.checked_precision(precision)
    variants: list[tuple[str, tuple[str, ...]]] = [("engine", ())]
    if precision == Precision.FP16 and not bundle.manifest.is_selfnet:
        # Self-Net has no heads named apart: its fp16 engine passes the gate or fails it
        variants.append(("engine-fp32-heads", FP32_HEADS[bundle.manifest.is_3d]))
    failure: AccuracyGateError | None = None
    for stem, fp32_layers in variants:
        plan = directory / f"{stem}.plan"
        if not (cached and plan.is_file()):
            trt_rt.build_engine(
                directory / "model.onnx",
                plan,
                profile,
                trt_precision,
                directory.parent / "timing.cache",
                fp32_layers,
            )
        runtime = trt_rt.TensorRTRuntime(
            spec,
            weights,
            directory / "model.onnx",
            plan,
            profile,
            trt_precision,
            fp32_layers=fp32_layers,
        )
        try:
            record = directory / f"gate-{stem}.json"
            return runtime, accuracy_gate(runtime, bundle, precision, record, reuse=cached)
        except AccuracyGateError as exc:
            log.warning("%s; trying the next precision variant", exc)
            failure = exc
    assert failure is not None
    raise failure


def open_runtime(
    bundle: ModelBundle,
    bundle_dir: Path,
    backend: Backend = Backend.AUTO,
    precision: Precision | None = None,
    frame_shapes: Sequence[tuple[int, ...]] = ((1024, 1024),),
    max_batch: int = 4,
    threads: int | None = None,
) -> tuple[Runtime, Choice]:
    """A checked runtime for `bundle`, built from (or into) the artifact cache. `threads`:
    intra-op CPU threads of onnxruntime (default: all cores; several engines per machine, as
    batch workers are, share the cores instead)."""
    choice = choose_backend(backend)
    if (
        bundle.manifest.is_selfnet
        and choice.backend == Backend.TENSORRT
        and backend == Backend.AUTO
    ):
        # A Self-Net engine has not been built on a real TensorRT yet: asked for by name only
        choice = Choice(Backend.TORCH_CUDA, "auto: torch-cuda (tensorrt for Self-Net: on request)")
    name = choice.backend
    precision = precision or DEFAULT_PRECISION[name]
    spec, weights = bundle.manifest.network, bundle.state_dict
    profile = None
    if name == Backend.TENSORRT:
        from livedecon.engines import _tensorrt_runtime as trt_rt

        profile = trt_rt.profile_for(
            frame_shapes, input_multiple(bundle.manifest.network), max_batch
        )
    key = artifact_key(bundle, name, precision, None if profile is None else profile.as_dict())
    directory, cached = artifact_dir(cache_root(bundle_dir, bundle), key)
    onnx_path = directory / "model.onnx"
    if name in (Backend.ONNXRUNTIME, Backend.TENSORRT) and not cached:
        from livedecon.engines._export import export_onnx  # onnx takes ~1 s to import

        export_onnx(bundle.build_model(), onnx_path, bundle.manifest.is_3d)
    runtime: Runtime
    if name == Backend.TENSORRT:
        assert profile is not None  # made above for tensorrt
        runtime, psnr = _checked_tensorrt(bundle, directory, profile, precision, cached)
    else:
        if name == Backend.TORCH:
            runtime = TorchRuntime(spec, weights)
        elif name == Backend.TORCH_CUDA:
            runtime = TorchCudaRuntime(spec, weights, precision)
        else:
            runtime = OnnxRuntime(spec, weights, onnx_path=onnx_path, threads=threads)
        psnr = accuracy_gate(runtime, bundle, precision, directory / "gate.json", reuse=cached)
    seal(directory, key)
    log.info("%s; accuracy gate %.1f dB; artifact %s", choice.reason, psnr, directory)
    return runtime, replace(choice, gate_db=psnr)
