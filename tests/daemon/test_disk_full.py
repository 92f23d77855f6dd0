"""A full disk, for real: a small tmpfs mounted as the daemon's output root. The daemon refuses
frames with `disk_full` before its reserve is used, keeps serving display-only work, accepts
frames again by itself when space returns; a write that fails after the ack reaches the client
on its next call, the acquisition still finishes (incomplete, naming what is missing) and
`livedecon reprocess` recovers it. Skipped where mounting is not permitted (it needs root or
CAP_SYS_ADMIN), with that reason."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import send_and_flush, start_daemon

from livedecon.acquisition_hooks._stream import DaemonStream
from livedecon.daemon._client import DaemonError
from livedecon.daemon._journal import read_journal
from livedecon.daemon._protocol import Axes, Plan
from livedecon.daemon._writer import output_path, read_planes

MB = 2**20


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs at tmp_path/disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs for a full disk here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free (0: until the disk refuses)."""
    ballast = path / "ballast"
    size = free_bytes(path) - leave if leave else 1 << 40
    chunk = b"\1" * MB
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while size > 0:
            size -= os.write(fd, chunk[: min(size, MB)])
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return ballast


def test_a_full_disk_refuses_frames_before_the_reserve_and_recovers(small_disk):
    daemon = start_daemon(
        small_disk.parent,
        output_dir=str(small_disk / "out"),
        storage={"reserve_mb": 4, "free_check_ms": 50},
    )
    image = np.ones((64, 64), np.uint16)
    try:
        ballast = fill(small_disk, leave=4 * MB + 300 * 1024)  # ~30 frames above the reserve
        stream = DaemonStream("full", Plan(pixel_size_um=0.1), daemon.ingest, timeout_s=5.0)
        stream.start()
        for i in range(100):
            stream.frame(image, Axes(time=i))
            time.sleep(0.005)
        deadline = time.monotonic() + 10
        while stream.counters.sent < 100:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with daemon.client() as client:
            # display-only work goes on while the disk is full
            client.start("display", Plan(pixel_size_um=0.1, save=False))
            for i in range(5):
                client.send(image, Axes(time=i))
            client.flush()
            display = client.end(wait_s=10)
            assert display["acknowledged"] == 5
            assert client.status()["acquisitions"]["full"]["acknowledged"] < 100
        assert free_bytes(small_disk) >= 4 * MB  # the reserve was never used
        ballast.unlink()  # space returns: frames are taken again, with no restart
        time.sleep(0.2)
        for i in range(100, 110):
            stream.frame(image, Axes(time=i))
            time.sleep(0.005)
        state = stream.end(wait_s=30)
    finally:
        daemon.stop()
    counters = stream.counters.summary()
    assert counters["frames"] == counters["sent"] == 110  # the hook kept going throughout
    refused = counters["refusals"].get("disk_full", 0)
    assert 10 < refused <= 90
    assert state["acknowledged"] == 110 - refused
    assert state["written"] == state["acknowledged"]
    assert state["complete"] is True
    directory = small_disk / "out" / "full"
    planes = read_planes(output_path(directory, 0, 0))
    assert len(planes) == state["acknowledged"]
    assert {r.time for r, _ in planes} >= set(range(100, 110))
    assert len(read_journal(directory)) == state["acknowledged"]
    assert "Traceback" not in daemon.log()


def test_a_write_failing_after_the_ack_is_reported_and_recoverable(small_disk, tmp_path):
    from ndstorage import NDTiffDataset
    from typer.testing import CliRunner

    from livedecon.cli import app

    images = [np.full((64, 64), 100 + i, np.uint16) for i in range(8)]
    raw = NDTiffDataset(str(tmp_path / "raw"), name="raw", writable=True, summary_metadata={})
    for i, image in enumerate(images):
        raw.put_image({"time": i}, image, {})
    raw.finish()
    daemon = start_daemon(
        tmp_path,
        output_dir=str(small_disk / "out"),
        model={"pass_through_delay_ms": 150.0},  # frames wait in memory, acknowledged
        storage={"reserve_mb": 0, "free_check_ms": 0},
    )
    directory = small_disk / "out" / "late"
    try:
        with daemon.client() as client:
            client.start("late", Plan(pixel_size_um=0.1))
            for i in range(6):
                client.send(images[i], Axes(time=i))
            client.flush()
            ballast = fill(small_disk, leave=0)  # the disk fills after the acks
            deadline = time.monotonic() + 20
            while client.status()["acquisitions"]["late"]["write_failures"] == 0:
                assert time.monotonic() < deadline, "no write failed"
                time.sleep(0.05)
            # a full disk refuses new frames (the refusal may come back during the send
            # itself, which reads replies as it goes, or at the flush) ...
            with pytest.raises(DaemonError) as caught:
                send_and_flush(client, images[6], Axes(time=6))
            assert caught.value.code == "disk_full"
            ballast.unlink()
            time.sleep(0.1)
            client.send(images[7], Axes(time=7))  # ... and the next reply tells of the loss
            client.flush()
            assert client.write_failures > 0
            assert "recoverable" in client.warnings[-1]
            started = time.monotonic()
            state = client.end(wait_s=30)
            assert time.monotonic() - started < 10  # finished, not timed out
    finally:
        daemon.stop()
    assert state["finished"] is True
    assert state["complete"] is False
    assert state["acknowledged"] == 7
    assert state["missing"]["planes"] == state["write_failures"] > 0
    assert state["written"] + state["write_failures"] == 7
    assert all("frame" in what for what in state["missing"]["listed"])
    result = CliRunner().invoke(app, ["reprocess", str(directory), "--raw", raw.path])
    assert result.exit_code == 0, result.output
    planes = read_planes(output_path(directory, 0, 0))
    assert sorted(r.time for r, _ in planes) == [0, 1, 2, 3, 4, 5, 7]
    for record, plane in planes:
        assert np.array_equal(plane, images[record.time])
