"""Restoring files outside an acquisition (`livedecon restore`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from livedecon.engines._bundle import ModelBundle
from livedecon.engines._ome_tiff import write_ome_tiff
from livedecon.engines._raw_input import read_raw_image
from livedecon.engines._runtime import Runtime, TorchRuntime
from livedecon.engines._tiling import restore_electrons


def output_axes(axes: str, ndim: int, is_3d: bool) -> str:
    """The input's axes where they are OME axes, else time (then channel) for leading ones."""
    core = "ZYX" if is_3d else "YX"
    spare = "TC" if is_3d else "TCZ"
    leading = axes[: ndim - len(core)] if len(axes) == ndim else ""
    if len(set(leading)) == ndim - len(core) and set(leading) <= set(spare):
        return leading + core
    return spare[: ndim - len(core)] + core


def restore_file(
    bundle: ModelBundle,
    in_path: Path,
    out_path: Path,
    progress: Callable[[int, int], None] | None = None,
    runtime: Runtime | None = None,
    tile_px: int | None = 1024,
) -> Path:
    """Restore every frame (2D bundle) or stack (3D bundle) of raw camera counts (a TIFF,
    OME-TIFF, NDTiff or OME-Zarr: engines/_raw_input.py) into
    an OME-TIFF of float32 photoelectrons per output pixel at the upsampled pixel size.

    `runtime`: the engine to use (default: torch float32); frames wider than `tile_px` are
    restored in blended tiles, so memory stays bounded whatever the camera.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.resolve() == in_path.resolve():
        raise ValueError(f"{out_path}: would overwrite the raw input")
    image = read_raw_image(in_path, bundle.manifest.input_pixel_um, f"bundle {bundle.bundle_id}")
    counts, axes, z_step = image.data, image.axes, image.z_step_um
    need = 3 if bundle.manifest.is_3d else 2
    if counts.ndim < need:
        raise ValueError(
            f"{in_path}: shape {counts.shape} has no {'Z, ' if need == 3 else ''}Y, X to restore"
        )
    manifest = bundle.manifest
    norm = manifest.normalisation
    runtime = runtime or TorchRuntime(manifest.network, bundle.state_dict)
    upscale = 2 if manifest.network.upsample else 1
    items = counts.reshape(-1, *counts.shape[-need:])
    restored = []
    for i, item in enumerate(items):
        electrons = norm.electrons(item)
        estimate = restore_electrons(
            runtime.infer,
            electrons,
            norm.scale_e,
            runtime.multiple,
            upscale,
            tile_px,
            bundle.flux_share,
        )
        restored.append(bundle.refine(estimate, electrons))
        if progress:
            progress(i + 1, len(items))
    out = np.stack(restored).reshape(*counts.shape[:-2], *restored[0].shape[-2:])
    return write_ome_tiff(
        out_path,
        out.astype(np.float32),
        output_axes(axes, out.ndim, manifest.is_3d),
        manifest.output_pixel_um,
        z_step_um=z_step or manifest.z_step_um,
        description=(
            f"restored by livedecon bundle {bundle.bundle_id} (weights version"
            f" {manifest.weights_version}{_then(manifest.finishing)}) from {in_path.name};"
            " photoelectrons per pixel"
        ),
    )


def _then(finishing: str) -> str:
    return f", then {finishing}" if finishing else ""
