"""Backend choice, artifact cache and the accuracy gate (CPU backends; GPU ones where present)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_specs import TINY_2D

from livedecon.engines import _artifacts as artifacts
from livedecon.engines import _backends as backends
from livedecon.engines._backends import (
    AccuracyGateError,
    accuracy_gate,
    choose_backend,
    open_runtime,
)
from livedecon.engines._bundle import ModelBundle, Normalisation, PSFRecord, TrainingRecord
from livedecon.engines._networks import build_network
from livedecon.engines._runtime import TorchRuntime


def _bundle(seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    psf = np.zeros((5, 5), np.float32)
    psf[2, 2] = 1
    return ModelBundle.from_model(
        build_network(TINY_2D),
        name="tiny",
        input_pixel_um=0.1,
        normalisation=Normalisation(
            scale_e=10, camera_offset_adu=100, camera_gain_e_per_adu=1, read_noise_e=1
        ),
        psf=psf,
        psf_record=PSFRecord(source="theoretical", description="test", pixel_size_um=0.05),
        training=TrainingRecord.now(data=["none"], config={}, iterations=0),
    )


@pytest.fixture
def saved(tmp_path):
    return _bundle(), _bundle().save(tmp_path / "tiny")


def test_auto_picks_the_best_present_backend_and_says_why(monkeypatch):
    present = backends.available_backends()
    choice = choose_backend("auto")
    assert present[choice.backend] is None
    assert choice.reason.startswith(f"auto: {choice.backend}")
    if not torch.cuda.is_available():
        assert choice.backend == "onnxruntime"
        assert "not tensorrt" in choice.reason
    monkeypatch.setattr(backends, "available_backends", lambda: dict.fromkeys(backends.BACKENDS))
    assert choose_backend("auto").backend == "tensorrt"


def test_requesting_an_absent_or_unknown_backend_fails_clearly(monkeypatch):
    monkeypatch.setattr(
        backends,
        "available_backends",
        lambda: {**dict.fromkeys(backends.BACKENDS), "tensorrt": "no GPU"},
    )
    with pytest.raises(RuntimeError, match="tensorrt is not available: no GPU"):
        choose_backend("tensorrt")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        choose_backend("cuda")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_open_runtime_serves_checked_output_and_reuses_its_artifact(saved, backend):
    bundle, path = saved
    runtime, choice = open_runtime(bundle, path, backend)
    assert choice.backend == backend
    batch = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    reference = TorchRuntime(TINY_2D, bundle.state_dict).infer(batch)
    np.testing.assert_allclose(runtime.infer(batch), reference, rtol=1e-4, atol=1e-5)
    (entry,) = (path / "cache").glob(f"{backend}-fp32-*")
    key = json.loads((entry / "key.json").read_text())
    assert key["weights_sha256"] == bundle.manifest.weights_sha256
    assert json.loads((entry / "gate.json").read_text())["psnr_db"] >= 60
    if backend == "onnxruntime":
        built = (entry / "model.onnx").stat().st_mtime_ns
        open_runtime(bundle, path, backend)
        assert (entry / "model.onnx").stat().st_mtime_ns == built  # reused, not rebuilt


def test_a_stale_artifact_is_rebuilt_never_used(saved):
    bundle, path = saved
    open_runtime(bundle, path, "onnxruntime")
    (entry,) = (path / "cache").glob("onnxruntime-*")
    key = json.loads((entry / "key.json").read_text())
    key["libraries"]["onnxruntime"] = "0.0.1"  # as if built by another version
    (entry / "key.json").write_text(json.dumps(key))
    (entry / "model.onnx").write_bytes(b"not a graph")  # using it would fail loudly
    runtime, _ = open_runtime(bundle, path, "onnxruntime")
    assert runtime.infer(np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 1, 16, 16)
    # new weights are a new artifact beside the old one
    newer = bundle.with_weights(_bundle(seed=1).state_dict)
    open_runtime(newer, path, "onnxruntime")
    assert len(list((path / "cache").glob("onnxruntime-*"))) == 2


def test_read_only_bundles_cache_in_the_user_cache(saved, tmp_path, monkeypatch):
    bundle, path = saved
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.setattr(artifacts.os, "access", lambda *_: False)
    open_runtime(bundle, path, "onnxruntime")
    assert list((tmp_path / "user-cache" / "livedecon" / "bundles").glob("tiny-*/onnxruntime-*"))


class _Noisy:
    """A runtime whose output strays from the reference by a set amount."""

    def __init__(self, bundle: ModelBundle, noise: float) -> None:
        self.inner, self.noise = TorchRuntime(TINY_2D, bundle.state_dict), noise

    def infer(self, batch):
        out = self.inner.infer(batch)
        return out + self.noise * (out.max() - out.min()) * np.random.default_rng(
            0
        ).standard_normal(out.shape)

    def describe(self):
        return {"backend": "noisy"}


def test_accuracy_gate_refuses_a_backend_that_strays(tmp_path):
    bundle = _bundle()
    assert accuracy_gate(_Noisy(bundle, 1e-4), bundle, "fp16") > 40
    with pytest.raises(AccuracyGateError, match=r"noisy \(fp16\) reaches .* below the 40 dB gate"):
        accuracy_gate(_Noisy(bundle, 0.05), bundle, "fp16", tmp_path / "gate.json")
    assert json.loads((tmp_path / "gate.json").read_text())["psnr_db"] < 40


def test_artifact_key_changes_with_every_ingredient(monkeypatch):
    bundle = _bundle()
    base = artifacts.artifact_key(bundle, "onnxruntime", "fp32", {"max": [4, 1, 64, 64]})
    variants = [
        artifacts.artifact_key(
            bundle.with_weights(_bundle(1).state_dict), "onnxruntime", "fp32", base["profile"]
        ),
        artifacts.artifact_key(bundle, "torch", "fp32", base["profile"]),
        artifacts.artifact_key(bundle, "onnxruntime", "fp16", base["profile"]),
        artifacts.artifact_key(bundle, "onnxruntime", "fp32", {"max": [4, 1, 128, 128]}),
    ]
    monkeypatch.setattr(artifacts, "device_description", lambda _: "NVIDIA H100 sm_90")
    variants.append(artifacts.artifact_key(bundle, "onnxruntime", "fp32", base["profile"]))
    monkeypatch.undo()
    monkeypatch.setattr(artifacts, "library_versions", lambda: {"onnxruntime": "9.9"})
    variants.append(artifacts.artifact_key(bundle, "onnxruntime", "fp32", base["profile"]))
    monkeypatch.undo()
    digests = {artifacts._digest(k) for k in [base, *variants]}
    assert len(digests) == 1 + len(variants)
    assert artifacts._digest(base) == artifacts._digest(
        artifacts.artifact_key(bundle, "onnxruntime", "fp32", {"max": [4, 1, 64, 64]})
    )


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_through_open_runtime_passes_the_gate_and_caches_its_plan(saved, precision):
    bundle, path = saved
    runtime, choice = open_runtime(bundle, path, "tensorrt", precision, [(64, 64)], max_batch=2)
    assert choice.gate_db >= backends.GATE_DB[precision]
    (entry,) = (path / "cache").glob(f"tensorrt-{precision}-*")
    assert (entry / "engine.plan").is_file()
    batch = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    assert runtime.infer(batch).shape == (2, 1, 128, 128)


def test_fp16_tensorrt_missing_the_gate_falls_back_to_fp32_heads(saved, monkeypatch):
    """The selection logic around TensorRT, with TensorRT itself replaced by a stand-in whose
    all-FP16 engine strays and whose FP32-heads engine does not (TensorRT cannot run here)."""
    from livedecon.engines import _tensorrt_runtime as trt_rt

    bundle, path = saved
    built = []

    def build_engine(onnx_path, plan, profile, precision, cache, fp32_layers=()):
        built.append(tuple(fp32_layers))
        plan.write_bytes(b"plan")
        return plan

    class StandIn(_Noisy):
        def __init__(self, spec, weights, onnx_path, plan, profile, precision, fp32_layers=()):
            super().__init__(bundle, 0.0 if fp32_layers else 0.05)

    monkeypatch.setattr(backends, "available_backends", lambda: dict.fromkeys(backends.BACKENDS))
    monkeypatch.setattr(trt_rt, "build_engine", build_engine)
    monkeypatch.setattr(trt_rt, "TensorRTRuntime", StandIn)
    runtime, choice = open_runtime(bundle, path, "tensorrt", "fp16", [(64, 64)], max_batch=2)
    assert built == [(), backends.FP32_HEADS[False]]
    assert choice.gate_db >= 40
    assert runtime.noise == 0.0
    open_runtime(bundle, path, "tensorrt", "fp16", [(64, 64)], max_batch=2)
    assert len(built) == 2  # cached plans and gate results: nothing rebuilt
    key = json.loads(next((path / "cache").glob("tensorrt-fp16-*/key.json")).read_text())
    assert key["profile"]["max"] == [2, 1, 64, 64]
