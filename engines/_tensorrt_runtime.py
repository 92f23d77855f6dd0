"""TensorRT backend: an engine built from the exported ONNX graph, refitted for hot swaps.

The TensorRT calls are kept thin; the decisions live in pure functions that run (and are tested)
without TensorRT or a GPU:

- `profile_for` turns the configured frame shapes into one optimisation profile (min/opt/max),
  `profile_fits` tells the daemon when a frame has to be tiled instead.
- `refit_name_map` maps torch parameter names to the engine's refittable weight names, and
  `engine_weights` turns a state dict into the arrays the Refitter takes.
- `match_layers` picks the layers forced to FP32 ("FP32 islands") by exact name or name prefix.
- `mixed_precision_onnx` writes an FP16 copy of the graph with FP32 islands and FP32 I/O. TensorRT
  11 removed the weak-typing flags (BuilderFlag.FP16, OBEY_PRECISION_CONSTRAINTS): every network
  is strongly typed, so reduced precision has to be written into the graph itself. On TensorRT 10
  the builder flags are used, as they still exist there. It is written here because the
  maintained converter fails on these graphs: onnxconverter-common 1.16's
  `convert_float_to_float16(keep_io_types=True)` casts the graph output `denoised` back to FP32
  while the deconvolver's FP16 convolution still reads that name, and onnxruntime refuses the
  result ("Type parameter (T) of Optype (Conv) bound to different types"). Here such an output
  is computed under an inner name and cast once, at the end.

Weights are swapped without stopping the serving path: two engines are deserialised from the same
plan, one active and one standby. An update refits the standby, then swaps the pair in one
reference assignment. The engine that was active is refitted only after every inference that
started on it has finished, so both stay current and either can serve next.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from livedecon.engines._atomic_write import write_atomically
from livedecon.engines._enums import Backend, Precision
from livedecon.engines._export import INPUT, export_onnx, output_names
from livedecon.engines._networks import (
    Network3DSpec,
    NetworkSpec,
    build_network,
    inference_weights,
    input_multiple,
)
from livedecon.engines._runtime import _check_batch

TrtPrecision = Literal[Precision.FP16, Precision.FP32]  # what TensorRT builds here
Shape = tuple[int, ...]

NOT_INSTALLED = (
    "TensorRT is not installed (or its libraries cannot be loaded): install the `tensorrt` extra"
    " (pip install 'livedecon[tensorrt]') on a machine with an NVIDIA GPU, or use the"
    " onnxruntime or torch backend"
)

# --------------------------------------------------------------------------- shape profiles


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimisation profile for the input "raw": (N, 1, Y, X) or (N, 1, Z, Y, X).

    Kernels are tuned for `opt`; every shape between `min` and `max` (per axis) is accepted.
    """

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        shapes = (self.min, self.opt, self.max)
        ranks = {len(shape) for shape in shapes}
        if len(ranks) != 1 or ranks.pop() not in (4, 5):
            raise ValueError(f"profile shapes must all be (N, 1, [Z,] Y, X), got {shapes}")
        if any(shape[1] != 1 for shape in shapes):
            raise ValueError(f"profile shapes need one channel, got {shapes}")
        for low, high in ((self.min, self.opt), (self.opt, self.max)):
            if any(a < 1 or a > b for a, b in zip(low, high, strict=True)):
                raise ValueError(f"profile needs 1 <= min <= opt <= max per axis, got {shapes}")

    @property
    def is_3d(self) -> bool:
        return len(self.min) == 5

    def as_dict(self) -> dict[str, list[int]]:
        return {key: list(value) for key, value in asdict(self).items()}


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def profile_for(
    frame_shapes: Sequence[tuple[int, ...]],
    multiple: int,
    max_batch: int,
    opt_batch: int | None = None,
) -> ShapeProfile:
    """The profile that serves every configured frame shape, (Y, X) or (Z, Y, X).

    Lateral sizes are rounded up to the network multiple (frames are padded to it before
    inference). min: the smallest size per axis at batch 1; opt: the most frequent configured
    shape (ties: the largest), which TensorRT tunes its kernels for, at `opt_batch` (default
    `max_batch`); max: the largest size per axis at `max_batch`.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"opt_batch must be in 1..max_batch ({max_batch}), got {opt_batch}")
    shapes = [tuple(int(size) for size in shape) for shape in frame_shapes]
    if not shapes:
        raise ValueError("no frame shapes configured: cannot derive an engine profile")
    ranks = {len(shape) for shape in shapes}
    if len(ranks) > 1:
        raise ValueError(f"frame shapes mix 2D and 3D: {shapes}; one engine serves one kind")
    if ranks.pop() not in (2, 3):
        raise ValueError(f"frame shapes must be (Y, X) or (Z, Y, X), got {shapes}")
    bad = [shape for shape in shapes if min(shape) < 1]
    if bad:
        raise ValueError(f"frame sizes must be positive, got {bad}")
    rounded = [
        (*shape[:-2], _round_up(shape[-2], multiple), _round_up(shape[-1], multiple))
        for shape in shapes
    ]
    counts = Counter(rounded)
    opt = max(counts, key=lambda shape: (counts[shape], math.prod(shape), shape))
    low = tuple(min(axis) for axis in zip(*rounded, strict=True))
    high = tuple(max(axis) for axis in zip(*rounded, strict=True))
    return ShapeProfile(min=(1, 1, *low), opt=(opt_batch, 1, *opt), max=(max_batch, 1, *high))


def profile_fits(profile: ShapeProfile, batch_shape: Sequence[int]) -> bool:
    """Whether the engine accepts this batch as is; if not, the daemon tiles (or pads) it."""
    shape = tuple(int(size) for size in batch_shape)
    if len(shape) != len(profile.min):
        return False
    return all(
        low <= size <= high for low, size, high in zip(profile.min, shape, profile.max, strict=True)
    )


# --------------------------------------------------------------------------- weight names

_SEPARATORS = re.compile(r"[./:_\-]+")
SKIPPED_TORCH_SUFFIXES = ("num_batches_tracked",)  # integer counters, never in a graph


def _normalise(name: str) -> str:
    return _SEPARATORS.sub("_", name).strip("_")


def refit_name_map(torch_names: Iterable[str], engine_names: Iterable[str]) -> dict[str, str]:
    """torch parameter name -> engine (ONNX initializer) weight name, for the Refitter.

    export_onnx keeps the torch names, and the ONNX parser names refittable weights after the
    initializers, so the map is normally the identity. Tolerated renames: separators ('.', '_',
    '/', ':', '-') that differ, and a suffix TensorRT appends after the name ("conv.weight_1").
    Engine names with no torch counterpart (folded constants such as "onnx::Conv_123") are
    ignored. A torch name that cannot be placed is an error: refitting without it would leave
    stale weights in the engine.
    """
    torch_names = [n for n in torch_names if not n.endswith(SKIPPED_TORCH_SUFFIXES)]
    engine_names = list(dict.fromkeys(engine_names))
    engine_set = set(engine_names)
    mapping = {name: name for name in torch_names if name in engine_set}

    by_norm: dict[str, list[str]] = defaultdict(list)
    for name in engine_names:
        by_norm[_normalise(name)].append(name)
    torch_norms = {_normalise(name) for name in torch_names}
    taken = set(mapping.values())

    def claim(torch_name: str, candidates: list[str]) -> None:
        free = [c for c in candidates if c not in taken]
        if len(free) > 1:
            raise ValueError(
                f"torch parameter {torch_name!r} matches several engine weights {free}"
            )
        if free:
            mapping[torch_name] = free[0]
            taken.add(free[0])

    pending = [name for name in torch_names if name not in mapping]
    for name in pending:  # same name up to separators
        claim(name, by_norm.get(_normalise(name), []))
    for name in [n for n in pending if n not in mapping]:  # engine name = torch name + suffix
        prefix = _normalise(name) + "_"
        claim(
            name,
            [
                engine
                for norm, engines in by_norm.items()
                if norm.startswith(prefix) and norm not in torch_norms
                for engine in engines
            ],
        )

    unmapped = [name for name in torch_names if name not in mapping]
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (
            f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else ""
        )
        sample = ", ".join(engine_names[:5]) or "none"
        raise ValueError(
            f"{len(unmapped)} torch parameter(s) have no refittable engine weight: {shown}."
            f" The engine has {len(engine_names)} weight(s), e.g. {sample}; was the plan built"
            " from another architecture, or without the REFIT flag?"
        )
    return mapping


def engine_weights(
    state_dict: Mapping[str, torch.Tensor | np.ndarray],
    name_map: Mapping[str, str],
    dtypes: Mapping[str, np.dtype | type] | None = None,
    counts: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """engine weight name -> contiguous host array in the engine's dtype, checked before TensorRT
    sees it (the Refitter only answers False on a wrong size)."""
    dtypes, counts = dtypes or {}, counts or {}
    missing = [name for name in name_map if name not in state_dict]
    if missing:
        raise ValueError(f"state dict lacks {len(missing)} engine parameter(s): {missing[:5]}")
    arrays = {}
    for torch_name, engine_name in name_map.items():
        value = state_dict[torch_name]
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float32).numpy()
        array = np.ascontiguousarray(value, dtype=dtypes.get(engine_name, np.float32))
        expected = counts.get(engine_name)
        if expected is not None and array.size != expected:
            raise ValueError(
                f"{torch_name!r} has {array.size} values, the engine weight {engine_name!r} holds"
                f" {expected}: the weights are for another architecture"
            )
        arrays[engine_name] = array
    return arrays


def match_layers(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The names (TensorRT layers or ONNX nodes) equal to or starting with a pattern, such as
    "/tail/" for a whole module; a pattern that matches nothing is an error, not a silent no-op."""
    names = list(names)
    matched: dict[str, None] = {}
    unknown = []
    for pattern in patterns:
        hits = [name for name in names if name == pattern or name.startswith(pattern)]
        if not hits:
            unknown.append(pattern)
        matched.update(dict.fromkeys(hits))
    if unknown:
        raise ValueError(
            f"fp32 layer pattern(s) {unknown} match no layer; names look like {names[:5]}"
        )
    return list(matched)


