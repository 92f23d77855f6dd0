"""`livedecon reprocess`: after a kill, every acknowledged plane ends up readable on disk."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile
from plane_records import ndtiff
from typer.testing import CliRunner

from livedecon.cli import app
from livedecon.daemon._journal import (
    AcquisitionRecord,
    Journal,
    JournalEntry,
    write_acquisition_record,
)
from livedecon.daemon._processing import PassThrough, open_processor
from livedecon.daemon._protocol import Axes, Plan, frame_header
from livedecon.daemon._reprocess import ReprocessError, reprocess
from livedecon.daemon._spill import SpillStore
from livedecon.daemon._writer import (
    AcquisitionWriter,
    PlaneRecord,
    output_path,
    read_planes,
    stored_plane,
    units_per_count,
)
from livedecon.engines._bundle import find_bundle

ACQ = "acq-1"
PIXEL_UM = 0.065


def record(mode: str = "2d", **changes) -> AcquisitionRecord:
    plan = Plan(
        mode=mode,
        z_count=4 if mode == "3d" else None,
        z_step_um=0.3 if mode == "3d" else None,
        pixel_size_um=PIXEL_UM,
        channels=["DAPI"],
    )
    fields = {
        "acquisition_id": ACQ,
        "plan": plan,
        "processor": "pass-through",
        "bundle_path": None,
        "bundle_id": "pass-through",
        "weights_version": 0,
        "backend": "none",
        "input_pixel_um": PIXEL_UM,
        "output_pixel_um": PIXEL_UM,
        "units": "camera counts",
    }
    return AcquisitionRecord(**(fields | changes))


def raw_frame(seed: int, shape: tuple[int, ...] = (16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 4000, shape).astype(np.uint16)


def acquisition(tmp_path: Path, acq: AcquisitionRecord, frames: list[tuple[Axes, np.ndarray]]):
    """An output directory as the daemon leaves it: record and journal of acknowledged frames."""
    directory = tmp_path / "out" / ACQ
    write_acquisition_record(directory, acq)
    journal = Journal(directory)
    for frame_id, (axes, pixels) in enumerate(frames):
        entry = JournalEntry(
            frame_id=frame_id,
            axes=axes,
            dtype=str(pixels.dtype),
            shape=pixels.shape,
            timestamp_s=100.0 + frame_id,
        )
        journal.append(entry)
    journal.close()
    return directory


def plane_record(frame_id: int, axes: Axes, z: int | None = None, **changes) -> PlaneRecord:
    fields = {
        "frame_id": frame_id,
        "time": axes.time,
        "z": axes.z if z is None else z,
        "channel": axes.channel,
        "position": axes.position,
        "timestamp_s": 100.0 + frame_id,
        "bundle_id": "pass-through",
        "weights_version": 0,
    }
    return PlaneRecord(**(fields | changes))


def crashed_file(path: Path, planes: list[tuple[PlaneRecord, np.ndarray]], torn: int = 0) -> None:
    """Pages as a killed daemon leaves them: never finalised, the last `torn` bytes lost."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for info, pixels in planes:
            tif.write(pixels, contiguous=False, description=info.model_dump_json(), metadata=None)
    if torn:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - torn)


def spill(directory: Path, frame_id: int, axes: Axes, pixels: np.ndarray) -> Path:
    header = frame_header(ACQ, frame_id, pixels, axes, timestamp_s=100.0 + frame_id)
    return SpillStore(directory.parent / "spill").put(header, pixels)


