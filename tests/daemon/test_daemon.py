"""The daemon across real processes: `livedecon serve` in a subprocess, clients over ZMQ."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tifffile
import zmq
from daemon_harness import process_memory_mb, receive_all, send_and_flush, start_daemon, subscriber
from plane_records import assert_same_as_tiff

from livedecon.daemon._client import DaemonClient, DaemonError, DaemonUnavailable
from livedecon.daemon._journal import read_journal
from livedecon.daemon._launcher import DaemonProcess
from livedecon.daemon._protocol import (
    PROTOCOL_VERSION,
    Axes,
    ErrorCode,
    Plan,
    Topic,
    frame_header,
)
from livedecon.daemon._writer import in_units, output_path, read_planes
from livedecon.daemon._zarr_output import is_complete, zarr_path
from livedecon.engines._bundle import ModelBundle, find_bundle
from livedecon.engines._runtime import TorchRuntime
from livedecon.engines._tiling import restore_electrons

PIXEL_UM = 0.065  # the shipped fast2d-sim bundle's camera pixel


@pytest.fixture(scope="module")
def pass_through(tmp_path_factory) -> DaemonProcess:
    """One pass-through daemon shared by the tests that only need transport."""
    daemon = start_daemon(tmp_path_factory.mktemp("daemon"), limits={"max_frame_pixels": 4096})
    yield daemon
    daemon.stop()


def frames(n: int, shape=(32, 32), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 1000, shape).astype(np.uint16) for _ in range(n)]


@pytest.mark.parametrize("output_dtype", ["float32", "uint16"])
def test_every_frame_is_acknowledged_restored_and_written_with_its_metadata(tmp_path, output_dtype):
    bundle_dir = find_bundle("fast2d-sim")
    daemon = start_daemon(tmp_path, bundle="fast2d-sim", storage={"ome_zarr": True})
    try:
        images = frames(12, (64, 64))
        with daemon.client() as client:
            plan = Plan(pixel_size_um=PIXEL_UM, time_interval_s=2, output_dtype=output_dtype)
            started = client.start("timelapse", plan)
            for i, image in enumerate(images):
                client.send(
                    image, Axes(time=i // 2, channel=["GFP", "RFP"][i % 2]), timestamp_s=100.0 + i
                )
            client.flush()
            state = client.end(wait_s=60)
    finally:
        assert daemon.stop() == 0
    assert state["acknowledged"] == state["restored"] == state["written"] == 12
    directory = daemon.config.output_dir / "timelapse"
    assert started["output"] == str(directory)
    assert [e.frame_id for e in read_journal(directory)] == list(range(12))
    bundle = ModelBundle.load(bundle_dir)
    reference = TorchRuntime(bundle.manifest.network, bundle.state_dict)
    norm = bundle.manifest.normalisation
    for c, channel in enumerate(["GFP", "RFP"]):
        path = output_path(directory, 0, channel)
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
            assert float(pixels["PhysicalSizeX"]) == pytest.approx(PIXEL_UM / 2)
        planes = read_planes(path)
        assert [r.time for r, _ in planes] == list(range(6))
        for record, plane in planes:
            assert record.channel == channel
            assert record.bundle_id == bundle.bundle_id
            assert record.weights_version == bundle.manifest.weights_version
            assert record.timestamp_s == 100.0 + record.frame_id
            assert plane.shape == (128, 128)
            assert plane.dtype == np.dtype(output_dtype)
            # uint16: one scale for the acquisition, from the model's normalisation
            per_count = None if output_dtype == "float32" else norm.scale_e / 4 / 256
            assert record.units_per_count == per_count
            assert record.clipped_px == 0
            # The daemon's engine (onnxruntime, batched) agrees with the torch reference.
            expected = restore_electrons(
                reference.infer,
                norm.electrons(images[record.frame_id]),
                norm.scale_e,
                reference.multiple,
                2,
            )
            rounding = per_count / 2 if per_count else 0.0
            error = np.abs(in_units(plane, record) - expected).max()
            assert error <= 1e-3 * expected.max() + rounding
        assert {r.frame_id % 2 for r, _ in planes} == {c}
        assert is_complete(zarr_path(path))  # the OME-Zarr copy, same dtype and values
        assert_same_as_tiff(path)


def _raw_request(socket: zmq.Socket, parts: list) -> dict:
    socket.send_multipart(parts)
    assert socket.poll(10_000), "no reply"
    return json.loads(socket.recv())


def test_every_bad_input_gets_its_error_and_the_daemon_keeps_serving(pass_through):
    with pass_through.client() as client:
        client.start("bad-inputs", Plan(pixel_size_um=0.1, z_count=None))
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(pass_through.ingest)
    image = frames(1)[0]

    def header(**changes) -> dict:
        base = json.loads(frame_header("bad-inputs", 10, image, Axes()).model_dump_json())
        return {**base, **changes}

    def send(head: dict, payload: bytes | None = image.tobytes()) -> dict:
        parts = [json.dumps(head).encode()] + ([payload] if payload is not None else [])
        return _raw_request(socket, parts)

    floats = np.full((32, 32), np.nan, np.float32)
    cases = {
        ErrorCode.BAD_JSON: _raw_request(socket, [b"{not json", image.tobytes()]),
        ErrorCode.UNSUPPORTED_VERSION: send(header(version=PROTOCOL_VERSION + 1)),
        ErrorCode.UNKNOWN_KIND: send(header(kind="teleport")),
        ErrorCode.BAD_DTYPE: send(header(dtype="int64")),
        ErrorCode.PAYLOAD_LENGTH: send(header(), image.tobytes()[:-2]),
        ErrorCode.MISSING_PAYLOAD: send(header(), None),
        ErrorCode.TOO_LARGE: send(header(shape=[128, 128]), np.zeros((128, 128), "u2").tobytes()),
        ErrorCode.NON_FINITE: send(header(dtype="float32"), floats.tobytes()),
        ErrorCode.UNKNOWN_ACQUISITION: send(header(acquisition_id="never-started")),
        ErrorCode.BAD_HEADER: send(header(frame_id=-1)),
        ErrorCode.PLAN_MISMATCH: send(header(shape=[2, 16, 32])),
    }
    for code, reply in cases.items():
        assert reply["ok"] is False, (code, reply)
        assert reply["code"] == code.value, (code, reply)
        assert len(reply["message"]) > 15
    assert send(header())["ok"] is True  # the next good frame is served
    assert send(header())["code"] == ErrorCode.FRAME_ORDER.value  # a repeat is refused
    assert send(header(frame_id=11))["ok"] is True
    socket.close()
    with pass_through.client() as client:
        client.acquisition_id = "bad-inputs"
        state = client.end(wait_s=30)
        assert state["written"] == 2
        assert client.metrics()["counters"]["errors"] >= len(cases) + 1


def test_client_errors_carry_the_daemons_sentence_and_control_calls_work(pass_through):
    with pass_through.client() as client:
        with pytest.raises(DaemonError, match="cannot load model 'no-such-bundle'") as caught:
            client.load_model("no-such-bundle")
        assert caught.value.code == "model"
        client.start("errors", Plan(pixel_size_um=0.1))
        with pytest.raises(DaemonError, match="pass-through cannot adapt its weights"):
            client.adaptation("set", plan={"mode": "adapt"})
        assert client.adaptation() == {"mode": "off"}
        with pytest.raises(DaemonError, match="already exists"):
            client.start("errors", Plan(pixel_size_um=0.1))
        client.send(np.zeros((32, 32), np.uint16))
        # a frame of another size is refused, and the refusal reaches the caller
        with pytest.raises(DaemonError, match="differs from earlier frames") as caught:
            send_and_flush(client, np.zeros((16, 16), np.uint16))
        assert caught.value.frame_id == 1
        status = client.status()
        assert status["acquisitions"]["errors"]["acknowledged"] == 1
        metrics = client.metrics()
        for stage in ("ingest", "queue", "inference", "write", "publish"):
            assert {"p50_ms", "p95_ms", "p99_ms"} <= set(metrics["latency_ms"][stage])
        client.end(wait_s=30)


def test_the_client_never_blocks_past_its_timeout_without_a_daemon():
    client = DaemonClient("tcp://127.0.0.1:9", timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        client.start("nobody", Plan(pixel_size_um=0.1))
    assert time.monotonic() - start < 1.5
    client.close()


def test_shared_memory_frames_arrive_intact_and_display_is_published(pass_through):
    restored = subscriber(pass_through, Topic.RESTORED, Topic.RAW)
    images = frames(5, seed=3)
    with pass_through.client(shared_memory_min_bytes=0, window=2) as client:
        client.start("shm", Plan(pixel_size_um=0.1))
        for i, image in enumerate(images):
            client.send(image, Axes(time=i))
            time.sleep(0.05)  # slower than the display, so nothing is replaced
        client.end(wait_s=30)
    published = receive_all(restored)
    restored.close()
    raw = [(p, pixels) for p, pixels in published if p.topic is Topic.RAW]
    published = [(p, pixels) for p, pixels in published if p.topic is Topic.RESTORED]
    assert [p.frame_id for p, _ in raw] == list(range(5))  # raw too, as it was asked for
    assert all(p.units == "camera counts" for p, _ in raw)
    assert [p.frame_id for p, _ in published] == list(range(5))
    for publication, pixels in published:
        assert publication.topic is Topic.RESTORED
        assert publication.pixel_size_um == 0.1
        assert np.array_equal(pixels, images[publication.frame_id])
    planes = read_planes(output_path(pass_through.config.output_dir / "shm", 0, 0))
    assert len(planes) == 5
    assert all(np.array_equal(p, images[r.frame_id]) for r, p in planes)


def test_z_stacks_are_assembled_projected_and_incomplete_ones_time_out(tmp_path):
    daemon = start_daemon(tmp_path, queues={"stack_timeout_s": 1.0})
    try:
        mip = subscriber(daemon, Topic.MIP, Topic.VOLUME)
        rng = np.random.default_rng(1)
        stacks = rng.integers(0, 500, (2, 4, 16, 16)).astype(np.uint16)
        with daemon.client() as client:
            client.start("zstack", Plan(mode="3d", z_count=4, z_step_um=0.2, pixel_size_um=0.1))
            for z in range(4):
                client.send(stacks[0, z], Axes(time=0, z=z))
            for z in (0, 1, 3):  # plane 2 of the second stack never comes
                client.send(stacks[1, z], Axes(time=1, z=z))
            client.timepoint_done(Axes(time=1))
            time.sleep(2.0)
            state = client.status()["acquisitions"]["zstack"]
            assert state["restored"] == 7
            assert state["incomplete_stacks"] == 1
            client.end(wait_s=30)
        published = receive_all(mip)
    finally:
        daemon.stop()
    by_topic = {}
    for publication, pixels in published:
        by_topic.setdefault(publication.topic, []).append((publication, pixels))
    assert np.array_equal(by_topic[Topic.MIP][0][1], stacks[0].max(axis=0))
    assert np.array_equal(by_topic[Topic.VOLUME][0][1], stacks[0])
    planes = read_planes(output_path(daemon.config.output_dir / "zstack", 0, 0))
    keys = {(r.time, r.z): (r, p) for r, p in planes}
    assert sorted(keys) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 3)]
    assert keys[(1, 3)][0].incomplete_stack
    assert not keys[(0, 3)][0].incomplete_stack
    assert np.array_equal(keys[(1, 3)][1], stacks[1, 3])


def test_overload_spills_to_disk_loses_nothing_and_keeps_memory_bounded(tmp_path):
    daemon = start_daemon(
        tmp_path,
        model={"pass_through_delay_ms": 10.0},
        queues={"memory_queue_mb": 4, "write_queue_planes": 4},
    )
    n, shape = 300, (512, 512)  # 150 MB sent, at several times the engine's 100 frames/s
    image = frames(1, shape)[0]
    try:
        baseline = process_memory_mb(daemon, "VmRSS")
        with daemon.client(window=16, timeout_s=30) as client:
            client.start("overload", Plan(pixel_size_um=0.1))
            started = time.monotonic()
            for i in range(n):
                client.send(image, Axes(time=i))
            sending_s = time.monotonic() - started
            state = client.end(wait_s=120)
        peak = process_memory_mb(daemon, "VmHWM")
    finally:
        daemon.stop()
    assert sending_s < n * 0.010  # the client was never held to the engine's pace
    assert state["written"] == n
    assert state["spilled"] > n // 2
    assert peak - baseline < 60, f"daemon memory grew {peak - baseline:.0f} MB"
    planes = read_planes(output_path(daemon.config.output_dir / "overload", 0, 0))
    assert [r.time for r, _ in planes] == list(range(n))  # in order, none twice
    assert not any((tmp_path / "out" / "spill").rglob("*.raw"))  # spill cleaned up


def test_curve_keys_refuse_an_unauthenticated_client(tmp_path):
    from livedecon.daemon._security import client_security, make_keys

    keys = make_keys(tmp_path / "keys")
    secure = client_security(keys["server_public"], keys["client_secret"])
    daemon = start_daemon(
        tmp_path, endpoints={"curve_keys_dir": str(tmp_path / "keys")}, secure=secure
    )
    try:
        with daemon.client(timeout_s=1.0) as client:  # the harness's authorised keys
            assert "model" in client.status()
        with DaemonClient(daemon.ingest, timeout_s=1.0) as plain, pytest.raises(DaemonUnavailable):
            plain.status()
        stranger = make_keys(tmp_path / "stranger")
        unknown = client_security(keys["server_public"], stranger["client_secret"])
        with (
            DaemonClient(daemon.ingest, timeout_s=1.0, secure=unknown) as client,
            pytest.raises(DaemonUnavailable),
        ):
            client.status()
    finally:
        daemon.stop()


def test_after_kill_9_reprocess_completes_every_acknowledged_frame(tmp_path):
    from ndstorage import NDTiffDataset
    from typer.testing import CliRunner

    from livedecon.cli import app

    n = 60
    images = frames(n, (64, 64), seed=9)
    # Micro-Manager keeps the raw data (here written as pycro-manager writes it: NDTiff).
    raw = NDTiffDataset(str(tmp_path / "raw"), name="raw", writable=True, summary_metadata={})
    for i, image in enumerate(images):
        raw.put_image({"time": i}, image, {})
    raw.finish()
    # The engine is slower than the camera, so the kill finds frames in memory and on disk.
    daemon = start_daemon(
        tmp_path,
        model={"pass_through_delay_ms": 40.0},
        queues={"memory_queue_mb": 0.05},
        storage={"ome_zarr": True},
    )
    with daemon.client() as client:
        client.start("crash", Plan(pixel_size_um=0.1))
        for i, image in enumerate(images):
            client.send(image, Axes(time=i))
        client.flush()
        while (state := client.status()["acquisitions"]["crash"])["written"] < 10:
            time.sleep(0.02)
    daemon.kill()
    assert state["acknowledged"] == n
    assert 0 < state["written"] < n  # killed mid-run
    directory = daemon.config.output_dir / "crash"
    assert len(read_journal(directory)) == n
    result = CliRunner().invoke(app, ["reprocess", str(directory), "--raw", raw.path])
    assert result.exit_code == 0, result.output
    planes = read_planes(output_path(directory, 0, 0))
    assert sorted(r.time for r, _ in planes) == list(range(n))
    for record, plane in planes:
        assert np.array_equal(plane, images[record.time])
    with tifffile.TiffFile(output_path(directory, 0, 0)) as tif:
        assert tif.is_ome
        assert tif.series[0].shape[0] == n
    assert is_complete(zarr_path(output_path(directory, 0, 0)))
    assert_same_as_tiff(output_path(directory, 0, 0))
