"""Model bundles: one directory holding everything needed to run (and trust) a trained model.

    <name>/model.json          manifest: architecture, pixel sizes, normalisation, provenance
    <name>/weights.safetensors the state dict
    <name>/psf.tif             the PSF on the output grid (float32, sum 1), pixel size in OME
    <name>/cache/              compiled artifacts (ONNX, TensorRT plans), keyed elsewhere

A bundle is checked as a whole when it is made or loaded (weights hash, weights against the
architecture, PSF), so a corrupted or mismatched bundle fails at load with one clear error,
never later inside a runtime.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import numpy as np
import safetensors.torch
import tifffile
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from livedecon.engines._atomic_write import fsync_path, fsync_tree
from livedecon.engines._configfile import StrictModel, describe_validation_error
from livedecon.engines._enums import NetworkKind
from livedecon.engines._networks import (
    DpsSpec,
    Network,
    Network2DSpec,
    Network3DSpec,
    NetworkSpec,
    build_network,
    serves_denoised,
)
from livedecon.engines._ome_tiff import write_ome_tiff
from livedecon.engines._refinement import MAX_ITERATIONS as MAX_REFINE_ITERATIONS
from livedecon.engines._refinement import finish
from livedecon.engines._selfnet import SelfNetSpec
from livedecon.engines._sim import SimSettings

BUNDLE_FORMAT = 1
MANIFEST = "model.json"
WEIGHTS = "weights.safetensors"
PSF = "psf.tif"
CACHE = "cache"
REQUIRED_FILES = (MANIFEST, WEIGHTS, PSF)
PSF_SUM_TOLERANCE = 1e-3
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # no '@' (used in bundle_id), no '/'

PositiveFloat = Annotated[float, Field(gt=0)]


class BundleError(Exception):
    """A bundle that cannot be used; the message names the bundle and the problem."""

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem or message


class _Manifest(StrictModel):
    # NaN/inf would be written to JSON as null and not read back as the same value.
    model_config = ConfigDict(allow_inf_nan=False)


class Normalisation(_Manifest):
    """How raw camera counts become model units: ((counts - offset) * gain - background) / scale."""

    scale_e: PositiveFloat = Field(description="photoelectrons per model unit")
    background_e: float = Field(
        0.0, ge=0, description="photoelectrons per raw pixel subtracted before scaling"
    )
    camera_offset_adu: float = Field(description="camera offset the model was trained with")
    camera_gain_e_per_adu: PositiveFloat = Field(
        description="camera gain the model was trained with; used when no calibration is given"
    )
    read_noise_e: Annotated[float, Field(ge=0)] | None

    def electrons(self, counts: np.ndarray) -> np.ndarray:
        """Raw camera counts as photoelectrons above the model's background (float32)."""
        counts = np.asarray(counts, dtype=np.float32)
        return (counts - self.camera_offset_adu) * self.camera_gain_e_per_adu - self.background_e


class PSFRecord(_Manifest):
    """The PSF a model was trained with: its source, description and sampling."""

    source: Literal["theoretical", "file", "none"] = Field(
        description="'none': the model needs no PSF (Self-Net learns the axial blur from the"
        " data); psf.tif then holds a single-voxel delta"
    )
    description: str = Field(description="optics summary, or the path of the measured PSF")
    source_sha256: str | None = None
    pixel_size_um: PositiveFloat = Field(description="pixel size of psf.tif (the output grid)")
    z_step_um: PositiveFloat | None = None


def _livedecon_version() -> str:
    try:
        return importlib.metadata.version("livedecon")
    except importlib.metadata.PackageNotFoundError:  # running from a bare source tree
        return "unknown"


