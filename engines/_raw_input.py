"""Raw camera data for `train` and `restore`, whatever wrote it: a TIFF or OME-TIFF file, an
NDTiff directory (Micro-Manager 2, pycro-manager) or an OME-Zarr store (pymmcore-plus through
ome-writers). Each is read whole, with its axes as OME letters and its recorded sampling.

Crash recovery plane by plane is `daemon._raw_datasets`; this reads finished datasets.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from livedecon.engines._ome_tiff import OmeImage, check_pixel_size, read_raw_tiff
from livedecon.engines._ome_zarr import store_images

# Dataset axis names as OME/tifffile axis letters (a stage position has no OME letter).
_AXIS_LETTERS = {"time": "T", "t": "T", "channel": "C", "c": "C", "z": "Z", "position": "P"}
_AXIS_LETTERS |= {"p": "P", "y": "Y", "x": "X"}


def raw_format(path: str | Path) -> str:
    """'zarr', 'ndtiff' or 'tiff' by what is at `path` (a clear error when none)."""
    path = Path(path)
    if (path / "zarr.json").is_file() or (path / ".zattrs").is_file():
        return "zarr"
    if path.is_dir():
        return "ndtiff"
    if path.is_file():
        return "tiff"
    raise FileNotFoundError(f"{path}: no such file or dataset")


def read_raw_image(path: str | Path, expected_pixel_um: float, expected_for: str) -> OmeImage:
    """Every plane of the raw dataset at `path`. A recorded pixel size must match
    `expected_pixel_um` (what `expected_for` needs); a dataset that records none takes it.
    Planes a crashed acquisition never wrote (all zero: the stores' fill value, which no
    camera with an offset produces) are refused rather than restored or trained on."""
    path = Path(path)
    kind = raw_format(path)
    if kind == "tiff":
        return read_raw_tiff(path, expected_pixel_um, expected_for)
    image = _read_zarr(path) if kind == "zarr" else _read_ndtiff(path)
    if image.pixel_size_um:
        check_pixel_size(path, image.pixel_size_um, expected_pixel_um, expected_for)
    planes = image.data.reshape(-1, *image.data.shape[-2:])
    missing = int(np.count_nonzero(~planes.any(axis=(1, 2))))
    if missing:
        raise ValueError(
            f"{path}: {missing} of {len(planes)} planes were never written (an interrupted"
            " acquisition?); restore what was acquired with `livedecon reprocess`, or crop"
        )
    pixel_um = image.pixel_size_um or expected_pixel_um
    return OmeImage(image.data, image.axes, pixel_um, image.z_step_um)


def _letters(names: list[str], path: Path) -> str:
    unknown = [n for n in names if n.lower() not in _AXIS_LETTERS]
    if unknown:
        raise ValueError(f"{path}: axes {unknown} are not time, position, channel, z, y, x")
    return "".join(_AXIS_LETTERS[n.lower()] for n in names)


def _read_zarr(path: Path) -> OmeImage:
    """The first image of an OME-Zarr store (the root's, or position 0's in a plate-less
    bioformats2raw layout as ome-writers writes several positions), full resolution."""
    import zarr

    images = store_images(zarr.open_group(str(path), mode="r"))
    if not images:
        raise ValueError(f"{path}: an OME-Zarr store without images")
    image = images[0][1]
    sampling = image.sampling()
    data = np.asarray(image.array[...])
    return OmeImage(data, _letters(image.axes, path), sampling.get("x", 0.0), sampling.get("z"))


def open_ndtiff(path: Path) -> Any:
    """An ndstorage Dataset, opened without its progress output; `ValueError` naming the path
    for a directory that is not an NDTiff."""
    from ndstorage import Dataset

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress to stdout
            return Dataset(str(path))
    except Exception as exc:  # ndstorage raises bare Exceptions for foreign directories
        raise ValueError(
            f"{path}: not a readable NDTiff dataset (nor a TIFF or OME-Zarr): {exc}"
        ) from None


def _read_ndtiff(path: Path) -> OmeImage:
    dataset = open_ndtiff(path)
    try:
        names = [n for n in dataset.axes if len(dataset.axes[n]) > 1]
        data = np.asarray(dataset.as_array(axes=names or None))
        data = data.reshape(*(len(dataset.axes[n]) for n in names), *data.shape[-2:])
        first = dataset.read_metadata(**{n: next(iter(v)) for n, v in dataset.axes.items()})
        summary = getattr(dataset, "summary_metadata", {}) or {}
        pixel = float(first.get("PixelSize_um") or summary.get("PixelSize_um") or 0.0)
        z_values = sorted(dataset.axes.get("z", []))
        z_step = _z_step(dataset, z_values) if "z" in names else None
    finally:
        dataset.close()
    return OmeImage(data, _letters([*names, "y", "x"], path), pixel, z_step)


def _z_step(dataset: Any, z_indices: list[int]) -> float | None:
    """The stage step between the first two planes of the first stack, when recorded."""
    positions = []
    for z in z_indices[:2]:
        found = [c for c in dataset.get_image_coordinates_list() if c.get("z") == z]
        metadata = dataset.read_metadata(**found[0]) if found else {}
        if "ZPosition_um_Intended" in metadata:
            positions.append(float(metadata["ZPosition_um_Intended"]))
    return abs(positions[1] - positions[0]) or None if len(positions) == 2 else None
