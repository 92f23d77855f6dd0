"""TensorRT backend: the pure logic runs everywhere; engine builds need TensorRT and a GPU."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_specs import TINY_2D, TINY_3D, TINY_3D_DENOISED, TINY_SELFNET

from livedecon.engines._export import export_onnx, initializer_names, output_names
from livedecon.engines._networks import Network3DSpec, build_network, inference_weights
from livedecon.engines._runtime import TorchRuntime
from livedecon.engines._tensorrt_runtime import (
    ShapeProfile,
    TensorRTRuntime,
    build_engine,
    engine_weights,
    match_layers,
    mixed_precision_onnx,
    onnx_constants,
    profile_fits,
    profile_for,
    refit_name_map,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _weights(spec, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _model(spec).state_dict()


def _model(spec) -> torch.nn.Module:
    """The network with its initial weights; Self-Net's last layers start at zero (an
    identity), so they are drawn at random here to make the graph's path count."""
    model = build_network(spec).eval()
    if spec == TINY_SELFNET:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.1)
    return model


def _psnr(reference: np.ndarray, test: np.ndarray) -> float:
    peak = float(reference.max() - reference.min())
    return 10 * np.log10(peak**2 / float(np.mean((reference - test) ** 2)))


# --------------------------------------------------------------------------- profiles


def test_profile_rounds_laterally_to_the_multiple():
    profile = profile_for([(500, 700), (100, 40)], multiple=16, max_batch=4)
    assert profile.min == (1, 1, 112, 48)
    assert profile.max == (4, 1, 512, 704)
    assert profile.opt == (4, 1, 512, 704)  # tie between the two: the largest


def test_profile_opt_is_the_most_frequent_shape_at_opt_batch():
    shapes = [(2048, 2048), (512, 512), (512, 512), (256, 1024)]
    profile = profile_for(shapes, multiple=16, max_batch=8, opt_batch=2)
    assert profile.opt == (2, 1, 512, 512)
    assert profile.min == (1, 1, 256, 512)  # smallest per axis, not one of the shapes
    assert profile.max == (8, 1, 2048, 2048)


def test_profile_counts_shapes_after_rounding():
    # (500, 500) and (512, 512) are one engine shape; they outnumber (1024, 1024)
    profile = profile_for([(500, 500), (512, 512), (1024, 1024)], multiple=16, max_batch=1)
    assert profile.opt == (1, 1, 512, 512)


def test_profile_for_3d_rounds_only_the_lateral_axes():
    profile = profile_for([(13, 30, 30), (7, 64, 60)], multiple=4, max_batch=2)
    assert profile.min == (1, 1, 7, 32, 32)
    assert profile.max == (2, 1, 13, 64, 60)
    assert profile.opt == (2, 1, 7, 64, 60)
    assert profile.is_3d


