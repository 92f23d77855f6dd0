"""The closed sets of names that configs, the command line and the code share, one StrEnum each.

A member is its string: it equals it, formats, serialises (JSON, TOML) and reads as it, so
files and options spell these names as they always did.
"""

from __future__ import annotations

from enum import StrEnum


class _Name(StrEnum):
    def __repr__(self) -> str:
        # as the plain string: messages that quote a name (pydantic's among them) stay the same
        return repr(self.value)


class Backend(_Name):
    """An inference engine (engines/_backends.py); AUTO asks for the fastest one present."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    TORCH_CUDA = "torch-cuda"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"


class Precision(_Name):
    """The floating-point format a runtime computes in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class NetworkKind(_Name):
    """A network spec's `kind`, the discriminator in model.json and training configs."""

    ZS_DECONVNET_2D = "zs-deconvnet-2d"
    ZS_DECONVNET_2D_FAST = "zs-deconvnet-2d-fast"
    ZS_DECONVNET_3D = "zs-deconvnet-3d"
    SELFNET = "selfnet"
    SELFNET_FAST = "selfnet-fast"
    DPS = "dps"