def test_missing_planes_come_back_from_spill_and_raw_then_nothing_to_do(tmp_path: Path) -> None:
    axes = [Axes(time=t, channel="DAPI") for t in range(6)]
    frames = [(a, raw_frame(a.time)) for a in axes]
    directory = acquisition(tmp_path, record(), frames)
    path = output_path(directory, 0, "DAPI")
    # t=0..2 written, t=3 torn mid-page by the kill, t=4 and t=5 never written
    written = [(plane_record(t, axes[t]), frames[t][1]) for t in range(4)]
    crashed_file(path, written, torn=100)
    spill(directory, 3, axes[3], frames[3][1])
    leftover = spill(directory, 1, axes[1], frames[1][1])  # written, not yet removed
    raw = ndtiff(tmp_path, {(a.time, a.channel): p for a, p in frames}, ("time", "channel"))
    steps = []

    report = reprocess(directory, raw, progress=lambda done, total: steps.append((done, total)))

    assert (report.acknowledged, report.already_written) == (6, 3)
    assert (report.recreated_from_spill, report.recreated_from_raw) == (1, 2)
    assert report.unrecoverable == []
    assert report.files == [path]
    assert steps[0] == (0, 3)
    assert steps[-1] == (3, 3)
    planes = read_planes(path)
    assert [r.time for r, _ in planes] == list(range(6))
    assert [r.frame_id for r, _ in planes] == list(range(6))
    for (info, got), (_, sent) in zip(planes, frames, strict=True):
        np.testing.assert_array_equal(got, sent)
        assert info.bundle_id == "pass-through"
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert tif.series[0].shape == (6, 16, 16)
    assert not leftover.exists()
    assert not list((directory.parent / "spill").rglob("*.json"))

    before = (path.read_bytes(), path.stat().st_mtime_ns)
    again = reprocess(directory, raw)
    assert again.files == []
    assert (again.already_written, again.recreated_from_spill, again.recreated_from_raw) == (
        6,
        0,
        0,
    )
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    result = CliRunner().invoke(app, ["reprocess", str(directory), "--raw", str(raw)])
    assert result.exit_code == 0, result.output
    assert "every acknowledged plane is on disk" in " ".join(result.output.split())


@dataclass
class StackModel:
    """A stand-in 3D model whose every output plane depends on the whole stack."""

    name: str = "stack-model"
    bundle_id: str = "stack-model@0123"
    weights_version: int = 3
    upscale: int = 2
    is_3d: bool | None = True
    units: str = "test units"
    bright_level: float = 100.0
    calls: list[tuple[int, ...]] = field(default_factory=list)

    def output_depth(self, depth: int) -> int:
        return depth

    def process(self, items: list[np.ndarray], streams=None) -> list[np.ndarray]:
        self.calls.extend(item.shape for item in items)
        return [
            np.kron(item.astype(np.float32), np.ones((1, 2, 2), np.float32))
            + np.float32(item.mean())
            for item in items
        ]


def test_3d_stack_with_missing_planes_is_restored_whole(tmp_path: Path) -> None:
    model = StackModel()
    stacks = {t: raw_frame(10 + t, (4, 16, 16)) for t in range(3)}
    frames = [(Axes(time=0, z=z), stacks[0][z]) for z in range(4)]  # plane by plane
    frames.append((Axes(time=1), stacks[1]))  # a whole stack in one frame
    frames += [(Axes(time=2, z=z), stacks[2][z]) for z in range(3)]  # z=3 was never sent
    acq = record("3d", processor="model", bundle_id=model.bundle_id, output_pixel_um=0.0325)
    directory = acquisition(tmp_path, acq, frames)
    path = output_path(directory, 0, 0)
    restored_0 = model.process([stacks[0]])[0]
    old = [
        (plane_record(z, Axes(time=0, z=z), bundle_id="live@1", weights_version=1), restored_0[z])
        for z in (2, 0)
    ]
    crashed_file(path, old)
    spill(directory, 4, Axes(time=1), stacks[1])
    raw = ndtiff(
        tmp_path,
        {(t, z): stacks[t][z] for t in (0, 2) for z in range(4 if t == 0 else 3)},
        ("time", "z"),
    )
    model.calls.clear()

    report = reprocess(directory, raw, processor=model)

    assert report.unrecoverable == []
    assert (report.recreated_from_raw, report.recreated_from_spill) == (2 + 3, 4)
    assert model.calls == [(4, 16, 16)] * 3  # one whole stack per timepoint
    planes = {(r.time, r.z): (r, pixels) for r, pixels in read_planes(path)}
    assert list(planes) == [(t, z) for t in range(3) for z in range(4 if t < 2 else 3)]
    for z in range(4):  # the old planes kept, the missing ones from the same whole stack
        info, pixels = planes[(0, z)]
        np.testing.assert_allclose(pixels, restored_0[z], rtol=1e-6)
        assert info.bundle_id == ("live@1" if z in (0, 2) else model.bundle_id)
    restored_1 = model.process([stacks[1]])[0]
    np.testing.assert_allclose(planes[(1, 3)][1], restored_1[3], rtol=1e-6)
    # the incomplete stack: the missing z=3 borrows z=2, as the daemon does
    volume = np.concatenate([stacks[2][:3], stacks[2][2:3]])
    np.testing.assert_allclose(planes[(2, 1)][1], model.process([volume])[0][1], rtol=1e-6)
    assert planes[(2, 1)][0].incomplete_stack
    assert not planes[(1, 0)][0].incomplete_stack
    assert planes[(2, 1)][0].weights_version == 3
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert tif.series[0].shape == (3, 4, 32, 32)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeZ"]) == (0.0325, 0.3)
    assert reprocess(directory, raw, processor=model).files == []