# --------------------------------------------------------------------------- FP16 ONNX graph

# Ops whose float inputs and outputs share one type T, so they can run in FP16 as they stand.
# Any other op keeps the types it was exported with (FP32 around it, with casts).
FP16_OPS = frozenset(
    {
        "Abs", "Add", "AveragePool", "Clip", "Concat", "Conv", "ConvTranspose", "DepthToSpace",
        "Div", "GlobalAveragePool", "Identity", "LeakyRelu", "MaxPool", "Mul", "Pad",
        "ReduceMean", "Relu", "Reshape", "Resize", "Sigmoid", "Slice", "Softplus",
        "SpaceToDepth", "Split", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Upsample",
        "Where",
    }
)  # fmt: skip
# Float inputs that are parameters, not data: the ONNX spec fixes them to float32.
_PARAMETER_INPUTS = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1})}
_TYPE_AGNOSTIC = frozenset({"Cast", "Shape", "Size"})
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


def _data_inputs(node: onnx.NodeProto) -> list[tuple[int, str]]:
    skip = _PARAMETER_INPUTS.get(node.op_type, frozenset())
    return [(i, name) for i, name in enumerate(node.input) if name and i not in skip]


def _to_half(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(
        numpy_helper.to_array(tensor).astype(np.float16), name=tensor.name
    )


def mixed_precision_onnx(src: str | Path, dst: str | Path, fp32_nodes: Sequence[str] = ()) -> Path:
    """Write an FP16 copy of the graph at `src` to `dst`, for strongly typed TensorRT builds.

    Nodes named by `fp32_nodes` (exact ONNX node names or prefixes, see `match_layers`) and ops
    outside FP16_OPS stay FP32; weights used only by FP16 nodes are stored as FP16 under their
    original names (so the refit names do not change); casts join the two precisions. Graph
    inputs and outputs keep their exported FP32 types, so callers see no difference.
    """
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)), strict_mode=True)
    graph = model.graph
    exported: dict[str, int] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        exported[info.name] = info.type.tensor_type.elem_type
    for init in graph.initializer:
        exported[init.name] = init.data_type
    forced = set(match_layers([node.name for node in graph.node], fp32_nodes))

    def compute_type(node: onnx.NodeProto) -> int:
        keep = node.op_type not in FP16_OPS or node.name in forced
        return TensorProto.FLOAT if keep else TensorProto.FLOAT16

    consumers: dict[str, set[int]] = defaultdict(set)
    for node in graph.node:
        for _, name in _data_inputs(node):
            consumers[name].add(compute_type(node))
    half_only = {name for name, types in consumers.items() if types == {TensorProto.FLOAT16}}

    current = {info.name: info.type.tensor_type.elem_type for info in graph.input}
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name in half_only:
            init.CopyFrom(_to_half(init))
        current[init.name] = init.data_type

    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    if node.output[0] in half_only:
                        attr.t.CopyFrom(_to_half(attr.t))
                    current[node.output[0]] = attr.t.data_type
            nodes.append(node)
            continue
        if node.op_type in _TYPE_AGNOSTIC:  # any input type; output type fixed by the op
            current.update((out, exported[out]) for out in node.output if out in exported)
            nodes.append(node)
            continue
        want = compute_type(node)
        for i, name in _data_inputs(node):
            have = current.get(name, exported.get(name))
            if have in _FLOATS and have != want:
                if (name, want) not in casts:
                    cast = f"{name}/as_{'fp16' if want == TensorProto.FLOAT16 else 'fp32'}"
                    nodes.append(helper.make_node("Cast", [name], [cast], name=cast, to=want))
                    casts[name, want] = cast
                node.input[i] = casts[name, want]
        for out in node.output:
            if exported.get(out) in _FLOATS:
                current[out] = want
        nodes.append(node)

    for out in graph.output:
        wanted = out.type.tensor_type.elem_type
        if current.get(out.name, wanted) != wanted:
            inner = f"{out.name}/fp16"
            for node in nodes:
                node.input[:] = [inner if n == out.name else n for n in node.input]
                node.output[:] = [inner if n == out.name else n for n in node.output]
            nodes.append(helper.make_node("Cast", [inner], [out.name], name=inner, to=wanted))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale types; the checker infers them again
    onnx.checker.check_model(model, full_check=True)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def onnx_constants(path: str | Path) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values of a graph by name: what the Refitter may ask for
    beside the torch weights (constants fused with a refitted weight)."""
    graph = onnx.load(str(path)).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


# --------------------------------------------------------------------------- TensorRT calls

_LOGGERS: dict[int, Any] = {}


def _tensorrt() -> Any:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as error:
        raise RuntimeError(NOT_INSTALLED) from error
    return trt


def _logger(trt: Any) -> Any:
    """One logger per process: TensorRT warns when builders and runtimes use different ones."""
    key = id(trt)
    if key not in _LOGGERS:
        _LOGGERS[key] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[key]


def _write_atomically(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, memoryview(data))


def checked_precision(precision: str) -> TrtPrecision:
    """`precision` as one TensorRT builds here (fp16 or fp32), else a ValueError."""
    if precision == Precision.FP16:
        return Precision.FP16
    if precision == Precision.FP32:
        return Precision.FP32
    raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    profile: ShapeProfile,
    precision: TrtPrecision,
    timing_cache_path: str | Path | None,
    fp32_layers: Sequence[str] = (),
) -> Path:
    """Build a refittable engine plan from the ONNX graph and write it to `plan_path`.

    fp16: FP16 kernels with the layers named by `fp32_layers` (names or prefixes of the ONNX
    nodes, which the parser keeps as layer names) forced to FP32 -- through per-layer precision
    and OBEY_PRECISION_CONSTRAINTS on TensorRT 10, through an FP16 copy of the graph
    (`mixed_precision_onnx`) built strongly typed on TensorRT 11, which removed the weak-typing
    flags. fp32: IEEE FP32 throughout (TF32 off), for parity with torch. The timing cache on disk
    is read before and written back after the build, so rebuilds after a refit-incompatible
    change (new profile, new architecture) skip most kernel timing.
    """
    if precision not in (Precision.FP16, Precision.FP32):
        raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
    trt = _tensorrt()
    logger = _logger(trt)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    weak_typing = hasattr(trt.BuilderFlag, "FP16")  # TensorRT <= 10
    parsed = onnx_path
    if precision == Precision.FP16 and not weak_typing:
        parsed = mixed_precision_onnx(
            onnx_path, plan_path.with_name(plan_path.stem + ".fp16.onnx"), fp32_layers
        )

    builder = trt.Builder(logger)
    flags = 0
    if not weak_typing and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(parsed)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {parsed}:\n{errors or '(no message)'}")

    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.REFIT)  # not REFIT_IDENTICAL: refits bring new weights
    if precision == Precision.FP32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision == Precision.FP16 and weak_typing:
        config.set_flag(trt.BuilderFlag.FP16)
        _force_fp32(trt, network, fp32_layers)
        if fp32_layers:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(INPUT, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimisation)

    cache_path = Path(timing_cache_path) if timing_cache_path else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU or TensorRT version: start from an empty one.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"TensorRT could not build an engine from {parsed} (profile {profile.as_dict()},"
            f" {precision}); the TensorRT log above says why"
        )
    if cache_path:
        _write_atomically(cache_path, config.get_timing_cache().serialize())
    _write_atomically(plan_path, serialized)
    return plan_path


def _force_fp32(trt: Any, network: Any, patterns: Sequence[str]) -> None:
    """Per-layer FP32 constraints (TensorRT 10 weak typing)."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    chosen = set(match_layers([layer.name for layer in layers], patterns))
    for layer in layers:
        if layer.name not in chosen:
            continue
        floats = [
            i
            for i in range(layer.num_outputs)
            if layer.get_output(i).dtype in (trt.float32, trt.float16)
        ]
        if not floats:
            continue  # shape or index arithmetic: no precision to choose
        layer.precision = trt.float32
        for i in floats:
            layer.set_output_type(i, trt.float32)


