"""bioimage.io model packages (spec 0.5) from model bundles, and bundles back from them.

bioimageio.spec (the `bioimageio` extra) is imported only to write a package; reading the
bundle back out of one needs nothing beyond the standard library.

A package written here is a zip that any bioimage.io consumer (bioimageio.core, deepImageJ,
JDLL, ilastik) runs without livedecon:

    rdf.yaml                      the model description (built with bioimageio.spec's models)
    weights.onnx                  the network, opset 17, dynamic batch and frame size
    weights.torchscript.pt        the same network traced to TorchScript
    test_input.npy                raw camera counts (float32), (batch, channel, [z,] y, x)
    test_output_denoised.npy      what livedecon itself computes for them (torch float32)
    test_output_deconvolved.npy
    cover.png                     raw (left, 2x nearest) beside the restoration (right)
    README.md                     normalisation, PSF and training provenance, validation
    model.json, weights.safetensors, psf.tif
                                  the livedecon bundle itself, as attachments, so that
                                  `livedecon restore PACKAGE.zip ...` runs exactly the bundle

Inputs are raw camera counts; pre-processing turns them into model units with one
scale_linear, the bundle's fixed photon normalisation ((counts - offset) * gain - background)
/ scale_e, never a per-image min-max. Both network outputs are described: `deconvolved`
(the restoration: denoised, deconvolved, on the 2x lateral grid) and `denoised` (on the input
grid). Post-processing turns model units into photoelectrons per output pixel, the units
`livedecon restore` writes: the deconvolved image holds a 1/4 share of an input pixel's
photons per output pixel (flux is kept across the 2x grid).

Self-Net bundles are refused: Self-Net restores the axial slices of a resampled volume, a
procedure the model spec cannot describe.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
import torch

from livedecon.engines._atomic_write import replace_atomically
from livedecon.engines._backends import gate_input
from livedecon.engines._bundle import (
    MANIFEST,
    PSF,
    WEIGHTS,
    BundleError,
    BundleManifest,
    ModelBundle,
    Normalisation,
)
from livedecon.engines._export import DECONVOLVED, DENOISED, OPSET, export_onnx
from livedecon.engines._networks import input_multiple
from livedecon.engines._tiling import restore_electrons

if TYPE_CHECKING:  # bioimageio.spec (the `bioimageio` extra) is imported to write a package only
    from bioimageio.spec.model import v0_5

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
INPUT_ID = "raw"
CITATION_TEXT = (
    "Qiao, C., Zeng, Y., Meng, Q. et al. Zero-shot learning enables instant denoising and"
    " super-resolution in optical fluorescence microscopy. Nat Commun 15, 4180 (2024)."
)
CITATION_DOI = "10.1038/s41467-024-48575-9"
# The test tensors: small, so `bioimageio test` stays quick on a CPU.
TEST_SIZE_2D = 64
TEST_SIZE_3D = (8, 32, 32)
# The smallest stack the 3D package declares (RCAN has no pooling: any size from there on).
MIN_DEPTH_3D, MIN_LATERAL_3D = 2, 16


@dataclass(frozen=True)
class PackageReport:
    """A package written: its path, outputs, test input shape and weights formats."""

    path: Path
    outputs: tuple[str, ...]
    test_input_shape: tuple[int, ...]
    weights_formats: tuple[str, ...]


def _nm(um: float) -> float:
    """A pixel size in nanometres rounded to 1/64 nm: a dyadic value, so the spec's output size
    `int(size * scale_in / scale_out)` is exact for the 2x grid (65 nm and 92.5 nm are already
    dyadic; the rounding never exceeds 0.008 nm)."""
    return round(um * 1000 * 64) / 64


def synthetic_counts(bundle: ModelBundle, shape: tuple[int, ...], seed: int = 7) -> np.ndarray:
    """A specimen-like image in raw camera counts for the bundle's camera: sparse blobs with
    shot noise (the accuracy gate's input), at the photon level the model was trained for."""
    m = bundle.manifest
    size = shape[-1]
    units = gate_input(m.is_3d, 1, size=size, seed=seed)[0, 0]
    if m.is_3d:
        units = np.resize(units, shape)  # gate_input's stacks have 8 planes
    norm = m.normalisation
    electrons = units * norm.scale_e + norm.background_e
    return (electrons / norm.camera_gain_e_per_adu + norm.camera_offset_adu).astype(np.float32)


def _centre_crop(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    slices = tuple(
        slice(max((n - s) // 2, 0), max((n - s) // 2, 0) + s)
        for n, s in zip(image.shape, shape, strict=True)
    )
    return image[slices]


def _test_shape(bundle: ModelBundle, sample: np.ndarray) -> tuple[int, ...]:
    multiple = input_multiple(bundle.manifest.network)
    if bundle.manifest.is_3d:
        shape = tuple(min(n, s) for n, s in zip(TEST_SIZE_3D, sample.shape, strict=True))
        if shape[0] < MIN_DEPTH_3D or min(shape[1:]) < MIN_LATERAL_3D:
            raise ValueError(
                f"sample {sample.shape} is too small: the test tensor needs at least"
                f" {MIN_DEPTH_3D} planes of {MIN_LATERAL_3D} x {MIN_LATERAL_3D} pixels"
            )
        return shape
    lateral = [min(TEST_SIZE_2D, n) // multiple * multiple for n in sample.shape]
    if min(lateral) < 2 * multiple:
        raise ValueError(
            f"sample {sample.shape} is too small: the test tensor needs at least"
            f" {2 * multiple} x {2 * multiple} pixels"
        )
    return tuple(lateral)


def _network_outputs(bundle: ModelBundle, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(denoised, deconvolved) in photoelectrons, as livedecon computes them (torch float32),
    for one image whose lateral size is a multiple of the network's."""
    m = bundle.manifest
    norm = m.normalisation
    units = norm.electrons(counts) / norm.scale_e
    model = bundle.build_model()
    with torch.inference_mode():
        denoised, deconvolved = model(torch.from_numpy(np.ascontiguousarray(units[None, None])))
    upscale = 2 if m.network.upsample else 1
    return (
        denoised.numpy()[0, 0] * norm.scale_e,
        deconvolved.numpy()[0, 0] * (norm.scale_e * bundle.flux_share / (upscale * upscale)),
    )


def _cover(bundle: ModelBundle, sample: np.ndarray, path: Path) -> None:
    """Raw (2x nearest) beside the restoration, each at its own display range (display only:
    the data are never rescaled); 2:1, as bioimage.io asks. Volumes: maximum projections."""
    from matplotlib import colormaps
    from matplotlib.image import imsave

    from livedecon.engines._runtime import TorchRuntime

    m = bundle.manifest
    norm = m.normalisation
    sample = sample[..., :256, :256]
    runtime = TorchRuntime(m.network, bundle.state_dict)
    upscale = 2 if m.network.upsample else 1
    restored = restore_electrons(
        runtime.infer, norm.electrons(sample), norm.scale_e, runtime.multiple, upscale
    )
    raw = norm.electrons(sample)
    if m.is_3d:
        raw, restored = raw.max(axis=0), restored.max(axis=0)
    raw = np.repeat(np.repeat(raw, upscale, axis=0), upscale, axis=1)

    def display(image: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(image, (0.5, 99.8))
        return np.clip((image - lo) / max(hi - lo, 1e-9), 0, 1)

    gap = np.ones((raw.shape[0], max(raw.shape[1] // 64, 2)))
    panel = np.concatenate([display(raw), gap, display(restored)], axis=1)
    imsave(path, colormaps["magma"](panel)[..., :3])


def _torchscript(bundle: ModelBundle, example: torch.Tensor, path: Path) -> None:
    """Trace the network and check the trace on a second, differently shaped input (the
    traced graph must not have frozen the frame size or depth)."""
    model = bundle.build_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    multiple = input_multiple(bundle.manifest.network)
    other_shape = list(example.shape)
    other_shape[-1] += multiple
    other_shape[-2] += 2 * multiple
    if bundle.manifest.is_3d:
        other_shape[2] += 1
    other = torch.rand(other_shape)
    with torch.inference_mode():
        for got, want in zip(traced(other), model(other), strict=True):
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                raise RuntimeError("the TorchScript trace does not generalise to other shapes")
    traced.save(str(path))


def _readme(bundle: ModelBundle, outputs_doc: str, preprocessing: tuple[float, float]) -> str:
    m = bundle.manifest
    n, p, t = m.normalisation, m.psf, m.training
    gain, offset = preprocessing
    upscale = 2 if m.network.upsample else 1
    dims = "3D (z-stacks)" if m.is_3d else "2D (frames)"
    z_psf = f", z step {p.z_step_um} um" if p.z_step_um else ""
    psf_sha = f"; source sha256 {p.source_sha256}" if p.source_sha256 else ""
    z_line = f"- z step: {m.z_step_um} um (input and output)\n" if m.is_3d else ""
    share, share_why = "", ""
    if m.is_3d:
        share = f" x {bundle.flux_share:.6g}"
        share_why = (
            "; in 3D each plane holds its own slab's photons: the PSF, normalised over its"
            " volume, holds that share of a point's light in its in-focus plane"
        )
    return f"""# {m.name}: ZS-DeconvNet ({m.network.kind}), exported by livedecon

Self-supervised denoising, deconvolution and {upscale}x lateral super-resolution of {dims}
widefield fluorescence images, trained zero-shot on the microscope's own noisy data
(ZS-DeconvNet, Qiao et al., Nat Commun 15:4180, 2024, doi:{CITATION_DOI}).
Bundle id `{m.bundle_id}`, weights version {m.weights_version}.

## Inputs and outputs

- input `{INPUT_ID}`: raw camera counts (ADU, any dtype; cast to float32), axes
  batch, channel, {"z, " if m.is_3d else ""}y, x, pixel {m.input_pixel_um} um.
  y and x must be multiples of {input_multiple(m.network)} (pad by reflection beyond that).
{z_line}{outputs_doc}

## Photon normalisation (fixed, never per image)

The model was trained in fixed units of photoelectrons, so intensities stay comparable across
a time-lapse and between images. Pre-processing (`scale_linear`):

    model units = ((counts - {n.camera_offset_adu}) * {n.camera_gain_e_per_adu}
                   - {n.background_e}) / {n.scale_e}
                = counts * {gain:.9g} + ({offset:.9g})

with camera offset {n.camera_offset_adu} ADU, gain {n.camera_gain_e_per_adu} e-/ADU
(read noise {n.read_noise_e} e-), background {n.background_e} e- and {n.scale_e}
photoelectrons per model unit. Post-processing (`scale_linear`) returns photoelectrons:
`denoised` x {n.scale_e} (per input pixel), `deconvolved` x {n.scale_e}{share}/{upscale * upscale}
(per output pixel, so the restored image keeps the raw image's photons{share_why}).
**Data from another camera** (other offset or gain) must be converted to this camera's
counts first, or the pre-processing edited with that camera's values.

## PSF

- source: {p.source}
- {p.description}
- sampled at {p.pixel_size_um} um{z_psf} (the output grid); `psf.tif` in this package{psf_sha}

## Training

- created {t.created_utc} with livedecon {t.livedecon_version}, torch {t.torch_version}
- data: {"; ".join(t.data)}
- {t.iterations} iterations{" (interrupted)" if t.interrupted else ""}, final loss
  {t.final_loss}{f"; tuned from {t.parent}" if t.parent else ""}
- configuration:

```json
{json.dumps(t.config, indent=2)}
```

## Validation

The test tensors are a raw image and livedecon's own torch float32 output for it;
`bioimageio test` checks that both weight formats (ONNX, TorchScript) with the pre- and
post-processing above reproduce them. To validate on your data, compare against ground truth
(simulated specimens, or a high-SNR acquisition of the same field) by fitted PSNR and SSIM,
and check resolution by decorrelation analysis; a restoration that removes real structure is
wrong however sharp. `livedecon bench quality` does this on simulated scenes, with
Richardson-Lucy at its best iteration count as the baseline.

## Running it

- bioimageio.core: `bioimageio predict PACKAGE.zip --inputs raw.tif`
- deepImageJ / JDLL (Fiji, Icy): install the zip; the ONNX or TorchScript weights run there
- livedecon: `livedecon restore PACKAGE.zip raw.tif restored.ome.tif` runs the bundle
  attached here (`model.json`, `weights.safetensors`, `psf.tif`) with tiling for large
  frames and the fastest backend present (TensorRT, CUDA, ONNX Runtime).

## Citation

{CITATION_TEXT} https://doi.org/{CITATION_DOI}
"""


def export_bioimageio(
    bundle: ModelBundle,
    out_zip: str | Path,
    *,
    sample_counts: np.ndarray | None = None,
    authors: tuple[str, ...] = (),
    license_id: str = "BSD-3-Clause",
) -> PackageReport:
    """Write `bundle` as a bioimage.io model package (spec 0.5) to `out_zip`.

    `sample_counts`: one raw image (Y, X) or stack (Z, Y, X) in camera counts for the test
    tensors and the cover (default: a synthetic specimen at the bundle's photon level).
    Raises ValueError for bundles the spec cannot describe (Self-Net, SIM) and for bad
    samples.
    """
    importlib.import_module("bioimageio.spec")  # the `bioimageio` extra: fail before any work
    _check_exportable(bundle.manifest)
    # The package holds the network (its deconvolution stage, in 3D); the Richardson-Lucy
    # steps a bundle may take after it are livedecon's, and the attached bundle keeps them.
    attached_bundle, bundle = bundle, bundle.network_alone()
    out_zip = Path(out_zip)
    if out_zip.suffix.lower() != ".zip":
        raise ValueError(f"{out_zip}: a bioimage.io package is a .zip file")
    sample = _checked_sample(bundle, sample_counts)
    test_in = np.ascontiguousarray(_centre_crop(sample, _test_shape(bundle, sample)))
    with tempfile.TemporaryDirectory(prefix="livedecon-bioimageio-") as tmp:
        files = _write_files(bundle, attached_bundle, sample, test_in, Path(tmp))
        _save(_model_description(bundle, files, authors, license_id), out_zip)
    return PackageReport(
        out_zip,
        (DECONVOLVED, DENOISED),
        tuple(test_in[None, None].shape),
        ("onnx", "torchscript"),
    )


def _check_exportable(m: BundleManifest) -> None:
    if m.is_selfnet:
        raise ValueError(
            f"bundle {m.name!r} is a Self-Net model: it restores the axial slices of a"
            " resampled volume, which a bioimage.io model description cannot express; only"
            " ZS-DeconvNet 2D and 3D bundles can be exported to bioimage.io"
        )
    if m.is_sim:
        raise ValueError(
            f"bundle {m.name!r} is a SIM model: it restores SR images of livedecon's own SIM"
            " reconstruction (its settings are in the bundle), which a bioimage.io consumer"
            " does not make; only ZS-DeconvNet 2D and 3D bundles can be exported to bioimage.io"
        )


def _checked_sample(bundle: ModelBundle, sample_counts: np.ndarray | None) -> np.ndarray:
    """The sample as float32 counts of the network's dimensionality, all finite."""
    m = bundle.manifest
    if sample_counts is None:
        sample_counts = synthetic_counts(bundle, (8, 64, 64) if m.is_3d else (128, 128))
    sample = np.asarray(sample_counts, dtype=np.float32)
    if sample.ndim != (3 if m.is_3d else 2):
        raise ValueError(
            f"sample of shape {sample.shape}: the {m.network.kind} model takes"
            f" {'(Z, Y, X) stacks' if m.is_3d else '(Y, X) frames'}"
        )
    if not np.all(np.isfinite(sample)):
        raise ValueError("the sample holds NaN or infinite values")
    return sample


def _preprocessing(norm: Normalisation) -> tuple[float, float]:
    """(gain, offset) of the one scale_linear from counts to model units:
    ((counts - offset) * gain - background) / scale_e."""
    gain = norm.camera_gain_e_per_adu / norm.scale_e
    offset = -(norm.camera_offset_adu * norm.camera_gain_e_per_adu + norm.background_e)
    return gain, offset / norm.scale_e


def _write_files(
    bundle: ModelBundle,
    attached_bundle: ModelBundle,
    sample: np.ndarray,
    test_in: np.ndarray,
    work: Path,
) -> dict[str, Path]:
    """Every file of the package, written into `work`: weights, test and sample tensors,
    cover, README and the attached bundle (under "bundle")."""
    m = bundle.manifest
    files = {
        "onnx": work / "weights.onnx",
        "torchscript": work / "weights.torchscript.pt",
        "test_input": work / "test_input.npy",
        DENOISED: work / f"test_output_{DENOISED}.npy",
        DECONVOLVED: work / f"test_output_{DECONVOLVED}.npy",
        "cover": work / "cover.png",
        "sample_input": work / "sample_input.tif",
        DENOISED + "_sample": work / f"sample_output_{DENOISED}.tif",
        DECONVOLVED + "_sample": work / f"sample_output_{DECONVOLVED}.tif",
        "readme": work / "README.md",
        "bundle": work / "bundle",
    }
    export_onnx(bundle.build_model(), files["onnx"], m.is_3d)
    _torchscript(bundle, torch.from_numpy(test_in[None, None].copy()), files["torchscript"])
    np.save(files["test_input"], test_in[None, None])
    for name, image in zip((DENOISED, DECONVOLVED), _network_outputs(bundle, test_in), strict=True):
        np.save(files[name], image[None, None].astype(np.float32))
    # sample tensors (for people, TIFF): the sample itself, up to 256 pixels a side
    multiple = input_multiple(m.network)
    lateral = [min(n, 256) // multiple * multiple for n in sample.shape[-2:]]
    sample_in = np.ascontiguousarray(_centre_crop(sample, (*sample.shape[:-2], *lateral)))
    tifffile.imwrite(files["sample_input"], sample_in)
    outputs = _network_outputs(bundle, sample_in)
    for name, image in zip((DENOISED, DECONVOLVED), outputs, strict=True):
        tifffile.imwrite(files[name + "_sample"], image.astype(np.float32))
    _cover(bundle, sample, files["cover"])
    attached_bundle.save(files["bundle"])
    upscale = 2 if m.network.upsample else 1
    outputs_doc = (
        f"- output `{DECONVOLVED}`: the restoration (denoised, deconvolved, {upscale}x"
        f" laterally), pixel {m.output_pixel_um} um, photoelectrons per output pixel;"
        " use this one\n"
        f"- output `{DENOISED}`: the first stage alone, on the input grid, photoelectrons"
        " per input pixel"
    )
    files["readme"].write_text(_readme(bundle, outputs_doc, _preprocessing(m.normalisation)))
    return files


def _tensors(
    bundle: ModelBundle, files: dict[str, Path]
) -> tuple[list[v0_5.InputTensorDescr], list[v0_5.OutputTensorDescr]]:
    """The input (raw counts, pre-processed to model units) and the two outputs
    (post-processed to photoelectrons) as bioimage.io tensor descriptions."""
    from bioimageio.spec.model import v0_5

    m = bundle.manifest
    norm = m.normalisation
    upscale = 2 if m.network.upsample else 1
    multiple = input_multiple(m.network)
    unit = "nanometer"
    in_px, out_px = _nm(m.input_pixel_um), _nm(m.input_pixel_um) / upscale
    input_id = v0_5.TensorId(INPUT_ID)

    def lateral(ref: bool, scale: float) -> list[v0_5.AnyAxis]:
        if not ref:
            if m.is_3d:  # RCAN: no pooling, any lateral size
                size = v0_5.ParameterizedSize(min=MIN_LATERAL_3D, step=1)
            else:
                size = v0_5.ParameterizedSize(min=2 * multiple, step=multiple)
            return [
                v0_5.SpaceInputAxis(id=v0_5.AxisId(a), size=size, scale=scale, unit=unit)
                for a in ("y", "x")
            ]
        return [
            v0_5.SpaceOutputAxis(
                id=v0_5.AxisId(a),
                size=v0_5.SizeReference(tensor_id=input_id, axis_id=v0_5.AxisId(a)),
                scale=scale,
                unit=unit,
            )
            for a in ("y", "x")
        ]

    def axes(ref: bool, scale: float, channel: str) -> list[v0_5.AnyAxis]:
        head: list[v0_5.AnyAxis] = [
            v0_5.BatchAxis(),
            v0_5.ChannelAxis(channel_names=[v0_5.Identifier(channel)]),
        ]
        if m.is_3d:
            assert m.z_step_um is not None  # the manifest guarantees it for 3D
            z_size = (
                v0_5.SizeReference(tensor_id=input_id, axis_id=v0_5.AxisId("z"))
                if ref
                else v0_5.ParameterizedSize(min=MIN_DEPTH_3D, step=1)
            )
            z_axis = (v0_5.SpaceOutputAxis if ref else v0_5.SpaceInputAxis)(
                id=v0_5.AxisId("z"), size=z_size, scale=_nm(m.z_step_um), unit=unit
            )
            head.append(z_axis)
        return head + lateral(ref, scale)

    photons = v0_5.IntervalOrRatioDataDescr(type="float32")
    pre_gain, pre_offset = _preprocessing(norm)
    inputs = [
        v0_5.InputTensorDescr(
            id=input_id,
            description="raw camera counts (ADU); the camera the model was trained for",
            axes=axes(False, in_px, "raw"),
            test_tensor=v0_5.FileDescr(source=files["test_input"]),
            sample_tensor=v0_5.FileDescr(source=files["sample_input"]),
            data=photons,
            preprocessing=[
                v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")),
                v0_5.ScaleLinearDescr(
                    kwargs=v0_5.ScaleLinearKwargs(gain=pre_gain, offset=pre_offset)
                ),
            ],
        )
    ]
    outputs = [
        v0_5.OutputTensorDescr(
            id=v0_5.TensorId(DENOISED),
            description="denoised, on the input grid; photoelectrons per input pixel",
            axes=axes(True, in_px, DENOISED),
            test_tensor=v0_5.FileDescr(source=files[DENOISED]),
            sample_tensor=v0_5.FileDescr(source=files[DENOISED + "_sample"]),
            data=photons,
            postprocessing=[
                v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(gain=norm.scale_e))
            ],
        ),
        v0_5.OutputTensorDescr(
            id=v0_5.TensorId(DECONVOLVED),
            description=f"denoised and deconvolved, {upscale}x laterally; photoelectrons"
            " per output pixel",
            axes=axes(True, out_px, DECONVOLVED),
            test_tensor=v0_5.FileDescr(source=files[DECONVOLVED]),
            sample_tensor=v0_5.FileDescr(source=files[DECONVOLVED + "_sample"]),
            data=photons,
            postprocessing=[
                v0_5.ScaleLinearDescr(
                    kwargs=v0_5.ScaleLinearKwargs(
                        gain=norm.scale_e * bundle.flux_share / upscale**2
                    )
                )
            ],
        ),
    ]
    return inputs, outputs


def _model_description(
    bundle: ModelBundle, files: dict[str, Path], authors: tuple[str, ...], license_id: str
) -> v0_5.ModelDescr:
    """The package's rdf: what the model is, its tensors, weights, citation and the
    attached livedecon bundle."""
    from bioimageio.spec.model import v0_5

    m = bundle.manifest
    upscale = 2 if m.network.upsample else 1
    kind = "3D" if m.is_3d else "2D"
    inputs, outputs = _tensors(bundle, files)
    return v0_5.ModelDescr(
        name=f"livedecon {m.name} ZS-DeconvNet {kind}",
        description=(
            f"ZS-DeconvNet ({m.network.kind}): self-supervised denoising, deconvolution"
            f" and {upscale}x super-resolution of {kind} widefield fluorescence, in fixed"
            " photon units; exported from the livedecon bundle"
            f" {m.bundle_id}"
        ),
        authors=[v0_5.Author(name=name) for name in authors],
        cite=[v0_5.CiteEntry(text=CITATION_TEXT, doi=v0_5.Doi(CITATION_DOI))],
        license=v0_5.LicenseId(license_id),
        documentation=v0_5.FileDescr(source=files["readme"]),
        covers=[v0_5.FileDescr(source=files["cover"])],
        tags=[
            "zs-deconvnet",
            "denoising",
            "deconvolution",
            "super-resolution",
            "self-supervised",
            "fluorescence-light-microscopy",
            kind.lower(),
            "livedecon",
        ],
        attachments=[
            v0_5.FileDescr(source=files["bundle"] / name) for name in (MANIFEST, WEIGHTS, PSF)
        ],
        inputs=inputs,
        outputs=outputs,
        weights=v0_5.WeightsDescr(
            onnx=v0_5.OnnxWeightsDescr(source=files["onnx"], opset_version=OPSET),
            torchscript=v0_5.TorchscriptWeightsDescr(
                source=files["torchscript"],
                pytorch_version=v0_5.Version(torch.__version__.split("+")[0]),
                parent="onnx",
            ),
        ),
        config=v0_5.Config(
            livedecon={
                "bundle_id": m.bundle_id,
                "bundle_files": [MANIFEST, WEIGHTS, PSF],
                "weights_sha256": m.weights_sha256,
                "normalisation": m.normalisation.model_dump(mode="json"),
            }
        ),
    )


def _save(descr: v0_5.ModelDescr, out_zip: Path) -> None:
    """The package as one zip, written aside and moved into place."""
    from bioimageio.spec import save_bioimageio_package

    out_zip.parent.mkdir(parents=True, exist_ok=True)
    partial = out_zip.with_name(f".{out_zip.name}.partial")
    try:
        save_bioimageio_package(descr, output_path=partial)
        replace_atomically(partial, out_zip)
    finally:
        partial.unlink(missing_ok=True)


def _rdf_name(archive: zipfile.ZipFile) -> str | None:
    names = set(archive.namelist())
    return next((name for name in RDF_NAMES if name in names), None)


def is_bioimageio_package(path: str | Path) -> bool:
    """A zip file holding a bioimage.io description at its top level."""
    path = Path(path)
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return _rdf_name(archive) is not None


def bundle_from_package(package: str | Path, directory: str | Path) -> Path:
    """Unpack the livedecon bundle attached to a package written by `export_bioimageio`
    into `directory`/<name> and return that bundle directory (checked when it is loaded:
    weights hash, architecture, PSF). A package from elsewhere is refused with a clear error."""
    package, directory = Path(package), Path(directory)
    if not is_bioimageio_package(package):
        raise BundleError(f"{package}: not a bioimage.io package (a zip with rdf.yaml)")
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        missing = [name for name in (MANIFEST, WEIGHTS, PSF) if name not in names]
        if missing:
            raise BundleError(
                f"{package}: a bioimage.io package without a livedecon bundle attached"
                f" (no {', '.join(missing)}); livedecon restores only packages written by"
                " `livedecon export --bioimageio`"
            )
        try:
            manifest = json.loads(archive.read(MANIFEST))
            name = str(manifest["name"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{package}: attached {MANIFEST} is unreadable: {exc}") from None
        digest = hashlib.sha256(archive.read(WEIGHTS)).hexdigest()[:12]
        target = directory / f"{Path(name).name or 'bundle'}-{digest}"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for member in (MANIFEST, WEIGHTS, PSF):
            with archive.open(member) as src, (target / member).open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return target
