"""Runtime backends behind one interface (`Runtime`): `infer`, `prepare_weights` and
`update_weights` (weight swaps), `describe`.

`infer` takes a float32 batch in model units, (N, 1, Y, X) or (N, 1, Z, Y, X) with Y and X
multiples of the network's `multiple`, and returns the deconvolved batch on the 2x lateral
grid. Padding to the multiple and tiling of large frames live in engines/_tiling.py.

Weights are swapped whole: the new model (torch) or session (onnxruntime) is built off the
serving path and replaces the old one in a single reference assignment, so a concurrent
`infer` runs entirely on the old weights or entirely on the new ones.
"""

from __future__ import annotations

import copy
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from livedecon.engines._enums import Backend, Precision
from livedecon.engines._export import DECONVOLVED, INPUT, RESTORED, export_onnx
from livedecon.engines._networks import Network3DSpec, NetworkSpec, build_network, input_multiple
from livedecon.engines._selfnet import SelfNetSpec

if TYPE_CHECKING:
    import onnxruntime


def _served(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The output a runtime serves: ZS-DeconvNet's deconvolved image (the second of its pair),
    or a single-output network's only one (Self-Net)."""
    return output[-1] if isinstance(output, tuple) else output


class Runtime(Protocol):
    """One network on one engine, serving batches while its weights may be swapped."""

    @property
    def multiple(self) -> int:
        """What Y and X of a batch must be multiples of (pad to it: engines._tiling)."""
        ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """A float32 batch (N, 1, [Z,] Y, X) in model units, deconvolved (any thread)."""
        ...

    def prepare_weights(self, state_dict: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """Do now (any thread) what serving `state_dict` needs; the returned commit swaps."""
        ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Serve `state_dict` from the next `infer` on (prepare, then commit, at once)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend, device, precision and the like, for status replies and logs."""
        ...


def _check_batch(batch: np.ndarray, multiple: int, is_3d: bool) -> np.ndarray:
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    rank = 5 if is_3d else 4
    if batch.ndim != rank or batch.shape[1] != 1:
        layout = "(N, 1, Z, Y, X)" if is_3d else "(N, 1, Y, X)"
        raise ValueError(f"expected a batch {layout}, got shape {batch.shape}")
    if batch.shape[-1] % multiple or batch.shape[-2] % multiple:
        raise ValueError(
            f"frame {batch.shape[-2:]} is not a multiple of {multiple}: pad it (engines._tiling)"
        )
    return batch


class TorchRuntime:
    """The float32 reference, on CPU or a GPU."""

    name = Backend.TORCH

    def __init__(
        self, spec: NetworkSpec, weights: Mapping[str, torch.Tensor], device: str = "cpu"
    ) -> None:
        self.spec, self.device = spec, torch.device(device)
        self.is_3d = isinstance(spec, Network3DSpec)
        self.multiple = input_multiple(spec)
        self.model = self._build(weights)
        self.weights_updates = 0

    def _build(self, weights: Mapping[str, torch.Tensor]) -> nn.Module:
        model = build_network(self.spec)
        model.load_state_dict(dict(weights))
        return model.float().eval().to(self.device)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        model = self.model  # one reference for the whole call: a swap cannot split it
        batch = _check_batch(batch, self.multiple, self.is_3d)
        with torch.inference_mode():
            deconvolved = _served(model(torch.from_numpy(batch).to(self.device)))
        return deconvolved.float().cpu().numpy()

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.prepare_weights(state_dict)()

    def prepare_weights(self, state_dict: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """Build the new model now (any thread); the returned commit swaps it in (one
        assignment), so the caller decides which batch is the first on the new weights."""
        model = self._build(state_dict)

        def commit() -> None:
            self.model = model
            self.weights_updates += 1

        return commit

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "precision": Precision.FP32,
            "network": self.spec.kind,
            "weights_updates": self.weights_updates,
            "torch": torch.__version__,
        }


class OnnxRuntime:
    """ONNX Runtime: the embedded default on machines without a GPU; uses the CUDA or
    TensorRT execution providers when the installed onnxruntime has them and asked for."""

    name = Backend.ONNXRUNTIME

    def __init__(
        self,
        spec: NetworkSpec,
        weights: Mapping[str, torch.Tensor],
        work_dir: str | Path | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
        onnx_path: str | Path | None = None,
    ) -> None:
        """`onnx_path`: an exported graph of these weights to load (exported there if absent);
        `work_dir`: where graphs of updated weights go (default: a temporary directory)."""
        import onnxruntime as ort

        self._ort = ort
        self.spec = spec
        self.is_3d = isinstance(spec, Network3DSpec)
        # Default: CUDA when this onnxruntime build has it, CPU always. The TensorRT provider
        # builds its engines on first use (minutes); it is taken only when asked for.
        self.providers = providers or [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        missing = set(self.providers) - set(ort.get_available_providers())
        if missing:
            raise RuntimeError(
                f"onnxruntime lacks {sorted(missing)}; it has {ort.get_available_providers()}"
            )
        self.threads = threads
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if not work_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="livedecon-onnx-")
            work_dir = self._tmp.name
        self.work_dir = Path(work_dir)
        self._lock = threading.Lock()  # one update at a time; inference never takes it
        self.weights_updates = 0
        self._prepared = 0
        self.multiple = input_multiple(spec)
        self.output = RESTORED if isinstance(spec, SelfNetSpec) else DECONVOLVED
        path = Path(onnx_path) if onnx_path else self.work_dir / "model.onnx"
        if not path.is_file():
            self._export(weights, path)
        self.session = self._load(path)

    def _export(self, weights: Mapping[str, torch.Tensor], path: Path) -> None:
        model = build_network(self.spec)
        model.load_state_dict(dict(weights))
        export_onnx(model, path, self.is_3d)

    def _load(self, path: Path) -> onnxruntime.InferenceSession:
        options = self._ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        return self._ort.InferenceSession(str(path), options, providers=self.providers)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        session = self.session
        batch = _check_batch(batch, self.multiple, self.is_3d)
        return session.run([self.output], {INPUT: batch})[0]

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Export and load a new session beside the serving one, then swap."""
        self.prepare_weights(state_dict)()

    def prepare_weights(self, state_dict: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """Export and load a new session now (any thread); the returned commit swaps it in."""
        with self._lock:
            self._prepared += 1
            path = self.work_dir / f"model-v{self._prepared}.onnx"
            self._export(copy.deepcopy(dict(state_dict)), path)
            session = self._load(path)

        def commit() -> None:
            self.session = session
            self.weights_updates += 1

        return commit

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "providers": self.session.get_providers(),
            "precision": Precision.FP32,
            "network": self.spec.kind,
            "weights_updates": self.weights_updates,
            "onnxruntime": self._ort.__version__,
        }


class TorchCudaRuntime(TorchRuntime):
    """PyTorch on a CUDA GPU in half precision, optionally compiled (torch.compile)."""

    name = Backend.TORCH_CUDA

    def __init__(
        self,
        spec: NetworkSpec,
        weights: Mapping[str, torch.Tensor],
        precision: Precision = Precision.FP16,
        compile_model: bool = True,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("torch-cuda needs a CUDA GPU, and torch sees none")
        dtypes = {
            Precision.FP16: torch.float16,
            Precision.BF16: torch.bfloat16,
            Precision.FP32: torch.float32,
        }
        if precision not in dtypes:
            raise ValueError(f"precision must be fp16, bf16 or fp32, got {precision!r}")
        self.precision = precision
        self.dtype = dtypes[precision]
        self.compile_model = compile_model
        super().__init__(spec, weights, device="cuda")

    def _build(self, weights: Mapping[str, torch.Tensor]) -> nn.Module:
        model = super()._build(weights).to(self.dtype)
        if not self.compile_model:
            return model
        # For a module torch.compile returns an OptimizedModule (an nn.Module); its annotation
        # only says "a callable like the one given".
        return cast(nn.Module, torch.compile(model, dynamic=True))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        model = self.model
        batch = _check_batch(batch, self.multiple, self.is_3d)
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True).to(self.dtype)
            deconvolved = _served(model(x))
        return deconvolved.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "device": torch.cuda.get_device_name(),
            "precision": self.precision,
            "compiled": self.compile_model,
        }
