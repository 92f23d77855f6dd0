"""Raw datasets as the acquisition software writes them, read whole for `train` and `restore`:
an NDTiff from pycromanager's acquisition engine and an OME-Zarr from pymmcore-plus's MDA
runner through ome-writers, both on the simulated microscope."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from ndstorage import Dataset

from livedecon.acquisition_hooks._simulated_microscope import SimulatedMicroscope
from livedecon.engines._raw_input import raw_format, read_raw_image

PIXEL_UM = 0.065


@pytest.fixture
def scope(small_microscope):
    with SimulatedMicroscope(small_microscope, clock="wall", noise_seed=5) as microscope:
        yield microscope


def _ndtiff(tmp_path, scope):
    from pycromanager import Acquisition, multi_d_acquisition_events

    scope.attach_pycromanager()
    events = multi_d_acquisition_events(num_time_points=2, z_start=-0.2, z_end=0.4, z_step=0.2)
    with Acquisition(str(tmp_path / "raw"), "run", show_display=False) as acq:
        acq.acquire(events)
    return acq.get_dataset().path


def _ome_zarr(tmp_path, scope):
    from useq import MDASequence

    sequence = MDASequence(
        time_plan={"interval": 0, "loops": 2}, z_plan={"range": 0.4, "step": 0.2}, axis_order="tz"
    )
    path = tmp_path / "raw.ome.zarr"
    scope.core.mda.run(sequence, output=str(path))
    return path


def test_an_ndtiff_reads_whole_with_its_axes_and_sampling(tmp_path, scope):
    path = _ndtiff(tmp_path, scope)
    image = read_raw_image(path, PIXEL_UM, "test")
    assert raw_format(path) == "ndtiff"
    assert image.axes == "TZYX"
    assert image.data.shape == (2, 4, 64, 64)
    assert image.pixel_size_um == pytest.approx(PIXEL_UM)
    assert image.z_step_um == pytest.approx(0.2)
    dataset = Dataset(str(path))
    try:
        assert np.array_equal(image.data[1, 3], np.asarray(dataset.read_image(time=1, z=3)))
    finally:
        dataset.close()


def test_an_ome_zarr_reads_whole_with_its_axes_and_sampling(tmp_path, scope):
    path = _ome_zarr(tmp_path, scope)
    image = read_raw_image(path, PIXEL_UM, "test")
    assert raw_format(path) == "zarr"
    assert image.axes.endswith("ZYX")
    assert "T" in image.axes
    assert image.data.reshape(-1, 64, 64).shape[0] == 6
    assert image.pixel_size_um == pytest.approx(PIXEL_UM)
    assert image.z_step_um == pytest.approx(0.2)


def test_a_wrong_pixel_size_is_refused(tmp_path, scope):
    path = _ndtiff(tmp_path, scope)
    with pytest.raises(ValueError, match="pixel size"):
        read_raw_image(path, 0.1, "bundle x")


def test_planes_an_interrupted_acquisition_never_wrote_are_refused(tmp_path, scope):
    path = _ome_zarr(tmp_path, scope)
    chunks = sorted(p for p in path.rglob("*") if p.is_file() and "c" in p.parts)
    chunks[-1].unlink()  # the last plane's chunk never reached the disk
    with pytest.raises(ValueError, match="1 of 6 planes were never written"):
        read_raw_image(path, PIXEL_UM, "test")


def test_what_is_not_a_dataset_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_raw_image(tmp_path / "absent", PIXEL_UM, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a readable NDTiff dataset"):
        read_raw_image(tmp_path / "empty", PIXEL_UM, "test")


def test_a_plain_tiff_still_reads_and_takes_the_expected_pixel(tmp_path):
    path = tmp_path / "frames.tif"
    frames = np.full((2, 16, 16), 100, np.uint16)
    tifffile.imwrite(path, frames)
    image = read_raw_image(path, PIXEL_UM, "test")
    assert np.array_equal(image.data, frames)
    assert image.pixel_size_um == PIXEL_UM


def test_restore_reads_an_ndtiff_as_it_reads_the_same_frames_in_a_tiff(tmp_path, scope):
    from livedecon.engines._bundle import ModelBundle, find_bundle
    from livedecon.engines._offline import restore_file
    from livedecon.engines._ome_tiff import read_ome_tiff

    path = _ndtiff(tmp_path, scope)
    frames = read_raw_image(path, PIXEL_UM, "test").data[:, :2]
    bundle = ModelBundle.load(find_bundle("fast2d-sim"))
    tiff = tmp_path / "frames.tif"
    tifffile.imwrite(tiff, frames)
    from_tiff = read_ome_tiff(restore_file(bundle, tiff, tmp_path / "a.ome.tif")).data
    from_ndtiff = read_ome_tiff(restore_file(bundle, path, tmp_path / "b.ome.tif")).data
    assert from_ndtiff.shape == (2, 4, 128, 128)
    assert np.array_equal(from_ndtiff[:, :2], from_tiff)


def test_an_ome_tiffs_pixel_size_is_read_in_its_own_unit(tmp_path):
    """OME states the unit of each size; 65 nm is 0.065 um, not 65 um."""
    path = tmp_path / "nm.ome.tif"
    sampling = {"PhysicalSizeX": 65, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 65}
    sampling |= {"PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.2, "PhysicalSizeZUnit": "µm"}
    stack = np.zeros((3, 8, 8), np.uint16)
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "ZYX", **sampling})
    image = read_raw_image(path, 0.065, "test")
    assert (image.pixel_size_um, image.z_step_um) == (pytest.approx(0.065), pytest.approx(0.2))


def test_unreadable_ome_metadata_is_named(tmp_path):
    path = tmp_path / "broken.ome.tif"
    ome = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
    broken = f'<?xml version="1.0"?><OME xmlns="{ome}"><Image ID="Image:0"/></OME>'  # no Pixels
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16), description=broken)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
    with pytest.raises(ValueError, match="OME metadata cannot be read"):
        read_raw_image(path, PIXEL_UM, "test")