class TrainingRecord(_Manifest):
    """Provenance of a bundle's weights: when, with which versions, data and config, and how far
    training got."""

    created_utc: str = Field(description="ISO 8601, UTC")
    livedecon_version: str
    torch_version: str
    data: list[str] = Field(description="training data: file path + sha256, or 'simulated: ...'")
    config: dict[str, Any] = Field(description="the training config as it was run")
    iterations: int = Field(ge=0)
    final_loss: float | None
    interrupted: bool = False
    parent: str | None = Field(None, description="bundle_id of the bundle it was tuned from")

    @classmethod
    def now(
        cls,
        *,
        data: Sequence[str],
        config: BaseModel | Mapping[str, Any],
        iterations: int,
        final_loss: float | None = None,
        interrupted: bool = False,
        parent: str | None = None,
    ) -> TrainingRecord:
        """A record stamped with the current UTC time and the running livedecon/torch versions."""
        if isinstance(config, BaseModel):
            config = config.model_dump(mode="json")
        return cls(
            created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
            livedecon_version=_livedecon_version(),
            torch_version=torch.__version__,
            data=list(data),
            config=dict(config),
            iterations=iterations,
            final_loss=final_loss,
            interrupted=interrupted,
            parent=parent,
        )


class SimRecord(_Manifest):
    """What a SIM model (ZS-DeconvNet-SIM, DPS) restores: SR-SIM images in photoelectrons
    per output pixel, made by the generalised Wiener reconstruction with these settings (the
    Wiener constant fixed) from raw frames of this detection; the network learned that
    reconstruction's noise and PSF, so it is fed the same one."""

    reconstruction: SimSettings = Field(description="the reconstruction it was trained behind")
    na: PositiveFloat = Field(description="detection NA of the training acquisition")
    emission_um: PositiveFloat
    sample_ri: PositiveFloat

    @model_validator(mode="after")
    def _fixed_wiener(self) -> Self:
        if self.reconstruction.wiener is None:
            raise ValueError("a SIM model's reconstruction needs its Wiener constant fixed")
        return self