@dataclass
class _Slot:
    """One deserialised engine and its execution context."""

    engine: Any
    context: Any


class TensorRTRuntime:
    """TensorRT engine behind the Runtime interface, with refit-based weight swaps.

    Builds the plan (exporting the ONNX graph first) when `plan_path` does not exist. Both engines
    are refitted with `weights` at start, so they serve exactly those weights whatever the plan
    was built from. Device buffers are sized for the profile's max and allocated once; frames
    outside the profile are refused (tile them with engines._tiling). Costs: two engines' weights
    and activation memory on the GPU, and every update refits twice.
    """

    name = Backend.TENSORRT

    def __init__(
        self,
        spec: NetworkSpec,
        weights: Mapping[str, torch.Tensor],
        onnx_path: str | Path,
        plan_path: str | Path,
        profile: ShapeProfile,
        precision: TrtPrecision = Precision.FP16,
        *,
        fp32_layers: Sequence[str] = (),
        timing_cache_path: str | Path | None = None,
        device: str = "cuda",
    ) -> None:
        trt = self._trt = _tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs a CUDA GPU; none is visible to torch")
        self.spec, self.profile, self.precision = spec, profile, precision
        self.fp32_layers = tuple(fp32_layers)
        self.is_3d = isinstance(spec, Network3DSpec)
        if profile.is_3d != self.is_3d:
            raise ValueError(f"a {'3D' if self.is_3d else '2D'} network needs a matching profile")
        self.multiple = input_multiple(spec)
        # the graph's outputs (ZS-DeconvNet: denoised, deconvolved; Self-Net: restored); the
        # last is what infer returns
        self.outputs = output_names(build_network(spec))
        self.onnx_path, self.plan_path = Path(onnx_path), Path(plan_path)
        self.device = torch.device(device)
        self.weights_updates = 0
        self._update_lock = threading.Lock()  # one update at a time
        self._infer_lock = threading.Lock()  # held by an inference for its whole run

        if not self.plan_path.exists():
            if not self.onnx_path.exists():
                model = build_network(spec)
                model.load_state_dict(dict(weights))
                export_onnx(model, self.onnx_path, self.is_3d)
            cache = timing_cache_path or self.plan_path.with_suffix(".timing-cache")
            build_engine(
                self.onnx_path, self.plan_path, profile, precision, cache, self.fp32_layers
            )

        with torch.cuda.device(self.device):
            runtime = trt.Runtime(_logger(trt))
            plan = self.plan_path.read_bytes()
            slots = []
            for _ in range(2):  # active and standby
                engine = runtime.deserialize_cuda_engine(plan)
                if engine is None:
                    raise RuntimeError(
                        f"{self.plan_path} cannot be loaded by TensorRT {trt.__version__} on this"
                        " GPU: delete it so it is rebuilt"
                    )
                slots.append(_Slot(engine, engine.create_execution_context()))
            self._runtime = runtime
            self._check_engine(slots[0].engine)
            self._prepare_refit(slots[0].engine, weights)
            for slot in slots:
                self._refit(slot.engine, self._arrays(weights))
            self._slots = (slots[0], slots[1])  # (active, standby), swapped in one assignment
            self._allocate(slots[0].context)

    # -- set-up

    def _check_engine(self, engine: Any) -> None:
        trt = self._trt
        if not engine.refittable:
            raise RuntimeError(f"{self.plan_path} was built without REFIT: delete it to rebuild")
        built = tuple(tuple(shape) for shape in engine.get_tensor_profile_shape(INPUT, 0))
        wanted = (self.profile.min, self.profile.opt, self.profile.max)
        if built != wanted:
            raise ValueError(
                f"{self.plan_path} was built for profile {built}, not {wanted}: delete it or use"
                " another plan path"
            )
        for name in (INPUT, *self.outputs):
            if engine.get_tensor_dtype(name) != trt.float32:
                raise RuntimeError(f"engine tensor {name!r} is not float32")

    def _prepare_refit(self, engine: Any, weights: Mapping[str, torch.Tensor]) -> None:
        trt = self._trt
        refitter = trt.Refitter(engine, _logger(trt))
        engine_names = list(refitter.get_all_weights())
        served = inference_weights(self.spec, weights)  # what the graph holds
        self._name_map = refit_name_map(served.keys(), engine_names)
        self._dtypes: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        for engine_name in self._name_map.values():
            prototype = refitter.get_weights_prototype(engine_name)
            self._dtypes[engine_name] = np.dtype(trt.nptype(prototype.dtype))
            self._counts[engine_name] = int(prototype.size)
        self._constants: dict[str, np.ndarray] | None = None

    def _allocate(self, context: Any) -> None:
        """Device buffers for the largest batch of the profile, and the stream, once."""
        if not context.set_input_shape(INPUT, self.profile.max):
            raise RuntimeError(f"engine refuses its own max shape {self.profile.max}")
        sizes = {INPUT: math.prod(self.profile.max)}
        for name in self.outputs:
            sizes[name] = math.prod(tuple(context.get_tensor_shape(name)))
        self._buffers = {
            name: torch.empty(size, dtype=torch.float32, device=self.device)
            for name, size in sizes.items()
        }
        self._stream = torch.cuda.Stream(device=self.device)

    # -- weights

    def _arrays(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return engine_weights(state_dict, self._name_map, self._dtypes, self._counts)

    def _refit(self, engine: Any, arrays: Mapping[str, np.ndarray]) -> None:
        """Refit one engine that no inference is using (the caller guarantees it)."""
        trt = self._trt
        refitter = trt.Refitter(engine, _logger(trt))
        keep = []  # trt.Weights points into these arrays until the refit is done
        for name, array in arrays.items():
            keep.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise RuntimeError(f"TensorRT rejected new weights for {name!r} {array.shape}")
        missing = list(refitter.get_missing_weights())
        if missing:  # constants fused with a refitted weight: supply their graph values
            if self._constants is None:
                self._constants = onnx_constants(self.onnx_path)
            for name in missing:
                if name in self._constants:
                    prototype = refitter.get_weights_prototype(name)
                    array = np.ascontiguousarray(
                        self._constants[name], dtype=trt.nptype(prototype.dtype)
                    )
                    keep.append(array)
                    refitter.set_named_weights(name, trt.Weights(array))
            missing = list(refitter.get_missing_weights())
        if missing:
            raise RuntimeError(f"refit needs weights that are not available: {missing[:5]}")
        if not refitter.refit_cuda_engine():
            raise RuntimeError("TensorRT refit failed; the TensorRT log says why")

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Refit the standby engine, swap it in, then refit the engine it replaced.

        Serving never waits for a refit: inference holds only its own lock and reads the
        (active, standby) pair once per call. After the swap, the old active engine is refitted
        only once the inference that may still be running on it has finished; from then on both
        engines hold the new weights, so the next update again starts from a current standby.
        """
        self.prepare_weights(state_dict)()

    def prepare_weights(self, state_dict: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """Check `state_dict` and convert it to the engines' arrays now (any thread); the
        returned commit refits and swaps as `update_weights` says. The refits stay in the
        commit: both engines are shared by every prepared update, so a standby refitted ahead
        could be overwritten by a later preparation before this commit swaps it in."""
        arrays = self._arrays(state_dict)  # checked before any engine changes

        def commit() -> None:
            self._refit_and_swap(arrays)

        return commit

    def _refit_and_swap(self, arrays: Mapping[str, np.ndarray]) -> None:
        with self._update_lock:
            active, standby = self._slots
            with torch.cuda.device(self.device):
                self._refit(standby.engine, arrays)
                self._slots = (standby, active)  # the swap: one reference assignment
                with self._infer_lock:  # drain: no inference still runs on `active`
                    pass
                self._refit(active.engine, arrays)
            self.weights_updates += 1

    # -- serving

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = _check_batch(batch, self.multiple, self.is_3d)
        if not profile_fits(self.profile, batch.shape):
            raise ValueError(
                f"batch {batch.shape} is outside the engine profile (min {self.profile.min},"
                f" max {self.profile.max}): tile it (engines._tiling.infer_tiled with tile_px <="
                f" {min(self.profile.max[-2:])}, batch_tiles <= {self.profile.max[0]}) or pad it"
            )
        host = torch.from_numpy(batch)
        with (
            self._infer_lock,
            torch.cuda.device(self.device),
            torch.cuda.stream(self._stream),
        ):
            context = self._slots[0].context  # read once: a swap cannot split this call
            views = {INPUT: self._buffers[INPUT][: batch.size].view(batch.shape)}
            views[INPUT].copy_(host)
            if not context.set_input_shape(INPUT, batch.shape):
                raise RuntimeError(f"engine refused input shape {batch.shape}")
            for name in self.outputs:
                shape = tuple(context.get_tensor_shape(name))
                views[name] = self._buffers[name][: math.prod(shape)].view(shape)
            for name, view in views.items():
                context.set_tensor_address(name, view.data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed; the TensorRT log says why")
            self._stream.synchronize()
            return views[self.outputs[-1]].cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "precision": self.precision,
            "fp32_layers": list(self.fp32_layers),
            "profile": self.profile.as_dict(),
            "network": self.spec.kind,
            "device": torch.cuda.get_device_name(self.device),
            "tensorrt": self._trt.__version__,
            "plan": str(self.plan_path),
            "weights_updates": self.weights_updates,
        }
