"""The restored-data writer: live appends, crash-readable pages, OME-TIFF on close."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
from ome_types import validate_xml
from plane_records import acquisition, info

from livedecon.daemon._writer import (
    OME_NS,
    AcquisitionWriter,
    OutputBusyError,
    PlaneFile,
    in_units,
    output_path,
    read_planes,
    units_per_count,
    written_keys,
)


def plane(value: float, dtype=np.uint16, shape=(16, 24)) -> np.ndarray:
    rng = np.random.default_rng(int(value))
    return (rng.integers(0, 1000, shape) + value).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.uint8])
def test_planes_and_records_round_trip(tmp_path: Path, dtype) -> None:
    writer = AcquisitionWriter(tmp_path, acquisition())
    written = []
    for i in range(4):
        pixels = plane(i, dtype)
        record = info(i, time=i, weights_version=1 + i // 2)
        path = writer.write(pixels, record)
        written.append((record, pixels))
        # readable at once, before close, from another handle
        assert [r for r, _ in read_planes(path)] == [r for r, _ in written]
    assert writer.close() == [path] == writer.close()
    assert path == output_path(tmp_path, 0, "GFP")
    back = read_planes(path)
    assert [r for r, _ in back] == [r for r, _ in written]  # the first one's survives the OME
    for (_, got), (_, sent) in zip(back, written, strict=True):
        assert got.dtype == sent.dtype
        np.testing.assert_array_equal(got, sent)
    assert written_keys(tmp_path) == {(i, 0, "GFP", 0) for i in range(4)}


def test_uint16_output_keeps_photons_to_half_a_count_and_counts_what_it_clips(
    tmp_path: Path,
) -> None:
    per_count = units_per_count("uint16", bright_level=80.0)  # 80 e- -> 256 counts
    assert per_count == pytest.approx(80.0 / 256)
    assert units_per_count("float32", bright_level=80.0) is None
    photons = np.random.default_rng(3).gamma(2.0, 20.0, (16, 24)).astype(np.float32)
    photons[0, :3] = (-0.5, 30000.0, 65535 * per_count)  # below 0, above the range, at its top
    writer = AcquisitionWriter(tmp_path, acquisition())
    path = writer.write(photons, info(0, time=0, units_per_count=per_count))
    writer.close()
    ((record, stored),) = read_planes(path)
    assert stored.dtype == np.uint16
    assert record.units_per_count == per_count
    assert record.clipped_px == 1  # 30,000 e- is 96,000 counts; the range's top itself fits
    back = in_units(stored, record)
    assert (back[0, 0], back[0, 1]) == (0.0, pytest.approx(65535 * per_count))
    inside = np.ones_like(photons, dtype=bool)
    inside[0, :2] = False
    assert np.abs(back - photons)[inside].max() <= per_count / 2 * (1 + 1e-5)


def test_finalised_file_is_ome_with_sizes_and_provenance(tmp_path: Path) -> None:
    writer = AcquisitionWriter(tmp_path, acquisition())
    for i in range(3):
        writer.write(plane(i, np.float32), info(i, time=i, weights_version=1 + i // 2))
    (path,) = writer.close()
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        validate_xml(tif.ome_metadata)  # against the OME 2016-06 schema ome-types ships
        assert len(tif.pages) == 3
        series = tif.series[0]
        assert series.shape == (3, 16, 24)
        assert series.axes == "TYX"
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        np.testing.assert_array_equal(series.asarray()[2], plane(2, np.float32))
        root = ET.fromstring(tif.ome_metadata)
    assert pixels["PhysicalSizeX"] == pixels["PhysicalSizeY"] == 0.05
    assert "PhysicalSizeZ" not in pixels
    assert (pixels["SizeT"], pixels["SizeZ"], pixels["SizeC"], pixels["Type"]) == (3, 1, 1, "float")
    assert pixels["TimeIncrement"] == 2.0
    ns = {"ome": OME_NS}
    assert [float(p.get("DeltaT")) for p in root.findall(".//ome:Plane", ns)] == [0, 2, 4]
    # each plane's model: Plane -> AnnotationRef -> MapAnnotation(bundle_id, weights_version)
    notes = {
        n.get("ID"): {m.get("K"): m.text for m in n.iter(f"{{{OME_NS}}}M")}
        for n in root.iter(f"{{{OME_NS}}}MapAnnotation")
    }
    versions = [
        notes[p.find("ome:AnnotationRef", ns).get("ID")]["weights_version"]
        for p in root.findall(".//ome:Plane", ns)
    ]
    assert versions == ["1", "1", "2"]
    assert {n["bundle_id"] for n in notes.values() if "bundle_id" in n} == {"tiny@0123456789ab"}


def test_out_of_order_and_missing_planes_map_to_their_place(tmp_path: Path) -> None:
    record = acquisition("3d", z_count=3)
    writer = AcquisitionWriter(tmp_path, record)
    order = [(1, 2), (0, 0), (1, 0), (0, 2), (0, 1)]  # (t=1, z=1) never arrives
    for i, (t, z) in enumerate(order):
        writer.write(np.full((8, 8), 10 * t + z + 1, np.uint16), info(i, time=t, z=z))
    (path,) = writer.close()
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        data = tif.series[0].asarray()
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert pixels["PhysicalSizeZ"] == 0.25
    assert data.shape == (2, 3, 8, 8)
    expected = [[1, 2, 3], [11, 0, 13]]  # the missing plane reads as zeros
    assert data[:, :, 0, 0].tolist() == expected
    tiffdata = {(d["FirstT"], d["FirstZ"]): d["IFD"] for d in pixels["TiffData"]}
    assert tiffdata == {(t, z): i for i, (t, z) in enumerate(order)}


CHILD = """
import sys
import numpy as np
from pathlib import Path
from livedecon.daemon._writer import PlaneFile, PlaneRecord
target = PlaneFile(Path(sys.argv[1]))
for i in range(100000):
    record = PlaneRecord(frame_id=i, time=i, z=0, channel=0, position=0, bundle_id="b",
                         weights_version=1)
    target.append(np.full((256, 256), i, np.uint16), record)
    print(i, flush=True)
