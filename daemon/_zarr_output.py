"""Restored planes as OME-Zarr (NGFF 0.5), next to the OME-TIFF files, when the daemon config
asks for it (`[storage] ome_zarr = true`).

One image per (position, channel), like the OME-TIFF files: `restored_p<P>_c<C>.ome.zarr`,
axes (t, y, x) in 2D or (t, z, y, x) in 3D, one full-resolution array `0`, one chunk per
plane, uncompressed (restored float32 does not compress, and the write is on the live path).
zarr-python writes a chunk to a temporary file and renames it, so after a kill a plane is
whole or absent; absent planes read as the fill value (NaN in float32, 0 in uint16). The time
axis grows as planes arrive; napari, dask and zarr read the image while it is written.

The OME-TIFF stays the record: a plane is appended there first. An image is marked complete
(`attributes["livedecon"]["complete"]`) once it holds every plane of its OME-TIFF; closing an
acquisition and `livedecon reprocess` both complete it from the TIFF, so an image left behind
by a kill or a failed write gets its missing planes then.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from livedecon.daemon._journal import AcquisitionRecord
from livedecon.daemon._writer import FILE_SUFFIX, PlaneRecord, read_page, scan_file
from livedecon.engines._ome_zarr import chunk_file, chunk_written, ngff_image

log = logging.getLogger(__name__)

ZARR_SUFFIX = ".ome.zarr"
ARRAY = "0"


def zarr_path(tiff_path: Path) -> Path:
    """The OME-Zarr image beside an OME-TIFF output file."""
    return tiff_path.with_name(tiff_path.name.removesuffix(FILE_SUFFIX) + ZARR_SUFFIX)


def _ngff(name: str, acquisition: AcquisitionRecord) -> dict[str, Any]:
    """The group's `ome` attributes: the interval, z step and output pixel as the scale."""
    plan = acquisition.plan
    interval = plan.time_interval_s
    scale = {"T": interval or 1.0}
    if plan.mode == "3d":
        scale["Z"] = acquisition.stack_z_step_um or 1.0
    scale["Y"] = scale["X"] = acquisition.output_pixel_um
    return ngff_image(name, scale, ARRAY, time_unit="second" if interval else None)


