"""Export and CPU runtimes: parity with torch float32, weight swaps, tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cpu_threads import TEST_THREADS
from tiny_specs import TINY_2D, TINY_3D, TINY_3D_DENOISED

from livedecon.engines._bundle import ModelBundle, shipped_bundle_path
from livedecon.engines._export import export_onnx, initializer_names
from livedecon.engines._networks import (
    Network2DSpec,
    Network3DSpec,
    UNetSpec,
    build_network,
    inference_weights,
)
from livedecon.engines._runtime import OnnxRuntime, TorchRuntime
from livedecon.engines._tiling import infer_tiled


def _weights(spec, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_network(spec).state_dict()


@pytest.mark.parametrize(
    "spec",
    [
        TINY_2D,
        Network2DSpec(unet=UNetSpec(levels=2, base_width=4), tail_width=8),
        TINY_3D,
        TINY_3D_DENOISED,
    ],
)
def test_export_keeps_torch_names_and_matches_torch(spec, tmp_path):
    is_3d = isinstance(spec, Network3DSpec)
    model = build_network(spec).eval()
    path = export_onnx(model, tmp_path / "m.onnx", is_3d)  # onnx.checker runs inside
    # every weight the graph uses, under its torch name (a denoised-serving graph skips the
    # deconvolution stage)
    assert set(initializer_names(path)) == set(inference_weights(spec, model.state_dict()))
    shape = (2, 1, 6, 16, 24) if is_3d else (3, 1, 32, 48)
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    onnx_out = OnnxRuntime(spec, model.state_dict(), tmp_path).infer(batch)
    torch_out = TorchRuntime(spec, model.state_dict()).infer(batch)
    assert onnx_out.shape == (*shape[:-2], 2 * shape[-2], 2 * shape[-1])
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", [TorchRuntime, OnnxRuntime])
def test_update_weights_switches_to_the_new_weights(backend):
    old, new = _weights(TINY_2D, 0), _weights(TINY_2D, 1)
    runtime = backend(TINY_2D, old)
    batch = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
    before = runtime.infer(batch)
    runtime.update_weights(new)
    after = runtime.infer(batch)
    expected = TorchRuntime(TINY_2D, new).infer(batch)
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-5)
    assert runtime.describe()["weights_updates"] == 1


@pytest.mark.parametrize("backend", [TorchRuntime, OnnxRuntime])
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((32, 32), "expected a batch"),
        ((1, 2, 32, 32), "expected a batch"),
        ((1, 1, 30, 32), "multiple of 4"),
    ],
)
def test_bad_batches_are_refused(backend, shape, message):
    runtime = backend(TINY_2D, _weights(TINY_2D, 0))
    with pytest.raises(ValueError, match=message):
        runtime.infer(np.zeros(shape, np.float32))


@pytest.fixture(scope="module")
def shipped():
    bundle = ModelBundle.load(shipped_bundle_path("fast2d-sim"))
    return TorchRuntime(bundle.manifest.network, bundle.state_dict)


def test_tiled_output_matches_the_whole_frame(shipped):
    from livedecon.calibration._config import default_microscope
    from livedecon.calibration._forward_model import ForwardModel

    torch.set_num_threads(TEST_THREADS)
    scope = default_microscope()
    counts = ForwardModel(scope, noise_seed=5).acquire(0.0, 0.0, 20.0).counts[:160, :200]
    frame = ((counts - 100.0) * 0.5 / 23.0).astype(np.float32)  # model units of fast2d-sim
    whole = infer_tiled(shipped.infer, frame, shipped.multiple, 2)
    tiled = infer_tiled(shipped.infer, frame, shipped.multiple, 2, tile_px=128)
    assert tiled.shape == whole.shape == (320, 400)
    error = np.abs(tiled - whole)
    assert error.max() < 0.02 * whole.max()
    assert error.mean() < 0.001 * whole.max()


def test_no_seam_on_a_smooth_gradient(shipped):
    """A seam is a step at a tile boundary. Steps are compared on 2x2-binned outputs (the
    sub-pixel tail leaves a fine pattern of its own) and away from the frame border; tiles
    that do not overlap show the seam the measure is meant to catch."""
    yy, xx = np.mgrid[:192, :192]
    frame = (0.2 + 0.3 * xx / 192 + 0.2 * yy / 192).astype(np.float32)

    def largest_step(tile_px: int | None, overlap_px: int = 48) -> float:
        out = infer_tiled(shipped.infer, frame, shipped.multiple, 2, tile_px, overlap_px)
        binned = out.reshape(192, 2, 192, 2).mean(axis=(1, 3))[4:-4, 4:-4]
        return max(np.abs(np.diff(binned, axis=0)).max(), np.abs(np.diff(binned, axis=1)).max())

    whole = largest_step(None)
    assert largest_step(96) <= 1.1 * whole
    assert largest_step(96, overlap_px=0) > 2 * whole


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_cuda_matches_the_float32_reference(precision):
    from livedecon.engines._backends import GATE_DB, psnr_against
    from livedecon.engines._runtime import TorchCudaRuntime

    bundle = ModelBundle.load(shipped_bundle_path("fast2d-sim"))
    spec, weights = bundle.manifest.network, bundle.state_dict
    batch = np.random.default_rng(0).random((2, 1, 128, 128), dtype=np.float32)
    reference = TorchRuntime(spec, weights).infer(batch)
    runtime = TorchCudaRuntime(spec, weights, precision, compile_model=False)
    assert psnr_against(reference, runtime.infer(batch)) > GATE_DB[precision]
    runtime.update_weights(_weights(spec, 3))
    expected = TorchRuntime(spec, _weights(spec, 3)).infer(batch)
    assert psnr_against(expected, runtime.infer(batch)) > GATE_DB[precision]