"""


def test_kill_9_leaves_every_written_page_readable(tmp_path: Path) -> None:
    path = output_path(tmp_path, 0, 0)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    for _ in range(30):  # let it get going, then kill it mid-stream
        assert child.stdout.readline()
    os.kill(child.pid, signal.SIGKILL)
    reported = 30 + len(child.stdout.read().split())
    child.wait()
    child.stdout.close()
    planes = read_planes(path)
    assert reported <= len(planes) <= reported + 1  # a page can land just before the print
    for i, (record, pixels) in enumerate(planes):
        assert record.frame_id == i
        assert (pixels == i).all()
    # a restarted writer continues the file, and close makes it whole OME
    writer = AcquisitionWriter(tmp_path, acquisition())
    writer.write(np.full((256, 256), 7, np.uint16), info(5000, time=5000, channel=0))
    writer.close()
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert len(tif.pages) == len(planes) + 1
    assert [r.frame_id for r, _ in read_planes(path)] == [*range(len(planes)), 5000]


def test_torn_last_page_is_skipped_never_raised(tmp_path: Path) -> None:
    writer = AcquisitionWriter(tmp_path, acquisition())
    sizes = []
    for i in range(3):
        path = writer.write(plane(i), info(i, time=i))
        sizes.append(path.stat().st_size)  # each page ends the file when written
    data = path.read_bytes()  # as a kill would leave it: never finalised
    writer.close()
    cut = tmp_path / "cut.ome.tif"
    for end in [*range(sizes[1], len(data), 97), len(data) - 1]:
        cut.write_bytes(data[:end])
        assert [r.frame_id for r, _ in read_planes(cut)] == [0, 1], end
    cut.write_bytes(data)
    assert len(read_planes(cut)) == 3
    # a link to a page that was never written (what a kill between link and IFD leaves)
    zeroed = bytearray(data)
    zeroed[sizes[1] :] = bytes(len(data) - sizes[1])
    cut.write_bytes(bytes(zeroed))
    assert [r.frame_id for r, _ in read_planes(cut)] == [0, 1]


def test_shape_dtype_and_name_mismatches_are_refused(tmp_path: Path) -> None:
    writer = AcquisitionWriter(tmp_path, acquisition())
    writer.write(plane(0), info(0, time=0))
    with pytest.raises(ValueError, match="does not match the file's planes"):
        writer.write(plane(1, shape=(8, 8)), info(1, time=1))
    with pytest.raises(ValueError, match="does not match the file's planes"):
        writer.write(plane(1, np.float32), info(1, time=1))
    with pytest.raises(ValueError, match="uint8, uint16 or float32"):
        writer.write(plane(1, np.float64), info(1, time=1, channel="RFP"))
    with pytest.raises(ValueError, match=r"a plane is \(Y, X\)"):
        writer.write(np.zeros((2, 4, 4), np.uint16), info(1, time=1, channel="CY5"))
    # names that once met after sanitising now get files of their own
    slashed = writer.write(plane(1), info(1, time=1, channel="GFP/2", position=1))
    underscored = writer.write(plane(1), info(1, time=1, channel="GFP_2", position=1))
    assert slashed != underscored
    assert slashed.parent == underscored.parent == tmp_path
    assert (
        output_path(tmp_path, "A1 well", "488 nm/µ").name
        == "restored_pA1%20well_c488%20nm%2F%C2%B5.ome.tif"
    )
    # another writer cannot interleave pages into a file that is open
    with pytest.raises(OutputBusyError, match="another process is writing"):
        PlaneFile(output_path(tmp_path, 0, "GFP"))
    paths = writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(plane(2), info(2, time=2))
    assert [len(read_planes(p)) for p in paths] == [1, 1, 1]


def test_page_records_are_plain_json(tmp_path: Path) -> None:
    """An unfinalised file describes itself with nothing but tifffile and json."""
    writer = AcquisitionWriter(tmp_path, acquisition())
    path = writer.write(plane(0), info(0, time=0, channel=2, position="Pos-7"))
    with tifffile.TiffFile(path) as tif:
        described = json.loads(tif.pages[0].description)
    assert described["channel"] == 2
    assert described["position"] == "Pos-7"
    assert described["bundle_id"] == "tiny@0123456789ab"
    writer.close()
