"""An ack is a promise, and nothing is written outside the output root: file names, the
client's output_dir, symbolic links, the checks made before an ack, the journal's whole lines,
limits on headers and acquisitions, and idle acquisitions giving back their files."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from daemon_harness import send_and_flush, start_daemon

from livedecon.daemon._client import DaemonError
from livedecon.daemon._diskspace import FreeSpace, sub_path
from livedecon.daemon._journal import (
    MAX_NAME,
    Journal,
    JournalEntry,
    read_journal,
    safe_name,
)
from livedecon.daemon._protocol import (
    PROTOCOL_VERSION,
    Axes,
    ErrorCode,
    Plan,
    ProtocolError,
    parse_header,
)
from livedecon.daemon._writer import output_files, output_path, read_planes

HOSTILE = [
    "..",
    ".",
    "",
    "a/b",
    "a_b",
    "a%2Fb",
    "../../etc",
    "/abs",
    "C:\\x",
    "0",
    "-1",
    "00",
    "%",
    "%25",
    ".hidden",
    "😀",
    "😃",
    "x" * 300,
    "x" * 299 + "y",
    "\ud800",
    "GFP",
    "gfp",
    "a.",
    "a",
    "CON",
    "con.txt",
    "%43ON",
]


def test_safe_names_are_injective_and_never_a_path():
    names: list[int | str] = [*HOSTILE, 0, 1, -1, 10**30]
    made = [safe_name(n) for n in names]
    assert len(set(made)) == len(names), "two names met"
    for name in made:
        assert name not in ("", ".", "..")
        assert "/" not in name
        assert "\\" not in name
        assert "\0" not in name
        assert not name.startswith(".")
        assert len(name) <= MAX_NAME
    assert safe_name(0) == "0"
    assert safe_name("0") != "0"  # channel 0 and channel "0" differ
    assert safe_name("GFP-488_a.b") == "GFP-488_a.b"  # plain names read as they are
    assert safe_name("NUL").upper() != "NUL"  # Windows device names are escaped
    assert not safe_name("a.").endswith(".")  # Windows would drop the dot
    with pytest.raises(TypeError):
        safe_name(True)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", ["a", "run-1/day.2", "2024/12/01", "a/"])
def test_output_dir_may_be_a_plain_relative_sub_path(good):
    assert sub_path(good) == good.removesuffix("/").split("/")


@pytest.mark.parametrize(
    "bad", ["/tmp/x", "../x", "a/../b", "a//b", "./a", "C:\\x", "a\\b", "~/x", ".hidden", "a b"]
)
def test_output_dir_outside_or_odd_is_refused(bad):
    with pytest.raises(ProtocolError) as caught:
        sub_path(bad)
    assert caught.value.code is ErrorCode.OUTSIDE_ROOT


def test_free_space_is_cached_and_refused_above_the_reserve(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    queued = [0]  # promised, not yet written: what the daemon's writer queue holds
    space = FreeSpace(free - 10 * 2**20, interval_s=60.0, pending=lambda: queued[0])
    space.promise(tmp_path, 6 * 2**20, "one")  # fits under what is left above the reserve
    queued[0] += 6 * 2**20
    with pytest.raises(ProtocolError) as caught:
        space.promise(tmp_path, 6 * 2**20, "two")  # the promise before counts
    assert caught.value.code is ErrorCode.DISK_FULL
    assert "reserve" in caught.value.message
    with pytest.raises(ProtocolError):
        FreeSpace(free + 2**30, 0.0).promise(tmp_path, 0, "start")


def _entry(i: int) -> JournalEntry:
    return JournalEntry(frame_id=i, axes=Axes(time=i), dtype="uint16", shape=(4, 4))


def test_journal_lines_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    journal = Journal(tmp_path, fsync_s=0)
    journal.append(_entry(0))
    real_write = os.write
    calls = {"n": 0}

    def short_write(fd, data):  # the OS takes 7 bytes at a time
        calls["n"] += 1
        return real_write(fd, bytes(data)[:7])

    monkeypatch.setattr(os, "write", short_write)
    journal.append(_entry(1))
    assert calls["n"] > 3

    def full_disk(fd, data):  # takes a little, then the disk is full
        if calls["n"] % 2:
            calls["n"] += 1
            return real_write(fd, bytes(data)[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    calls["n"] = 1
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        journal.append(_entry(2))
    monkeypatch.setattr(os, "write", real_write)
    journal.append(_entry(3))  # the torn line was cut off: this one is whole
    journal.close()
    assert [e.frame_id for e in read_journal(tmp_path)] == [0, 1, 3]
    lines = (tmp_path / "acked.jsonl").read_bytes().splitlines()
    assert all(json.loads(line) for line in lines)


def _raw(socket: zmq.Socket, parts: list) -> dict:
    socket.send_multipart(parts)
    assert socket.poll(10_000), "no reply"
    return json.loads(socket.recv())


def _files_outside(tmp_path: Path, root: Path, since: float) -> list[Path]:
    """Files made after `since` anywhere under tmp_path but not under root (daemon logs and
    configs aside)."""
    found = []
    for path in tmp_path.rglob("*"):
        if path.is_relative_to(root) or (
            path.suffix in (".log", ".json") and path.parent == tmp_path
        ):
            continue
        if path.lstat().st_mtime >= since and not path.is_dir():
            found.append(path)
    return found


def test_hostile_ids_and_output_dirs_write_nothing_outside_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    began = time.time() - 1
    daemon = start_daemon(tmp_path)
    root = daemon.config.output_dir
    (root / "escape").symlink_to(outside, target_is_directory=True)
    image = np.ones((8, 8), np.uint16)
    try:
        with daemon.client() as client:
            for i, name in enumerate(["..", ".", "a/b", "../../x", "😀", "/abs", "spill/x"]):
                client.start(name, Plan(pixel_size_um=0.1))
                client.send(image, Axes(time=i, channel="../c", position="/p"))
                client.flush()
                state = client.end(wait_s=30)
                assert state["written"] == 1, (name, state)
                directory = Path(state["output"])
                assert directory.parent == root.resolve()
                assert directory.name not in ("..", ".")
            for bad in ["/tmp", "../elsewhere", "escape", "escape/deeper", "a/../../b"]:
                with pytest.raises(DaemonError) as caught:
                    client.start(f"dir-{len(bad)}", Plan(pixel_size_um=0.1, output_dir=bad))
                assert caught.value.code == ErrorCode.OUTSIDE_ROOT, bad
            with pytest.raises(DaemonError) as caught:
                client.start("escape", Plan(pixel_size_um=0.1))  # its directory leads out
            assert caught.value.code == ErrorCode.OUTSIDE_ROOT
            for name, output_dir in (("spill", None), ("x", "spill"), ("y", "spill/deeper")):
                with pytest.raises(DaemonError) as caught:  # not into the spill store
                    client.start(name, Plan(pixel_size_um=0.1, output_dir=output_dir))
                assert caught.value.code == ErrorCode.OUTPUT_CONFLICT
            client.start("nested", Plan(pixel_size_um=0.1, output_dir="day-1/run.2"))
            client.send(image)
            assert client.end(wait_s=30)["written"] == 1
    finally:
        daemon.stop()
    assert (root / "day-1" / "run.2" / "nested" / "acquisition.json").is_file()
    assert not any(outside.iterdir())
    assert _files_outside(tmp_path, root, began) == []


def test_nothing_is_acked_that_cannot_be_written(tmp_path):
    daemon = start_daemon(tmp_path)
    root = daemon.config.output_dir
    u16, f32 = np.ones((8, 8), np.uint16), np.ones((8, 8), np.float32)
    try:
        with daemon.client() as client:
            client.start("checks", Plan(pixel_size_um=0.1))
            planted = output_path(root / "checks", "planted", 0)
            planted.symlink_to(tmp_path / "victim")  # a file the daemon did not write
            sends = [
                (u16, Axes(channel=0), None),
                (u16, Axes(channel="0"), None),  # not channel 0: a file of its own
                (f32, Axes(channel=0), ErrorCode.DTYPE_MISMATCH),
                (u16, Axes(channel="GFP"), None),
                (u16, Axes(channel="gfp"), ErrorCode.NAME_COLLISION),
                (u16, Axes(channel="😀"), None),
                (u16, Axes(channel="😃"), None),
                (u16, Axes(channel="a/b"), None),
                (u16, Axes(channel="a_b"), None),
                (u16, Axes(position="planted"), ErrorCode.OUTPUT_CONFLICT),
                (u16, Axes(channel=0, time=1), None),
            ]
            codes = []
            for image, axes, _ in sends:
                try:  # a refusal may come back on the send itself or on the flush
                    send_and_flush(client, image, axes)
                    codes.append(None)
                except DaemonError as exc:
                    codes.append(exc.code)
            assert codes == [code for _, _, code in sends]
            state = client.end(wait_s=30)
    finally:
        daemon.stop()
    acked = sum(code is None for _, _, code in sends)
    assert state["acknowledged"] == state["written"] == acked
    assert state["complete"] is True
    directory = root / "checks"
    planes = [
        p for path in output_files(directory) if not path.is_symlink() for p in read_planes(path)
    ]
    assert len(planes) == acked
    assert not (tmp_path / "victim").exists()
    assert len(read_journal(directory)) == acked


def test_malformed_headers_are_protocol_errors_and_limits_hold(tmp_path):
    limits = {"max_active_acquisitions": 2, "max_frame_pixels": 4096, "max_z": 4}
    daemon = start_daemon(tmp_path, limits={**limits, "max_header_bytes": 8192})
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.ingest)
    status = {"version": PROTOCOL_VERSION, "kind": "status"}
    deep = b"[" * 1000 + b"]" * 1000
    cases = {
        "big header": (json.dumps({**status, "request": {"x": "y" * 20_000}}), "too_large"),
        "deep": (b'{"version": 1, "kind": "status", "request": {"a": ' + deep + b"}}", "bad_json"),
        "list kind": (json.dumps({**status, "kind": ["status"]}), "unknown_kind"),
        "dict kind": (json.dumps({**status, "kind": {"a": 1}}), "unknown_kind"),
        "bool version": (json.dumps({**status, "version": True}), "unsupported_version"),
        "huge int": (b'{"version": 1, "kind": "status", "x": 1' + b"0" * 5000 + b"}", "bad_json"),
        "list version": (json.dumps({**status, "version": [1]}), "unsupported_version"),
    }
    try:
        for name, (header, code) in cases.items():
            raw = header if isinstance(header, bytes) else header.encode()
            reply = _raw(socket, [raw])
            assert reply.get("code") == code, (name, reply)
        # a part over ZMQ_MAXMSGSIZE (derived from the frame limit: 4096 px x 4 planes x 4 B,
        # or the header limit) is dropped with its connection, unread
        big = zmq.Context.instance().socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(daemon.ingest)
        big.send_multipart([json.dumps(status).encode(), b"\0" * (1 << 20)])
        assert not big.poll(1000)
        big.close()
        assert _raw(socket, [json.dumps(status).encode()])["ok"] is True
        with daemon.client() as one, daemon.client() as two, daemon.client() as three:
            one.start("one", Plan(pixel_size_um=0.1))
            two.start("two", Plan(pixel_size_um=0.1))
            with pytest.raises(DaemonError) as caught:
                three.start("three", Plan(pixel_size_um=0.1))
            assert caught.value.code == ErrorCode.TOO_MANY_ACQUISITIONS
            one.end()
            three.start("three", Plan(pixel_size_um=0.1))  # room again
    finally:
        socket.close()
        daemon.stop()
    log = daemon.log()
    assert "Traceback" not in log
    assert "internal" not in log


def test_parse_header_refuses_odd_types_without_raising_anything_else():
    for raw in [b'{"version": 1, "kind": 5}', b'{"version": 1, "kind": null}', b"[[[[]]]]"]:
        with pytest.raises(ProtocolError):
            parse_header(raw)


def _open_files_under(pid: int, directory: Path) -> list[str]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory.resolve())):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list open files")
def test_an_idle_acquisition_closes_its_files_and_resumes(tmp_path):
    daemon = start_daemon(tmp_path, limits={"idle_close_s": 0.5})
    directory = daemon.config.output_dir / "idle"
    images = [np.full((8, 8), i, np.uint16) for i in range(4)]
    try:
        with daemon.client() as client:
            client.start("idle", Plan(pixel_size_um=0.1))
            for i in (0, 1):
                client.send(images[i], Axes(time=i))
            client.flush()
            time.sleep(0.5)
            assert _open_files_under(daemon.process.pid, directory)  # journal and file open
            deadline = time.monotonic() + 10
            while _open_files_under(daemon.process.pid, directory):
                assert time.monotonic() < deadline, "files still open after the idle timeout"
                time.sleep(0.2)
            for i in (2, 3):
                client.send(images[i], Axes(time=i))
            client.flush()
            state = client.end(wait_s=30)
    finally:
        daemon.stop()
    assert state["written"] == 4
    assert state["complete"]
    planes = read_planes(output_path(directory, 0, 0))
    assert [int(p[0, 0]) for _, p in planes] == [0, 1, 2, 3]
    assert [e.frame_id for e in read_journal(directory)] == [0, 1, 2, 3]


def test_a_plane_that_cannot_be_written_is_reported_and_recovered_by_reprocess(tmp_path):
    from ndstorage import NDTiffDataset
    from typer.testing import CliRunner

    from livedecon.cli import app

    images = [np.full((16, 16), 10 + i, np.uint16) for i in range(4)]
    raw = NDTiffDataset(str(tmp_path / "raw"), name="raw", writable=True, summary_metadata={})
    for i, image in enumerate(images):  # what Micro-Manager saved
        raw.put_image({"time": i}, image, {})
    raw.finish()
    daemon = start_daemon(tmp_path, model={"pass_through_delay_ms": 300.0})
    directory = daemon.config.output_dir / "kept"
    blocker = output_path(directory, 0, 0)
    try:
        with daemon.client() as client:
            client.start("kept", Plan(pixel_size_um=0.1))
            client.send(images[0], Axes(time=0))
            client.flush()  # acknowledged; the stand-in engine takes 300 ms
            blocker.mkdir()  # the output file cannot be opened now (an I/O error stand-in)
            for i in (1, 2, 3):
                client.send(images[i], Axes(time=i))
            client.flush()
            state = client.end(wait_s=30)
            assert client.write_failures == 4  # the client hears of it
    finally:
        daemon.stop()
    assert state["finished"] is True
    assert state["complete"] is False
    assert state["write_failures"] == 4
    assert len(state["missing"]["listed"]) == 4
    blocker.rmdir()
    result = CliRunner().invoke(app, ["reprocess", str(directory), "--raw", raw.path])
    assert result.exit_code == 0, result.output
    planes = read_planes(output_path(directory, 0, 0))
    assert [int(p[0, 0]) for _, p in planes] == [10, 11, 12, 13]


def test_an_acquisition_finishes_even_when_finalising_its_files_fails(tmp_path, monkeypatch):
    from test_writer import acquisition, info, plane

    from livedecon.daemon._pipeline import Acquisition, WriteItem, WriterThread
    from livedecon.daemon._processing import PassThrough
    from livedecon.daemon._telemetry import Metrics
    from livedecon.daemon._writer import AcquisitionWriter

    def failing_close(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(AcquisitionWriter, "close", failing_close)
    writer = WriterThread(4, Metrics())
    writer.start()
    state = Acquisition(acquisition(), PassThrough(), tmp_path, None)
    writer.queue.put(WriteItem(state, plane(0), info(0, time=0)))
    writer.queue.put(WriteItem(state, close=True))
    assert state.finished.wait(5), "end() would wait out its timeout"
    writer.queue.put(None)
    writer.join(5)
    status = state.status()
    assert status["written"] == 1
    assert status["complete"] is False
    assert "Input/output error" in status["missing"]["not_finalised"]
    assert len(read_planes(output_path(tmp_path, 0, "GFP"))) == 1  # the plane is readable


def test_a_stream_whose_start_is_refused_for_now_asks_again(tmp_path):
    from livedecon.acquisition_hooks._stream import DaemonStream

    daemon = start_daemon(tmp_path, limits={"max_active_acquisitions": 1})
    image = np.ones((8, 8), np.uint16)
    try:
        with daemon.client() as other:
            other.start("other", Plan(pixel_size_um=0.1))  # the daemon is full
            stream = DaemonStream("later", Plan(pixel_size_um=0.1), daemon.ingest, retry_s=0.2)
            stream.start()
            for i in range(3):
                stream.frame(image, Axes(time=i))
            time.sleep(0.5)
            other.end()  # room again
        time.sleep(0.5)
        for i in range(3, 8):
            stream.frame(image, Axes(time=i))
            time.sleep(0.1)
        state = stream.end(wait_s=30)
    finally:
        daemon.stop()
    counters = stream.counters.summary()
    assert counters["parts"] == ["later"]
    assert counters["missed"] >= 3
    assert state["written"] == counters["sent"] >= 4


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc to list mappings")
def test_the_daemon_maps_a_bounded_number_of_client_segments(tmp_path):
    from livedecon.daemon._server import SEGMENTS_KEPT

    daemon = start_daemon(tmp_path)
    image = np.ones((8, 8), np.uint16)
    try:
        for i in range(SEGMENTS_KEPT + 6):  # each client brings a ring of its own
            with daemon.client(shared_memory_min_bytes=0, window=2) as client:
                client.start(f"ring-{i}", Plan(pixel_size_um=0.1, save=False))
                client.send(image)
                client.flush()
                client.end()
        maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
    finally:
        daemon.stop()
    mapped = set(re.findall(r"/dev/shm/\S+", maps))  # (unlinked ones included)
    assert SEGMENTS_KEPT // 2 < len(mapped) <= SEGMENTS_KEPT