@pytest.mark.parametrize(
    ("shapes", "kwargs", "message"),
    [
        ([], {}, "no frame shapes"),
        ([(64, 64), (8, 64, 64)], {}, "mix 2D and 3D"),
        ([(64,)], {}, r"\(Y, X\) or \(Z, Y, X\)"),
        ([(1, 2, 3, 4)], {}, r"\(Y, X\) or \(Z, Y, X\)"),
        ([(64, 0)], {}, "positive"),
        ([(-8, 64)], {}, "positive"),
        ([(4, 0, 64)], {}, "positive"),
        ([(64, 64)], {"max_batch": 0}, "max_batch"),
        ([(64, 64)], {"max_batch": 2, "opt_batch": 3}, "opt_batch"),
        ([(64, 64)], {"opt_batch": 0}, "opt_batch"),
        ([(64, 64)], {"multiple": 0}, "multiple"),
    ],
)
def test_profile_for_rejects_bad_input(shapes, kwargs, message):
    arguments = {"multiple": 16, "max_batch": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        profile_for(shapes, **arguments)


@pytest.mark.parametrize(
    ("low", "opt", "high"),
    [
        ((1, 1, 64, 64), (1, 1, 32, 64), (1, 1, 64, 64)),  # opt below min
        ((1, 1, 64, 64), (2, 1, 64, 64), (1, 1, 64, 64)),  # opt above max
        ((1, 1, 64, 64), (1, 1, 64, 64), (1, 1, 8, 64, 64)),  # ranks differ
        ((1, 2, 64, 64), (1, 2, 64, 64), (1, 2, 64, 64)),  # two channels
        ((0, 1, 64, 64), (1, 1, 64, 64), (1, 1, 64, 64)),  # empty batch
    ],
)
def test_shape_profile_rejects_inconsistent_shapes(low, opt, high):
    with pytest.raises(ValueError, match="profile"):
        ShapeProfile(min=low, opt=opt, max=high)


def test_profile_fits():
    profile = profile_for([(64, 128), (256, 256)], multiple=16, max_batch=4)
    assert profile_fits(profile, (1, 1, 64, 128))
    assert profile_fits(profile, (4, 1, 256, 256))
    assert profile_fits(profile, (2, 1, 128, 192))  # in between, not configured
    assert not profile_fits(profile, (5, 1, 256, 256))  # batch too large
    assert not profile_fits(profile, (1, 1, 272, 256))  # frame too large: tile it
    assert not profile_fits(profile, (1, 1, 48, 128))  # below min: pad it
    assert not profile_fits(profile, (1, 2, 64, 128))  # two channels
    assert not profile_fits(profile, (1, 1, 4, 64, 128))  # 3D batch on a 2D engine
    assert profile.as_dict()["max"] == [4, 1, 256, 256]


# --------------------------------------------------------------------------- refit names


@pytest.mark.parametrize(
    "spec",
    [TINY_2D, TINY_3D, TINY_3D_DENOISED, TINY_SELFNET],
    ids=["2d", "3d", "3d-serving-denoised", "selfnet"],
)
def test_refit_map_on_real_exported_initializer_names(spec, tmp_path):
    """Every weight the graph holds is refitted (a denoised-serving 3D graph has no
    deconvolution stage, and the refit leaves its weights out rather than failing)."""
    model = build_network(spec)
    path = export_onnx(model, tmp_path / "m.onnx", isinstance(spec, Network3DSpec))
    engine_names = [*initializer_names(path), "onnx::Conv_123", "/tail/tail.4/Constant_output_0"]
    served = inference_weights(spec, model.state_dict())
    mapping = refit_name_map(served.keys(), engine_names)
    assert mapping == {name: name for name in served}
    skipped = set(model.state_dict()) - set(served)
    assert bool(skipped) == (spec is TINY_3D_DENOISED)
    assert all(name.startswith("deconvolver.") for name in skipped)


def test_refit_map_tolerates_separators_and_suffixes():
    torch_names = list(build_network(TINY_2D).state_dict())
    renamed = {}
    for i, name in enumerate(torch_names):
        if i % 3 == 0:
            renamed[name] = name.replace(".", "/")
        elif i % 3 == 1:
            renamed[name] = name.replace(".", "_")
        else:
            renamed[name] = name + "_1"  # a suffix appended by the engine
    engine_names = [*renamed.values(), "onnx::Conv_77", "Constant_output_0"]
    assert refit_name_map(torch_names, engine_names[::-1]) == renamed


def test_refit_map_skips_integer_counters():
    mapping = refit_name_map(["conv.weight", "bn.num_batches_tracked"], ["conv.weight"])
    assert mapping == {"conv.weight": "conv.weight"}


def test_refit_map_reports_unmapped_torch_names():
    torch_names = [f"block.{i}.weight" for i in range(7)] + ["head.weight"]
    with pytest.raises(ValueError, match="7 torch parameter") as caught:
        refit_name_map(torch_names, ["head.weight", "onnx::Conv_1"])
    message = str(caught.value)
    assert "block.0.weight" in message
    assert "block.4.weight" in message
    assert "block.5.weight" not in message  # at most five listed
    assert "+2 more" in message


def test_refit_map_refuses_ambiguous_suffixes():
    with pytest.raises(ValueError, match="several engine weights"):
        refit_name_map(["tail.0.weight"], ["tail.0.weight_1", "tail.0.weight_2"])


def test_engine_weights_casts_and_checks_sizes():
    state = {"a.weight": torch.ones(2, 3), "a.bias": torch.zeros(2, dtype=torch.float64)}
    mapping = {"a.weight": "a/weight", "a.bias": "a.bias"}
    arrays = engine_weights(state, mapping, dtypes={"a/weight": np.float16})
    assert arrays["a/weight"].dtype == np.float16
    assert arrays["a/weight"].flags.c_contiguous
    assert arrays["a.bias"].dtype == np.float32
    with pytest.raises(ValueError, match="another architecture"):
        engine_weights(state, mapping, counts={"a/weight": 4})
    with pytest.raises(ValueError, match="lacks"):
        engine_weights({"a.weight": torch.ones(1)}, mapping)


# --------------------------------------------------------------------------- FP16 graph


def test_match_layers_by_name_or_prefix():
    names = ["/tail/tail.0/Conv", "/tail/tail.1/Relu", "/denoiser/pool/MaxPool"]
    assert match_layers(names, ["/tail/"]) == names[:2]
    assert match_layers(names, ["/denoiser/pool/MaxPool", "/tail/tail.1/Relu"]) == [
        names[2],
        names[1],
    ]
    assert match_layers(names, []) == []
    with pytest.raises(ValueError, match="match no layer"):
        match_layers(names, ["/tial/"])


@pytest.mark.parametrize(
    ("spec", "fp32_nodes", "shape"),
    [
        (TINY_2D, (), (2, 1, 32, 48)),
        (TINY_2D, ("/tail/",), (2, 1, 32, 48)),
        (TINY_3D, ("/deconvolver/tail/",), (1, 1, 4, 16, 24)),
        (TINY_SELFNET, (), (2, 1, 32, 48)),  # reflection padding in FP16
    ],
    ids=["2d", "2d-fp32-tail", "3d-fp32-tail", "selfnet"],
)
def test_mixed_precision_graph_keeps_io_names_and_accuracy(spec, fp32_nodes, shape, tmp_path):
    """The TensorRT 11 FP16 path, checked with onnxruntime: FP32 I/O, FP16 weights outside the
    islands, unchanged initializer names (the refit map) and outputs close to torch."""
    is_3d = isinstance(spec, Network3DSpec)
    torch.manual_seed(0)
    model = _model(spec)
    src = export_onnx(model, tmp_path / "m.onnx", is_3d)
    dst = mixed_precision_onnx(src, tmp_path / "m.fp16.onnx", fp32_nodes)
    graph = onnx.load(str(dst)).graph
    assert {init.name for init in graph.initializer} == set(initializer_names(src))
    island = [prefix.strip("/").replace("/", ".") for prefix in fp32_nodes]
    for init in graph.initializer:
        in_island = any(init.name.startswith(prefix + ".") for prefix in island)
        expected = onnx.TensorProto.FLOAT if in_island else onnx.TensorProto.FLOAT16
        assert init.data_type == expected, init.name
    assert all(out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for out in graph.output)

    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    names = output_names(model)
    outputs = session.run(list(names), {"raw": batch})
    with torch.no_grad():
        expected = model(torch.from_numpy(batch))
    references = [t.numpy() for t in (expected if len(names) > 1 else (expected,))]
    for name, out, reference in zip(names, outputs, references, strict=True):
        assert out.dtype == np.float32, name
        assert _psnr(reference, out) > 40, name


def test_mixed_precision_rejects_unknown_islands(tmp_path):
    src = export_onnx(build_network(TINY_2D), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="match no layer"):
        mixed_precision_onnx(src, tmp_path / "x.onnx", ["/no/such/node"])


def test_onnx_constants_include_constant_nodes(tmp_path):
    model = build_network(TINY_2D)
    values = onnx_constants(export_onnx(model, tmp_path / "m.onnx"))
    assert set(model.state_dict()) <= set(values)
    np.testing.assert_array_equal(values["tail.0.bias"], model.state_dict()["tail.0.bias"])
    assert any("Constant" in name for name in values)  # softplus beta, resize scales


# --------------------------------------------------------------------------- without TensorRT


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_runtime_and_build_say_tensorrt_is_missing(tmp_path):
    profile = profile_for([(32, 32)], multiple=4, max_batch=1)
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        TensorRTRuntime(
            TINY_2D, _weights(TINY_2D, 0), tmp_path / "m.onnx", tmp_path / "m.plan", profile
        )
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", profile, "fp16", None)
    assert not (tmp_path / "m.onnx").exists()  # nothing exported before the check


# --------------------------------------------------------------------------- with TensorRT

PROFILE_2D = profile_for([(32, 48), (64, 64)], multiple=4, max_batch=2)


def _batch(shape=(2, 1, 32, 48), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.tensorrt
def test_fp32_engine_matches_torch(tmp_path):
    weights = _weights(TINY_2D, 0)
    runtime = TensorRTRuntime(
        TINY_2D, weights, tmp_path / "m.onnx", tmp_path / "m.plan", PROFILE_2D, "fp32"
    )
    reference = TorchRuntime(TINY_2D, weights)
    for shape in [(2, 1, 32, 48), (1, 1, 64, 64), (1, 1, 32, 32)]:
        batch = _batch(shape)
        out, expected = runtime.infer(batch), reference.infer(batch)
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3 * np.ptp(expected))
    assert (tmp_path / "m.timing-cache").stat().st_size > 0
    described = runtime.describe()
    assert described["backend"] == "tensorrt"
    assert described["precision"] == "fp32"
    assert described["profile"] == PROFILE_2D.as_dict()
    assert described["weights_updates"] == 0


@pytest.mark.tensorrt
@pytest.mark.parametrize("fp32_layers", [(), ("/tail/",)], ids=["all-fp16", "fp32-tail"])
def test_fp16_engine_is_close_to_torch(fp32_layers, tmp_path):
    weights = _weights(TINY_2D, 0)
    runtime = TensorRTRuntime(
        TINY_2D,
        weights,
        tmp_path / "m.onnx",
        tmp_path / "m.plan",
        PROFILE_2D,
        "fp16",
        fp32_layers=fp32_layers,
    )
    batch = _batch()
    assert _psnr(TorchRuntime(TINY_2D, weights).infer(batch), runtime.infer(batch)) > 40


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_selfnet_engine_serves_its_one_output(precision, tmp_path):
    """Self-Net's graph has one output, `restored`, and reflection padding: the engine binds
    the outputs the network exports and matches torch."""
    weights = _weights(TINY_SELFNET, 0)
    profile = profile_for([(32, 48)], multiple=1, max_batch=2)
    runtime = TensorRTRuntime(
        TINY_SELFNET, weights, tmp_path / "s.onnx", tmp_path / "s.plan", profile, precision
    )
    assert runtime.outputs == ("restored",)
    batch = _batch()
    expected = TorchRuntime(TINY_SELFNET, weights).infer(batch)
    out = runtime.infer(batch)
    assert out.shape == expected.shape
    assert _psnr(expected, out) > (60 if precision == "fp32" else 40)


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_update_weights_refits_to_the_new_weights(precision, tmp_path):
    old, new = _weights(TINY_2D, 0), _weights(TINY_2D, 1)
    runtime = TensorRTRuntime(
        TINY_2D, old, tmp_path / "m.onnx", tmp_path / "m.plan", PROFILE_2D, precision
    )
    batch = _batch()
    before = runtime.infer(batch)
    for update in range(1, 3):  # twice: both engines of the pair serve in turn
        runtime.update_weights(new)
        after = runtime.infer(batch)
        expected = TorchRuntime(TINY_2D, new).infer(batch)
        assert not np.allclose(before, after)
        if precision == "fp32":
            np.testing.assert_allclose(after, expected, rtol=1e-3, atol=1e-3 * np.ptp(expected))
        else:
            assert _psnr(expected, after) > 40
        assert runtime.describe()["weights_updates"] == update


@pytest.mark.tensorrt
def test_cached_plan_is_refitted_to_the_given_weights(tmp_path):
    """A plan built from other weights still serves the weights passed in (refit at start)."""
    old, new = _weights(TINY_2D, 0), _weights(TINY_2D, 1)
    paths = (tmp_path / "m.onnx", tmp_path / "m.plan")
    TensorRTRuntime(TINY_2D, old, *paths, PROFILE_2D, "fp32")
    runtime = TensorRTRuntime(TINY_2D, new, *paths, PROFILE_2D, "fp32")
    batch = _batch()
    expected = TorchRuntime(TINY_2D, new).infer(batch)
    np.testing.assert_allclose(
        runtime.infer(batch), expected, rtol=1e-3, atol=1e-3 * np.ptp(expected)
    )


@pytest.mark.tensorrt
def test_frames_outside_the_profile_are_refused(tmp_path):
    runtime = TensorRTRuntime(
        TINY_2D, _weights(TINY_2D, 0), tmp_path / "m.onnx", tmp_path / "m.plan", PROFILE_2D
    )
    with pytest.raises(ValueError, match="tile it"):
        runtime.infer(_batch((1, 1, 128, 64)))
    with pytest.raises(ValueError, match="tile it"):
        runtime.infer(_batch((3, 1, 32, 32)))
    other = profile_for([(32, 32)], multiple=4, max_batch=1)
    with pytest.raises(ValueError, match="built for profile"):
        TensorRTRuntime(
            TINY_2D, _weights(TINY_2D, 0), tmp_path / "m.onnx", tmp_path / "m.plan", other
        )