class BundleManifest(_Manifest):
    """model.json: a bundle's network, sampling, normalisation, PSF, training record and weights
    hash."""

    format: int = BUNDLE_FORMAT
    name: str = Field(pattern=NAME_PATTERN, description="also the bundle's directory name")
    network: Annotated[
        Network2DSpec | Network3DSpec | SelfNetSpec | DpsSpec, Field(discriminator="kind")
    ]
    input_pixel_um: PositiveFloat
    output_pixel_um: PositiveFloat
    z_step_um: PositiveFloat | None = Field(description="3D and volume models only")
    output_z_step_um: PositiveFloat | None = Field(
        None, description="volume models that resample z (Self-Net: the lateral pixel)"
    )
    normalisation: Normalisation
    psf: PSFRecord
    training: TrainingRecord
    sim: SimRecord | None = Field(
        None, description="SIM models only: the reconstruction whose SR images they restore"
    )
    refine_iterations: int = Field(
        0,
        ge=0,
        le=MAX_REFINE_ITERATIONS,
        description="Richardson-Lucy steps after the network (engines/_refinement.py). 2D"
        " models: against the frame, so dim structure the network dropped comes back. 3D"
        " models that serve their denoised stack: its deconvolution. 0: none",
    )
    weights_version: int = Field(1, ge=1, description="bumped by every weights update")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def bundle_id(self) -> str:
        return f"{self.name}@{self.weights_sha256[:12]}"

    @property
    def is_3d(self) -> bool:
        """A network on (Z, Y, X) stacks (ZS-DeconvNet 3D)."""
        return isinstance(self.network, Network3DSpec)

    @property
    def is_selfnet(self) -> bool:
        """A Self-Net restorer: a 2D network on the axial slices of a volume."""
        return isinstance(self.network, SelfNetSpec)

    @property
    def is_sim(self) -> bool:
        """A network on SR-SIM images (its input grid is the reconstruction's, half the
        camera pixel)."""
        return self.sim is not None

    @property
    def camera_pixel_um(self) -> float:
        """The raw frames' pixel: a SIM model's input is the SR grid, twice as fine."""
        return self.input_pixel_um * (2 if self.is_sim else 1)

    @property
    def serves_denoised(self) -> bool:
        """A 3D network whose runtime output is its denoised stack, which Richardson-Lucy
        deconvolves (`refine_iterations` steps)."""
        return serves_denoised(self.network)

    @property
    def finishing(self) -> str:
        """What runs after the network, for provenance (the bundle id names the weights only,
        and `restore --refine` may change the steps): "" or e.g. "2 Richardson-Lucy steps on
        its denoised stack"."""
        steps = self.refine_iterations
        if not steps:
            return ""
        on = "its denoised stack" if self.serves_denoised else "the frame"
        return f"{steps} Richardson-Lucy step{'s' if steps > 1 else ''} on {on}"

    @property
    def takes_volumes(self) -> bool:
        return self.is_3d or self.is_selfnet

    @model_validator(mode="before")
    @classmethod
    def _dps_activation_of_its_time(cls, data: Any) -> Any:
        # DPS bundles written before DpsSpec.output_activation existed ran softplus
        network = data.get("network") if isinstance(data, dict) else None
        if isinstance(network, dict) and network.get("kind") == NetworkKind.DPS:
            data = {**data, "network": {"output_activation": "softplus", **network}}
        return data

    @model_validator(mode="after")
    def _grids_agree(self) -> Self:
        # The runtimes trust these numbers to place the output; disagreement is a bug upstream.
        if self.is_sim and (self.network.upsample or self.takes_volumes):
            raise ValueError("a SIM model is 2D on the SR grid: no upsampling, no volumes")
        upscale = 2 if self.network.upsample else 1
        if not math.isclose(self.output_pixel_um * upscale, self.input_pixel_um, rel_tol=1e-9):
            raise ValueError(
                f"output_pixel_um {self.output_pixel_um} must be input_pixel_um"
                f" {self.input_pixel_um} / {upscale}"
            )
        if not math.isclose(self.psf.pixel_size_um, self.output_pixel_um, rel_tol=1e-6):
            raise ValueError(
                f"psf.pixel_size_um {self.psf.pixel_size_um} must equal output_pixel_um"
                f" {self.output_pixel_um} (the PSF lives on the output grid)"
            )
        if self.refine_iterations and (self.is_selfnet or self.is_sim):
            raise ValueError("refine_iterations is for ZS-DeconvNet models of camera frames")
        if self.is_3d and self.serves_denoised != bool(self.refine_iterations):
            raise ValueError(
                "a 3D model serves its denoised stack (network.serve = 'denoised') exactly when"
                " Richardson-Lucy deconvolves it (refine_iterations > 0)"
            )
        if self.is_selfnet:
            self._selfnet_grids()
        elif self.output_z_step_um is not None:
            raise ValueError("only Self-Net models have output_z_step_um")
        elif self.is_3d:
            if self.z_step_um is None or self.psf.z_step_um is None:
                raise ValueError("a 3D model needs z_step_um and psf.z_step_um")
            if not math.isclose(self.psf.z_step_um, self.z_step_um, rel_tol=1e-6):
                raise ValueError(
                    f"psf.z_step_um {self.psf.z_step_um} must equal z_step_um {self.z_step_um}"
                )
        elif self.z_step_um is not None:
            raise ValueError("a 2D model has no z_step_um")
        return self

    def _selfnet_grids(self) -> None:
        if self.z_step_um is None or self.output_z_step_um is None:
            raise ValueError("a Self-Net model needs z_step_um and output_z_step_um")
        if not math.isclose(self.output_z_step_um, self.output_pixel_um, rel_tol=1e-9):
            raise ValueError(
                f"output_z_step_um {self.output_z_step_um} must equal output_pixel_um"
                f" {self.output_pixel_um}: Self-Net's output is isotropic"
            )
        if self.z_step_um <= self.input_pixel_um:
            raise ValueError(
                f"z_step_um {self.z_step_um} must be coarser than input_pixel_um"
                f" {self.input_pixel_um} for Self-Net"
            )


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hash of the tensors themselves (sorted names, dtype, shape, bytes), independent of the
    file format, so the same weights always have the same id."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)]) + "\n"
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stored(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Clones: the bundle must not change when the live model it came from keeps training.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}


