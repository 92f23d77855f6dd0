"""An acquisition record and plane records as the daemon makes them, checks of the output
files, and raw datasets as acquisition software writes them, for the writers' tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from ndstorage import NDTiffDataset

from livedecon.daemon._journal import AcquisitionRecord
from livedecon.daemon._protocol import Plan
from livedecon.daemon._writer import PlaneRecord, read_planes
from livedecon.daemon._zarr_output import zarr_path


def acquisition(mode: str = "2d", z_count: int | None = None) -> AcquisitionRecord:
    plan = Plan(
        mode=mode,
        z_count=z_count,
        z_step_um=0.25 if mode == "3d" else None,
        pixel_size_um=0.1,
        time_interval_s=2.0,
        channels=["GFP"],
    )
    return AcquisitionRecord(
        acquisition_id="acq-1",
        plan=plan,
        processor="model",
        bundle_path="/bundles/tiny",
        bundle_id="tiny@0123456789ab",
        weights_version=1,
        backend="torch",
        input_pixel_um=0.1,
        output_pixel_um=0.05,
        units="photoelectrons per output pixel (float32)",
    )


def info(frame_id: int, time: int, z: int = 0, **extra) -> PlaneRecord:
    fields = {
        "channel": "GFP",
        "position": 0,
        "timestamp_s": 1000.0 + 2 * frame_id,
        "bundle_id": "tiny@0123456789ab",
        "weights_version": 1,
    }
    return PlaneRecord(frame_id=frame_id, time=time, z=z, **(fields | extra))


def zarr_planes(tiff: Path) -> np.ndarray:
    """The image's array, as numpy (unwritten planes read as the fill value)."""
    return zarr.open_array(zarr_path(tiff) / "0", mode="r")[...]


def assert_same_as_tiff(tiff: Path) -> None:
    """Every plane of the OME-TIFF is in the OME-Zarr image, bit for bit, at its (t, z): the
    last page of each (t, z), as the OME-XML names it."""
    stored = zarr_planes(tiff)
    latest = {record.key: (record, plane) for record, plane in read_planes(tiff)}
    assert latest
    for record, plane in latest.values():
        index = (record.time, record.z) if stored.ndim == 4 else (record.time,)
        np.testing.assert_array_equal(stored[index], plane)


def ndtiff(tmp_path: Path, planes: dict[tuple, np.ndarray], axes: tuple[str, ...]) -> Path:
    """A raw dataset as pycro-manager writes it (NDTiff)."""
    dataset = NDTiffDataset(str(tmp_path), name="raw", writable=True, summary_metadata={})
    for coordinates, pixels in planes.items():
        dataset.put_image(dict(zip(axes, coordinates, strict=True)), pixels, {})
    dataset.finish()
    return Path(dataset.path)
