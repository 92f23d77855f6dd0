"""Self-Net from files: read a volume with its voxel size, train a bundle, restore a file.

The glue between TIFFs on disk and engines/selfnet*: voxel sizes come from the OME metadata
or are given; a volume without a z step is refused (Self-Net's whole model is the ratio of z
step to pixel), and so is a single 2D frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from livedecon.calibration._anisotropic import AnisotropicScene, render_anisotropic
from livedecon.calibration._inputs import sha256
from livedecon.engines._bundle import ModelBundle, TrainingRecord
from livedecon.engines._ome_tiff import read_ome_tiff, write_ome_tiff
from livedecon.engines._selfnet import Infer, axial_ratio, check_volume
from livedecon.engines._selfnet_bundle import (
    restore_isotropic,
    selfnet_bundle,
    volume_normalisation,
)
from livedecon.engines._selfnet_training import SelfNetTrainingConfig, train_selfnet

PIXEL_TOLERANCE = 0.02


@dataclass(frozen=True)
class Volume:
    """A volume read for Self-Net with its voxel size and where it came from."""

    data: np.ndarray  # (Z, Y, X) float32
    pixel_um: float
    z_step_um: float
    description: str


def _given_or_recorded(name: str, given: float | None, recorded: float | None, path: Path) -> float:
    if given is not None and recorded is not None and abs(recorded / given - 1) > PIXEL_TOLERANCE:
        raise ValueError(f"{path}: {name} recorded as {recorded} um, but {given} um given")
    value = given if given is not None else recorded
    if value is None:
        option = "--pixel-um" if name == "pixel size" else "--z-step-um"
        raise ValueError(f"{path}: no {name} in the file's metadata; give it with {option}")
    return float(value)


def read_volume(path: Path, pixel_um: float | None, z_step_um: float | None) -> Volume:
    """One (Z, Y, X) volume from a TIFF (OME or plain), with its voxel size checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with tifffile.TiffFile(path) as tif:
        is_ome = tif.is_ome
    if is_ome:
        image = read_ome_tiff(path)
        data, rec_px, rec_z = image.data, image.pixel_size_um, image.z_step_um
    else:
        data, rec_px, rec_z = tifffile.imread(path), None, None
    data = np.squeeze(np.asarray(data))
    if data.ndim != 3:
        raise ValueError(
            f"{path}: shape {data.shape}; Self-Net takes one volume (Z, Y, X)"
            + (": a 2D frame has no axial slices" if data.ndim == 2 else "")
        )
    px = _given_or_recorded("pixel size", pixel_um, rec_px, path)
    dz = _given_or_recorded("z step", z_step_um, rec_z, path)
    axial_ratio(px, dz)
    volume = check_volume(data, str(path))
    return Volume(volume, px, dz, f"{path} sha256:{sha256(path)}")


def simulated_volume(scene: AnisotropicScene) -> Volume:
    """The simulator's anisotropic volume of a scene, in photoelectrons, as a Volume."""
    rendered = render_anisotropic(scene)
    description = f"simulated: {scene.model_dump_json()}"
    return Volume(rendered.electrons, scene.pixel_um, scene.z_step_um, description)


def train_selfnet_bundle(
    volume: Volume,
    cfg: SelfNetTrainingConfig,
    name: str,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> ModelBundle:
    """Train Self-Net on one volume and bundle its restorer with full provenance."""
    norm = volume_normalisation(volume.data)
    units = norm.electrons(volume.data) / norm.scale_e
    ratio = axial_ratio(volume.pixel_um, volume.z_step_um)
    result = train_selfnet(units, ratio, cfg, progress)
    record = TrainingRecord.now(
        data=[volume.description],
        config=cfg,
        iterations=result.iterations,
        final_loss=result.final_loss,
        interrupted=result.interrupted,
    )
    return selfnet_bundle(
        result.restorer,
        name=name,
        pixel_um=volume.pixel_um,
        z_step_um=volume.z_step_um,
        normalisation=norm,
        training=record,
    )


def restore_volume_file(
    bundle: ModelBundle,
    infer: Infer,
    in_path: Path,
    out_path: Path,
    z_step_um: float | None = None,
    tile_px: int | None = None,
) -> Path:
    """Restore a volume TIFF into an isotropic OME-TIFF (float32, z step = lateral pixel)."""
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.resolve() == in_path.resolve():
        raise ValueError(f"{out_path}: would overwrite the input")
    m = bundle.manifest
    volume = read_volume(in_path, m.input_pixel_um, z_step_um or None)
    out = restore_isotropic(bundle, infer, volume.data, volume.z_step_um, tile_px=tile_px)
    return write_ome_tiff(
        out_path,
        out.astype(np.float32),
        "ZYX",
        m.output_pixel_um,
        z_step_um=m.output_z_step_um,
        description=(
            f"made isotropic by livedecon Self-Net bundle {bundle.bundle_id} from"
            f" {in_path.name} (z step {volume.z_step_um} um -> {m.output_z_step_um} um)"
        ),
    )