class ZarrImage:
    """The OME-Zarr image of one OME-TIFF output file, opened or created on first use."""

    def __init__(self, tiff_path: Path, acquisition: AcquisitionRecord) -> None:
        self.path = zarr_path(tiff_path)
        self.acquisition = acquisition
        self.is_3d = acquisition.plan.mode == "3d"
        self._array: zarr.Array[Any] | None = None

    def _open(self, shape: tuple[int, int], dtype: np.dtype) -> zarr.Array[Any]:
        if self._array is not None:
            return self._array
        if (self.path / "zarr.json").exists():  # continued: not complete until closed again
            group = zarr.open_group(self.path, mode="r+")
            group.attrs["livedecon"] = {}
        else:
            group = zarr.open_group(self.path, mode="w-", zarr_format=3)
            name = self.path.name.removesuffix(ZARR_SUFFIX)
            group.attrs.update({"ome": _ngff(name, self.acquisition), "livedecon": {}})
        if ARRAY in group:
            array = zarr.open_array(self.path / ARRAY, mode="r+")
            if array.shape[-2:] != shape or array.dtype != dtype:
                raise ValueError(
                    f"{self.path}: holds planes of shape {array.shape[-2:]} {array.dtype}, not"
                    f" {shape} {dtype}; move it away"
                )
        else:  # new, or the group of a writer killed before it made the array
            depth = (self.acquisition.stack_depth or 1,) if self.is_3d else ()
            array = group.create_array(
                ARRAY,
                shape=(0, *depth, *shape),
                chunks=(1, *(1,) * len(depth), *shape),
                dtype=dtype,
                fill_value=np.nan if dtype.kind == "f" else 0,
                compressors=None,
                dimension_names=("t", "z", "y", "x") if self.is_3d else ("t", "y", "x"),
            )
        self._array = array
        return array

    def _index(self, record: PlaneRecord) -> tuple[int, ...]:
        return (record.time, record.z) if self.is_3d else (record.time,)

    def write(self, plane: np.ndarray, record: PlaneRecord) -> None:
        """Store one plane as the OME-TIFF holds it (same dtype and values)."""
        array = self._open(plane.shape, plane.dtype)
        index = self._index(record)
        grown = tuple(max(n, i + 1) for n, i in zip(array.shape, index, strict=False))
        if grown != array.shape[: len(index)]:
            array.resize((*grown, *array.shape[len(index) :]))
        array[index] = plane

    def has(self, record: PlaneRecord) -> bool:
        """Whether the plane's chunk is on disk (chunks are written whole or not at all)."""
        array = self._array
        if array is None or any(
            i >= n for i, n in zip(self._index(record), array.shape, strict=False)
        ):
            return False
        return chunk_written(self.path, ARRAY, array, self._index(record))

    def forget(self, record: PlaneRecord) -> None:
        """Drop the plane's chunk, if any, so completion copies the OME-TIFF's newer one (a
        plane sent again whose write failed must not keep its old pixels)."""
        if self._array is not None and self.has(record):
            with contextlib.suppress(OSError):
                chunk_file(self.path, ARRAY, self._array, self._index(record)).unlink()

    def complete_from(self, tiff_path: Path) -> int:
        """Copy every plane of the OME-TIFF that this image lacks (the latest page of each
        (time, z)), then mark the image complete; the number copied."""
        copied = 0
        with open(tiff_path, "rb") as fh:
            scan = scan_file(fh, tiff_path)
            latest = {record.key: (page, record) for page, record in scan.planes()}
            for page, record in latest.values():
                if self._array is None:
                    self._open(page.shape, page.dtype)
                if not self.has(record):
                    self.write(read_page(fh, page), record)
                    copied += 1
        if self._array is not None:
            group = zarr.open_group(self.path, mode="r+")
            group.attrs["livedecon"] = {"complete": True, "planes": len(latest)}
        return copied


def is_complete(path: Path) -> bool:
    """Whether an OME-Zarr output image holds every plane of its OME-TIFF."""
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False
    ours = group.attrs.get("livedecon")
    return isinstance(ours, dict) and ours.get("complete") is True


def complete_images(tiff_paths: list[Path], acquisition: AcquisitionRecord) -> int:
    """Complete the OME-Zarr image of each OME-TIFF from it; the planes copied in all."""
    copied = 0
    for tiff in tiff_paths:
        image = ZarrImage(tiff, acquisition)
        if not is_complete(image.path):
            copied += image.complete_from(tiff)
    return copied


class ZarrMirror:
    """An acquisition's OME-Zarr images, written plane by plane after its OME-TIFF files
    (the `AcquisitionWriter`'s mirror). Called under that writer's lock."""

    def __init__(self, acquisition: AcquisitionRecord) -> None:
        self.acquisition = acquisition
        self._images: dict[Path, ZarrImage] = {}

    def write(self, tiff_path: Path, plane: np.ndarray, record: PlaneRecord) -> None:
        image = self._images.get(tiff_path)
        if image is None:
            image = self._images[tiff_path] = ZarrImage(tiff_path, self.acquisition)
        try:
            image.write(plane, record)
        except Exception as exc:  # the plane is in the OME-TIFF: closing copies it from there
            image.forget(record)
            del self._images[tiff_path]  # reopened, and checked, by the next plane
            log.error(
                "%s: plane t=%d z=%d not written (%s: %s); the OME-TIFF holds it, and closing"
                " the acquisition or `livedecon reprocess` copies it over",
                image.path.name,
                record.time,
                record.z,
                type(exc).__name__,
                exc,
            )

    def close(self, tiff_paths: list[Path]) -> None:
        """Complete every image from its finalised OME-TIFF."""
        self._images.clear()
        copied = complete_images([p for p in tiff_paths if p.exists()], self.acquisition)
        if copied:
            log.warning("%d plane(s) copied into the OME-Zarr images at close", copied)
