"""`livedecon bench engines`: latency and throughput of every backend present.

Models carry random weights (speed does not depend on them) and go through the same path as
served bundles (`open_runtime`: artifact cache and accuracy gate), one frame per call.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from livedecon.engines._backends import available_backends, open_runtime
from livedecon.engines._bundle import ModelBundle, Normalisation, PSFRecord, TrainingRecord
from livedecon.engines._enums import Backend
from livedecon.engines._networks import (
    DpsSpec,
    Network2DSpec,
    Network3DSpec,
    NetworkSpec,
    build_network,
    fast_2d_spec,
)
from livedecon.engines._selfnet import SelfNetSpec, fast_selfnet_spec
from livedecon.engines._sim import SimSettings
from livedecon.engines._sim_training import SimTrainingConfig

MODELS: dict[str, Callable[[], NetworkSpec]] = {
    "full": Network2DSpec,
    "fast": fast_2d_spec,
    "3d": Network3DSpec,
    # Self-Net restores axial slices: a row's input is one slice (an isotropic volume needs
    # every output voxel restored twice, in its xz and in its yz slice)
    "selfnet": SelfNetSpec,
    "selfnet-fast": fast_selfnet_spec,
    # SIM models restore SR-SIM images: a row's input is one SR image (twice the camera's
    # width), after the reconstruction, which is timed by `livedecon bench sim`
    "sim": lambda: SimTrainingConfig().network,
    "dps": lambda: DpsSpec(upsample=False),
}
SIM_MODELS = ("sim", "dps")


def _random_sim_bundle(spec: NetworkSpec, directory: Path) -> ModelBundle:
    from livedecon.engines._sim_bundle import sim_bundle

    psf = np.zeros((31, 31), np.float32)
    psf[15, 15] = 1.0
    bundle = sim_bundle(
        build_network(spec),
        name=f"bench-sim-{spec.kind}",
        scale_e=1.0,
        psf=psf,
        reconstruction=SimSettings(wiener=0.1),
        camera_pixel_um=0.1,
        na=1.4,
        emission_um=0.6,
        sample_ri=1.33,
        read_noise_e=1.5,
        background_e=0.0,
        training=TrainingRecord.now(data=["random weights"], config={}, iterations=0),
    )
    bundle.save(directory, overwrite=True)
    return bundle


def _random_bundle(spec: NetworkSpec, directory: Path, sim: bool = False) -> ModelBundle:
    """A bundle of random weights; `sim`: a SIM model (SR images in and out)."""
    torch.manual_seed(0)
    if sim:
        return _random_sim_bundle(spec, directory)
    if isinstance(spec, SelfNetSpec):
        from livedecon.engines._selfnet_bundle import selfnet_bundle

        bundle = selfnet_bundle(
            build_network(spec),
            name=f"bench-{spec.kind}",
            pixel_um=0.1,
            z_step_um=0.3,
            normalisation=Normalisation(
                scale_e=1.0, camera_offset_adu=0.0, camera_gain_e_per_adu=1.0, read_noise_e=None
            ),
            training=TrainingRecord.now(data=["random weights"], config={}, iterations=0),
        )
        bundle.save(directory, overwrite=True)
        return bundle
    is_3d = isinstance(spec, Network3DSpec)
    psf = np.zeros((3, 3, 3) if is_3d else (3, 3), np.float32)
    psf[(1,) * psf.ndim] = 1.0
    bundle = ModelBundle.from_model(
        build_network(spec),
        name=f"bench-{spec.kind}",
        input_pixel_um=0.1,
        z_step_um=0.2 if is_3d else None,
        normalisation=Normalisation(
            scale_e=1.0, camera_offset_adu=0.0, camera_gain_e_per_adu=1.0, read_noise_e=None
        ),
        psf=psf,
        psf_record=PSFRecord(
            source="theoretical",
            description="benchmark",
            pixel_size_um=0.05,
            z_step_um=0.2 if is_3d else None,
        ),
        training=TrainingRecord.now(data=["random weights"], config={}, iterations=0),
    )
    bundle.save(directory, overwrite=True)
    return bundle


def _time(
    infer: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, repeats: int, budget_s: float
) -> list[float]:
    infer(batch)  # warm-up: allocation, autotuning, compilation
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        infer(batch)
        times.append(time.perf_counter() - start)
    return times


def bench_engines(
    models: Sequence[str] = ("full", "fast", "3d"),
    sizes: Sequence[int] = (256, 512, 1024),
    stack: tuple[int, int, int] = (16, 256, 256),
    backends: Sequence[str] | None = None,
    repeats: int = 20,
    budget_s: float = 20.0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, object]]:
    """One row per (backend, model, input shape): latency p50/p95 (ms) and frames/s."""
    present = [b for b, why in available_backends().items() if why is None]
    chosen = [Backend(b) for b in (backends or present) if b in present]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="livedecon-bench-") as tmp:
        for model in models:
            spec = MODELS[model]()
            bundle_dir = Path(tmp) / model
            bundle = _random_bundle(spec, bundle_dir, sim=model in SIM_MODELS)
            shapes = [stack] if model == "3d" else [(s, s) for s in sizes]
            for backend in chosen:
                runtime, _ = open_runtime(
                    bundle, bundle_dir, backend, frame_shapes=shapes, max_batch=1
                )
                for shape in shapes:
                    if progress:
                        progress(f"{backend} {model} {'x'.join(map(str, shape))}")
                    batch = np.random.default_rng(0).random((1, 1, *shape), dtype=np.float32)
                    times = np.array(_time(runtime.infer, batch, repeats, budget_s))
                    rows.append(
                        {
                            "backend": backend,
                            "precision": runtime.describe()["precision"],
                            "model": model,
                            "input": "x".join(map(str, shape)),
                            "runs": len(times),
                            "p50_ms": float(np.percentile(times, 50) * 1e3),
                            "p95_ms": float(np.percentile(times, 95) * 1e3),
                            "frames_per_s": float(1.0 / times.mean()),
                            "output_voxels_per_s": float(
                                np.prod(shape) * runtime_upscale(spec) ** 2 / times.mean()
                            ),
                        }
                    )
    return rows


def runtime_upscale(spec: NetworkSpec) -> int:
    """Lateral upsampling of a network's output (2 for ZS-DeconvNet with its tail, else 1)."""
    return 2 if spec.upsample else 1
