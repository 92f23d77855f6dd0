"""ONNX export of the ZS-DeconvNet networks, with dynamic batch and frame size.

The graph holds no shape-dependent crop (the networks need inputs that are multiples of
`model.multiple`; padding and cropping live outside, in engines/_tiling.py), so one file serves
every frame size. Initializer names stay the torch parameter names, which is what a weights
refit (onnxruntime session rebuild, TensorRT Refitter) maps by.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from livedecon.engines._networks import Network

OPSET = 17
INPUT, DENOISED, DECONVOLVED, RESTORED = "raw", "denoised", "deconvolved", "restored"


def output_names(model: nn.Module) -> tuple[str, ...]:
    """The graph's outputs: (denoised, deconvolved) for ZS-DeconvNet; a network with one
    output (Self-Net's restorer) names it in its `output_names`."""
    return tuple(getattr(model, "output_names", (DENOISED, DECONVOLVED)))


def export_onnx(model: Network, path: str | Path, is_3d: bool = False) -> Path:
    """Write `model` (float32, eval) to `path` and check the file with onnx.checker."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = 3 if is_3d else 2  # first lateral axis
    axes_in = {0: "batch", first: "y", first + 1: "x", **({2: "z"} if is_3d else {})}
    axes_out = {**axes_in, first: "y_out", first + 1: "x_out"}
    # Big enough for every padding in the graph (Self-Net's 7x7 reflection pads need > 3).
    side = max(2 * model.multiple, 16)
    example = torch.rand((1, 1, *([4] if is_3d else []), side, side))
    model = model.float().eval()
    names = output_names(model)
    dynamic = {INPUT: axes_in, **{name: axes_in for name in names}}
    if DECONVOLVED in names:
        dynamic[DECONVOLVED] = axes_out
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; this one still exports these plain convolutional graphs exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT],
            output_names=list(names),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    import onnx  # ~1 s to import (ml_dtypes): only where a graph is written or read

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def initializer_names(path: str | Path) -> list[str]:
    """Names of the weights stored in an exported graph."""
    import onnx

    return [init.name for init in onnx.load(str(path)).graph.initializer]
