"""The OME-Zarr (NGFF 0.5) copy of the restored planes: what it holds, and that a kill or a
failed write leaves nothing the OME-TIFF holds missing from it once closed or reprocessed."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr
from plane_records import acquisition, assert_same_as_tiff, info, zarr_planes
from yaozarrs import validate_zarr_store

from livedecon.daemon._journal import write_acquisition_record
from livedecon.daemon._reprocess import reprocess
from livedecon.daemon._writer import AcquisitionWriter, output_path
from livedecon.daemon._zarr_output import ZarrImage, ZarrMirror, is_complete, zarr_path


def test_planes_in_any_order_make_a_valid_ngff_image_with_physical_scale(tmp_path):
    record = acquisition("3d", z_count=3)
    writer = AcquisitionWriter(tmp_path, record, ZarrMirror(record))
    rng = np.random.default_rng(0)
    order = [(1, 2), (0, 0), (1, 0), (0, 1), (0, 2), (1, 1)]  # as a live stream may deliver
    for n, (t, z) in enumerate(order):
        writer.write(rng.random((8, 12), dtype=np.float32), info(n, t, z))
    tiff = output_path(tmp_path, 0, "GFP")
    assert not is_complete(zarr_path(tiff))  # readable while written, not yet complete
    assert zarr_planes(tiff).shape == (2, 3, 8, 12)
    writer.close()
    assert is_complete(zarr_path(tiff))
    assert_same_as_tiff(tiff)
    ome = validate_zarr_store(str(zarr_path(tiff))).attrs["ome"]
    multiscale = ome["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["t", "z", "y", "x"]
    scale = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [2.0, 0.25, 0.05, 0.05]  # interval, z step, output pixel


def test_uint16_planes_keep_their_counts_and_unwritten_planes_read_as_nan(tmp_path):
    record = acquisition()
    image = ZarrImage(output_path(tmp_path, 0, "GFP"), record)
    counts = np.arange(48, dtype=np.uint16).reshape(6, 8)
    image.write(counts, info(0, 0))
    assert zarr.open_array(image.path / "0", mode="r")[0].tolist() == counts.tolist()

    floats = ZarrImage(output_path(tmp_path, 1, "GFP"), record)
    floats.write(np.ones((4, 4), np.float32), info(0, 2))
    stored = zarr.open_array(floats.path / "0", mode="r")[...]
    assert stored.shape == (3, 4, 4)
    assert np.isnan(stored[:2]).all()
    assert (stored[2] == 1).all()
    with pytest.raises(ValueError, match="move it away"):  # one image, one shape and dtype
        ZarrImage(output_path(tmp_path, 1, "GFP"), record).write(counts, info(1, 3))

    # a writer killed between creating the group and its array: the next one makes the array
    bare = output_path(tmp_path, 2, "GFP")
    zarr.open_group(zarr_path(bare), mode="w", zarr_format=3)
    ZarrImage(bare, record).write(counts, info(0, 0))
    assert zarr_planes(bare)[0].tolist() == counts.tolist()


def test_a_failed_copy_is_logged_and_completed_from_the_tiff_at_close(
    tmp_path, monkeypatch, caplog
):
    record = acquisition()
    writer = AcquisitionWriter(tmp_path, record, ZarrMirror(record))
    original = ZarrImage.write

    def full_disk_on_plane_1(self, plane, plane_record):
        if plane_record.time == 1:
            raise OSError(28, "No space left on device")
        original(self, plane, plane_record)

    tiff = output_path(tmp_path, 0, "GFP")
    stale = np.full((4, 4), -1, np.float32)
    writer.write(stale, info(9, 1))  # plane t=1, then sent again with new pixels below
    monkeypatch.setattr(ZarrImage, "write", full_disk_on_plane_1)
    planes = [np.full((4, 4), t, np.float32) for t in range(3)]
    with caplog.at_level(logging.ERROR):
        for t, plane in enumerate(planes):
            writer.write(plane, info(t, t))  # the OME-TIFF write goes on regardless
    assert "No space left on device" in caplog.text
    assert "reprocess" in caplog.text
    assert np.isnan(zarr_planes(tiff)[1]).all()  # the stale copy is gone, not kept
    monkeypatch.setattr(ZarrImage, "write", original)  # the disk has room again
    writer.close()
    assert is_complete(zarr_path(tiff))
    assert_same_as_tiff(tiff)
    np.testing.assert_array_equal(zarr_planes(tiff)[1], planes[1])


def test_reprocess_completes_an_image_a_kill_left_short(tmp_path):
    """A kill between a plane's OME-TIFF append and its OME-Zarr write leaves the image a
    plane short (a chunk is written whole or not at all, so it is absent, never torn)."""
    record = acquisition()
    directory = tmp_path / "acq-1"
    writer = AcquisitionWriter(directory, record.model_copy(update={"ome_zarr": True}))
    mirror = ZarrMirror(record)
    rng = np.random.default_rng(1)
    for t in range(4):
        plane = rng.random((6, 6), dtype=np.float32)
        path = writer.write(plane, info(t, t))
        if t < 3:  # killed before the last plane reached the OME-Zarr image
            mirror.write(path, plane, info(t, t))
    writer.suspend()  # the daemon dies: no OME-XML, no completion
    write_acquisition_record(directory, record.model_copy(update={"ome_zarr": True}))
    tiff = output_path(directory, 0, "GFP")
    assert zarr_planes(tiff).shape[0] == 3
    report = reprocess(directory)
    assert any("1 plane(s) copied" in note for note in report.notes), report.notes
    assert is_complete(zarr_path(tiff))
    assert_same_as_tiff(tiff)