@dataclass
class IsotropicModel(StackModel):
    """A stand-in Self-Net chain: every stack resampled to twice its planes, less one."""

    bundle_id: str = "stack-model@0123+sn@4567"

    def output_depth(self, depth: int) -> int:
        return 2 * depth - 1

    def process(self, items: list[np.ndarray], streams=None) -> list[np.ndarray]:
        self.calls.extend(item.shape for item in items)
        outputs = []
        for item in items:
            up = np.kron(item.astype(np.float32), np.ones((1, 2, 2), np.float32))
            between = 0.5 * (up[1:] + up[:-1])
            resampled = np.empty((2 * len(up) - 1, *up.shape[1:]), np.float32)
            resampled[0::2], resampled[1::2] = up, between
            outputs.append(resampled + np.float32(item.mean()))
        return outputs


def test_a_self_net_chain_recreates_every_resampled_plane(tmp_path: Path) -> None:
    """7 planes written per stack of 4: a stack missing any is restored whole from its
    acquired planes, and each recreated plane carries its nearest acquired plane's record."""
    model = IsotropicModel()
    stacks = {t: raw_frame(20 + t, (4, 16, 16)) for t in range(2)}
    frames = [(Axes(time=t, z=z), stacks[t][z]) for t in range(2) for z in range(4)]
    acq = record(
        "3d",
        processor="model",
        bundle_id=model.bundle_id,
        output_pixel_um=0.0325,
        isotropic_bundle_path="/bundles/sn",
        output_z_count=7,
        output_z_step_um=0.15,
    )
    directory = acquisition(tmp_path, acq, frames)
    path = output_path(directory, 0, 0)
    restored_0 = model.process([stacks[0]])[0]
    kept = [(plane_record(z // 2, Axes(time=0), z=z), restored_0[z]) for z in range(5)]
    crashed_file(path, kept)  # stack 0: planes 5 and 6 lost; stack 1: all of it
    raw = ndtiff(
        tmp_path, {(t, z): stacks[t][z] for t in range(2) for z in range(4)}, ("time", "z")
    )
    model.calls.clear()

    report = reprocess(directory, raw, processor=model)

    assert report.unrecoverable == []
    assert (report.acknowledged, report.restored_planes, report.already_written) == (8, 14, 5)
    assert report.recreated_from_raw == 2 + 7
    assert model.calls == [(4, 16, 16)] * 2
    planes = {(r.time, r.z): (r, pixels) for r, pixels in read_planes(path)}
    assert list(planes) == [(t, z) for t in range(2) for z in range(7)]
    restored_1 = model.process([stacks[1]])[0]
    for z in range(7):
        np.testing.assert_allclose(planes[(0, z)][1], restored_0[z], rtol=1e-6)
        np.testing.assert_allclose(planes[(1, z)][1], restored_1[z], rtol=1e-6)
    # output plane k lies at acquired z = k / 2: frame ids of the nearest (lower on a tie)
    assert [planes[(1, z)][0].frame_id for z in range(7)] == [4, 4, 5, 5, 6, 6, 7]
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].shape == (2, 7, 32, 32)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert pixels["PhysicalSizeZ"] == 0.15
    assert reprocess(directory, raw, processor=model).files == []


def test_a_stack_missing_a_raw_plane_is_unrecoverable(tmp_path: Path) -> None:
    stack = raw_frame(3, (4, 16, 16))
    frames = [(Axes(time=0, z=z), stack[z]) for z in range(4)]
    directory = acquisition(tmp_path, record("3d"), frames)
    crashed_file(output_path(directory, 0, 0), [(plane_record(0, Axes(time=0, z=0)), stack[0])])
    raw = ndtiff(tmp_path, {(0, z): stack[z] for z in (0, 1, 3)}, ("time", "z"))  # no z=2
    report = reprocess(directory, raw)
    assert sorted(report.unrecoverable) == [(0, z, 0, 0) for z in (1, 2, 3)]
    assert report.recreated_from_raw == 0
    assert any("z=2" in note for note in report.notes)


def test_unrecoverable_plane_is_reported_and_the_cli_exits_1(tmp_path: Path) -> None:
    frames = [(Axes(time=t), raw_frame(t)) for t in range(3)]
    directory = acquisition(tmp_path, record(), frames)
    path = output_path(directory, 0, 0)
    crashed_file(path, [(plane_record(0, frames[0][0]), frames[0][1])])
    spill(directory, 1, frames[1][0], frames[1][1])  # t=2: in no source at all

    result = CliRunner().invoke(app, ["reprocess", str(directory)])

    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "1 recreated from the spill store" in text
    assert "1 unrecoverable" in text
    assert "no --raw given" in text
    assert [r.time for r, _ in read_planes(path)] == [0, 1]  # what could be saved, was
    report = reprocess(directory)
    assert report.unrecoverable == [(2, 0, 0, 0)]
    assert report.files == []  # already finalised: left as it is


def model_acquisition(tmp_path: Path, output_dtype: str = "float32"):
    """The shipped fast model's processor, two raw frames and the record of an acquisition
    restored with it."""
    bundle = shutil.copytree(find_bundle("fast2d-sim"), tmp_path / "fast2d-sim")
    processor = open_processor(bundle, "onnxruntime", frame_shapes=((64, 64),))
    frames = [(Axes(time=t), raw_frame(t, (64, 64)) // 16 + 100) for t in range(2)]
    acq = record(
        processor="model",
        bundle_path=str(bundle),
        bundle_id=processor.bundle_id,
        weights_version=processor.weights_version,
        output_pixel_um=PIXEL_UM / 2,
    )
    plan = acq.plan.model_copy(update={"output_dtype": output_dtype})
    return processor, frames, acq.model_copy(update={"plan": plan})


def test_a_real_bundle_restores_what_the_daemon_would_have(tmp_path: Path) -> None:
    processor, frames, acq = model_acquisition(tmp_path)
    directory = acquisition(tmp_path, acq, frames)
    first = processor.process([frames[0][1]])[0]
    meta = {"bundle_id": processor.bundle_id, "weights_version": processor.weights_version}
    crashed_file(output_path(directory, 0, 0), [(plane_record(0, frames[0][0], **meta), first)])
    spill(directory, 1, frames[1][0], frames[1][1])

    report = reprocess(directory, backend="onnxruntime")

    assert report.recreated_from_spill == 1
    (_, old), (info, new) = read_planes(output_path(directory, 0, 0))
    assert new.shape == (128, 128)
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, processor.process([frames[1][1]])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(old, first)
    assert (info.bundle_id, info.weights_version) == (processor.bundle_id, 1)

    # refused unless a processor is given: the weights changed since the acquisition, or the
    # same weights but other Richardson-Lucy steps after them than the daemon ran
    assert processor.finishing == ""
    changes = (
        ({"bundle_id": "fast2d-sim@000000000000"}, "weights changed"),
        ({"finishing": "2 Richardson-Lucy steps on the frame"}, "refinement changed"),
    )
    for frame_id, (change, refusal) in enumerate(changes, start=2):
        write_acquisition_record(directory, acq.model_copy(update=change))
        journal = Journal(directory)
        axes = Axes(time=frame_id)
        journal.append(JournalEntry(frame_id=frame_id, axes=axes, dtype="uint16", shape=(64, 64)))
        journal.close()
        spill(directory, frame_id, axes, frames[1][1])
        with pytest.raises(ReprocessError, match=refusal):
            reprocess(directory, backend="onnxruntime")
        assert reprocess(directory, processor=processor).recreated_from_spill == 1


def test_uint16_output_is_recreated_as_the_daemon_stores_it(tmp_path: Path) -> None:
    """An acquisition saved as uint16: the recreated plane has the acquisition's one scale and
    the counts the daemon would have written, next to the planes it did write."""
    processor, frames, acq = model_acquisition(tmp_path, "uint16")
    directory = acquisition(tmp_path, acq, frames)
    per_count = units_per_count("uint16", processor.bright_level)
    meta = {
        "bundle_id": processor.bundle_id,
        "weights_version": processor.weights_version,
        "units_per_count": per_count,
    }
    first, first_record = stored_plane(
        processor.process([frames[0][1]])[0], plane_record(0, frames[0][0], **meta)
    )
    crashed_file(output_path(directory, 0, 0), [(first_record, first)])
    spill(directory, 1, frames[1][0], frames[1][1])

    assert reprocess(directory, backend="onnxruntime").recreated_from_spill == 1

    (_, old), (info, new) = read_planes(output_path(directory, 0, 0))
    np.testing.assert_array_equal(old, first)
    assert new.dtype == np.uint16
    assert info.units_per_count == per_count
    expected, _ = stored_plane(processor.process([frames[1][1]])[0], info)
    assert np.abs(new.astype(np.int32) - expected).max() <= 1  # the same engine, same counts


def test_bad_directories_and_a_running_daemon_get_clear_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["reprocess", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "no such directory" in " ".join(result.output.split())
    result = runner.invoke(app, ["reprocess", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a livedecon output" in " ".join(result.output.split())

    frames = [(Axes(time=0), raw_frame(0))]
    directory = acquisition(tmp_path, record(), frames)
    result = runner.invoke(app, ["reprocess", str(directory), "--raw", str(tmp_path / "gone")])
    assert result.exit_code == 2
    assert "no such raw dataset" in " ".join(result.output.split())
    not_ndtiff = tmp_path / "plain"
    not_ndtiff.mkdir()
    with pytest.raises(ReprocessError, match="not a readable NDTiff dataset"):
        reprocess(directory, not_ndtiff)

    writer = AcquisitionWriter(directory, record())
    writer.write(frames[0][1], plane_record(0, frames[0][0]))
    with pytest.raises(ReprocessError, match="still writing"):
        reprocess(directory)
    writer.close()
    assert reprocess(directory).already_written == 1


def test_pass_through_processor_is_the_default_for_a_pass_through_record(tmp_path: Path) -> None:
    frames = [(Axes(time=0, position="Pos-1", channel=0), raw_frame(0, (8, 12)))]
    directory = acquisition(tmp_path, record(), frames)
    raw = ndtiff(tmp_path, {(0, 0): frames[0][1]}, ("time", "channel"))
    report = reprocess(directory, raw)
    # the raw dataset has no position axis (one field of view): the plane is found without it
    assert report.recreated_from_raw == 1
    ((info, pixels),) = read_planes(output_path(directory, "Pos-1", 0))
    assert info.position == "Pos-1"
    assert info.bundle_id == PassThrough().bundle_id
    np.testing.assert_array_equal(pixels, frames[0][1])