def _architecture_problem(spec: NetworkSpec, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {k: tuple(v.shape) for k, v in build_network(spec).state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in sorted(expected.keys() & state_dict.keys())
        if tuple(state_dict[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return None

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

    parts = [
        f"{label}: {few(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
        if items
    ]
    return f"weights do not fit the {spec.kind} architecture in model.json ({'; '.join(parts)})"


def _psf_problem(psf: np.ndarray, manifest: BundleManifest) -> str | None:
    ndim = 3 if manifest.takes_volumes else 2
    if psf.ndim != ndim:
        return f"PSF has {psf.ndim} dimensions, the {manifest.network.kind} model needs {ndim}"
    if any(n % 2 == 0 for n in psf.shape):
        return f"PSF shape {psf.shape} must be odd in every axis (centred on a pixel)"
    if not np.all(np.isfinite(psf)):
        return "PSF holds NaN or infinite values"
    total = float(psf.sum(dtype=np.float64))
    if abs(total - 1) > PSF_SUM_TOLERANCE:
        return f"PSF sums to {total:.6g}, not 1"
    return None


def _problem(
    manifest: BundleManifest, state_dict: Mapping[str, torch.Tensor], psf: np.ndarray
) -> str | None:
    actual = weights_sha256(state_dict)
    if actual != manifest.weights_sha256:
        return (
            f"weights hash {actual[:12]}... does not match model.json"
            f" ({manifest.weights_sha256[:12]}...): weights corrupted or edited"
        )
    return _architecture_problem(manifest.network, state_dict) or _psf_problem(psf, manifest)


@dataclass(frozen=True, eq=False)  # eq would compare tensors with ==, which is ambiguous
class ModelBundle:
    """A trained model with its manifest and PSF; always self-consistent once constructed."""

    manifest: BundleManifest
    state_dict: dict[str, torch.Tensor]
    psf: np.ndarray

    def __post_init__(self) -> None:
        psf = np.array(self.psf, dtype=np.float32)  # a private, read-only copy
        psf.setflags(write=False)
        object.__setattr__(self, "psf", psf)
        object.__setattr__(self, "state_dict", dict(self.state_dict))
        problem = _problem(self.manifest, self.state_dict, psf)
        if problem:
            raise BundleError(f"bundle {self.manifest.name!r}: {problem}", problem)

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @cached_property  # the PSF is frozen; restoring reads this on every batch
    def flux_share(self) -> float:
        """The network's output times this is photons per output voxel of its own plane.

        The training PSF sums to 1 over its volume, so in 3D its in-focus plane holds only a
        share of a point's light (about 1/8 for 9 widefield planes), where a real focal plane
        receives all of it; the network's estimate comes out larger by the inverse. In 2D the
        share is 1."""
        return float(self.psf[self.psf.shape[0] // 2].sum()) if self.psf.ndim == 3 else 1.0

    def refine(self, estimate: np.ndarray, electrons: np.ndarray) -> np.ndarray:
        """The runtime's output finished with `refine_iterations` Richardson-Lucy steps through
        this bundle's PSF. 2D: against its own photons `electrons` (the network's input), with
        the camera's read noise and the removed background in the model. 3D: the served
        denoised stack deconvolved. Unchanged where the bundle asks for none."""
        manifest = self.manifest
        if manifest.refine_iterations == 0:
            return estimate
        norm = manifest.normalisation
        return finish(
            estimate,
            electrons,
            self.psf,
            manifest.refine_iterations,
            norm.read_noise_e or 0.0,
            norm.background_e,
            manifest.serves_denoised,
        )

    def build_model(self, device: torch.device | str = "cpu") -> Network:
        """A fresh float32 network in eval mode holding these weights."""
        model = build_network(self.manifest.network)
        model.load_state_dict(self.state_dict, strict=True)
        return model.float().eval().to(device)

    @classmethod
    def from_model(
        cls,
        model: Network,
        *,
        name: str,
        network: NetworkSpec | None = None,
        input_pixel_um: float,
        z_step_um: float | None = None,
        normalisation: Normalisation,
        psf: np.ndarray,
        psf_record: PSFRecord,
        training: TrainingRecord,
        sim: SimRecord | None = None,
        refine_iterations: int = 0,
    ) -> ModelBundle:
        """Bundle a trained network; `network` defaults to the model's own `spec`. A Self-Net
        model's output is isotropic: its output z step is the lateral pixel. `sim`: a network
        on SR-SIM images, and the reconstruction it was trained behind. `refine_iterations`:
        Richardson-Lucy steps after the network when it restores (2D models)."""
        spec = network if network is not None else model.spec
        state = _stored(model.state_dict())
        manifest = _validated(
            name=name,
            network=spec,
            input_pixel_um=input_pixel_um,
            output_pixel_um=input_pixel_um / (2 if spec.upsample else 1),
            z_step_um=z_step_um,
            output_z_step_um=input_pixel_um if isinstance(spec, SelfNetSpec) else None,
            normalisation=normalisation,
            psf=psf_record,
            training=training,
            sim=sim,
            refine_iterations=refine_iterations,
            weights_sha256=weights_sha256(state),
        )
        return cls(manifest, state, psf)

    def with_weights(
        self, state_dict: Mapping[str, torch.Tensor], training: TrainingRecord | None = None
    ) -> ModelBundle:
        """The same bundle with new weights (test-time adaptation, fine-tuning): the version is
        bumped and the id changes. A new training record gets this bundle as its parent."""
        state = _stored(state_dict)
        update: dict[str, Any] = {
            "weights_version": self.manifest.weights_version + 1,
            "weights_sha256": weights_sha256(state),
        }
        if training is not None:
            if training.parent is None:
                training = training.model_copy(update={"parent": self.bundle_id})
            update["training"] = training
        manifest = _validated(**{**self.manifest.model_dump(), **update})
        return ModelBundle(manifest, state, self.psf)

    def with_refinement(self, iterations: int) -> ModelBundle:
        """The same weights finishing their restorations with `iterations` Richardson-Lucy
        steps; 0: the network alone. A 3D bundle then serves its denoised stack for them to
        deconvolve, or with 0 its deconvolution stage (the same weights hold both). Refused
        for Self-Net and SIM models."""
        update: dict[str, Any] = {"refine_iterations": iterations}
        if isinstance(self.manifest.network, Network3DSpec):
            serve = "denoised" if iterations else "deconvolved"
            update["network"] = self.manifest.network.model_copy(update={"serve": serve})
        manifest = _validated(**{**self.manifest.model_dump(), **update})
        return ModelBundle(manifest, self.state_dict, self.psf)

    def network_alone(self) -> ModelBundle:
        """The same weights serving the network's own estimate: a 3D bundle's deconvolution
        stage in place of its denoised stack and Richardson-Lucy; otherwise this bundle."""
        return self.with_refinement(0) if self.manifest.serves_denoised else self

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the bundle to `directory` (the bundle itself, not its parent) and return it.

        Files go to a hidden sibling first and are renamed into place, so a crash never leaves
        a half-written bundle under the final name. An existing bundle is replaced only with
        `overwrite`, and only if it is a bundle (never an arbitrary directory).
        """
        target = Path(directory)
        if target.exists():
            if not overwrite:
                raise BundleError(f"{target}: already exists (pass overwrite=True to replace it)")
            if not target.is_dir() or not (
                (target / MANIFEST).is_file() or not any(target.iterdir())
            ):
                raise BundleError(f"{target}: exists and is not a bundle; refusing to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
        staging.mkdir()  # not mkdtemp: that makes it private (0700) whatever the umask
        try:
            self._write(staging)
            fsync_tree(staging)  # whole on disk before the rename publishes it
            if target.exists():
                old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
                target.rename(old)
                try:
                    staging.rename(target)
                except BaseException:
                    old.rename(target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_path(target.parent)
        return target

    def _write(self, directory: Path) -> None:
        (directory / CACHE).mkdir()
        (directory / MANIFEST).write_text(self.manifest.model_dump_json(indent=2) + "\n")
        safetensors.torch.save_file(self.state_dict, directory / WEIGHTS)
        record = self.manifest.psf
        is_3d = self.psf.ndim == 3
        axes, z_step = ("ZYX", record.z_step_um) if is_3d else ("YX", None)
        write_ome_tiff(directory / PSF, self.psf, axes, record.pixel_size_um, z_step)
        for name in REQUIRED_FILES:  # on disk before the rename that publishes the bundle
            (directory / name).chmod(0o644)  # safetensors writes owner-only; bundles are shared
            fsync_path(directory / name)
        fsync_path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> ModelBundle:
        """Read and check a bundle; every problem is a BundleError naming the directory."""
        directory = Path(directory)
        if not directory.is_dir():
            raise BundleError(f"{directory}: bundle directory not found")
        for name in REQUIRED_FILES:
            if not (directory / name).is_file():
                raise BundleError(f"{directory}: bundle is missing {name}")
        manifest = _read_manifest(directory)
        try:
            state = safetensors.torch.load_file(directory / WEIGHTS)
        except Exception as exc:  # safetensors raises its own, unexported, error types
            raise BundleError(f"{directory}: cannot read {WEIGHTS}: {exc}") from None
        try:
            psf = tifffile.imread(directory / PSF)
        except Exception as exc:  # tifffile raises many types for damaged files
            raise BundleError(f"{directory}: cannot read {PSF}: {exc}") from None
        if manifest.takes_volumes and 0 < psf.ndim < 3:  # TIFF readers drop singleton axes
            psf = psf.reshape((1,) * (3 - psf.ndim) + psf.shape)
        try:
            return cls(manifest, state, psf)  # checks weights hash, architecture, PSF once
        except BundleError as exc:
            raise BundleError(f"{directory}: {exc.problem}", exc.problem) from None


def _validated(**fields: Any) -> BundleManifest:
    try:
        return BundleManifest(**fields)
    except ValidationError as exc:
        raise BundleError(
            f"bundle {fields.get('name')!r}: invalid manifest: {describe_validation_error(exc)}"
        ) from None


def _read_manifest(directory: Path) -> BundleManifest:
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{directory}: {MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{directory}: {MANIFEST} must hold a JSON object")
    # Checked before validation: a newer format should say so, not list unknown fields.
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{directory}: bundle format {data.get('format')!r} is not supported"
            f" (this livedecon reads format {BUNDLE_FORMAT})"
        )
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(
            f"{directory}: invalid {MANIFEST}: {describe_validation_error(exc)}"
        ) from None


def _shipped_root() -> Path:
    return Path(str(resources.files("livedecon.engines") / "bundles"))


def shipped_bundle_path(name: str) -> Path:
    """Directory of a bundle shipped with livedecon (engines/bundles/<name>)."""
    root = _shipped_root()
    path = root / name
    if re.fullmatch(NAME_PATTERN, name) and (path / MANIFEST).is_file():
        return path
    available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    raise BundleError(
        f"no shipped bundle named {name!r}; available: {', '.join(available) or 'none'}"
    )


def find_bundle(name_or_path: str | Path) -> Path:
    """A bundle directory given as a path, or the name of a shipped bundle."""
    path = Path(name_or_path)
    if path.exists() or len(path.parts) > 1:
        return path  # a path: load() reports it if it is not a bundle
    return shipped_bundle_path(str(name_or_path))
