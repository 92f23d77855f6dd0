"""The live display's Qt-free side: newest-per-stream subscription, lag, reconnection, the
daemon's status, layer geometry and contrast (the napari side is in test_viewer.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from daemon_harness import start_daemon

from livedecon.acquisition_hooks._display_stream import (
    DaemonState,
    DisplayStream,
    StatusPoller,
    adaptation_summary,
    display_present,
    layer_geometry,
    robust_limits,
    status_lines,
    viewer_unavailable,
)
from livedecon.daemon._launcher import free_tcp_endpoint
from livedecon.daemon._protocol import Axes, Publication, Topic, encode_publication


def publication(
    topic: Topic,
    frame_id: int,
    pixels: np.ndarray,
    channel: int | str = 0,
    pixel_size_um: float = 0.1,
    timestamp_s: float | None = None,
    acquisition_id: str = "acq",
) -> Publication:
    return Publication(
        topic=topic,
        acquisition_id=acquisition_id,
        frame_id=frame_id,
        axes=Axes(time=frame_id, channel=channel),
        dtype=str(pixels.dtype),
        shape=pixels.shape,
        pixel_size_um=pixel_size_um,
        timestamp_s=timestamp_s,
        published_s=time.time(),
        bundle_id="raw" if topic is Topic.RAW else "test@1",
        weights_version=0 if topic is Topic.RAW else 1,
        units="camera counts" if topic is Topic.RAW else "photoelectrons",
    )


def send(socket: zmq.Socket, topic: Topic, frame_id: int, pixels: np.ndarray, **fields) -> None:
    socket.send_multipart(
        encode_publication(publication(topic, frame_id, pixels, **fields), pixels)
    )


def bound_pub(endpoint: str, timeout_s: float = 5.0) -> zmq.Socket:
    """A PUB bound to `endpoint`. ZMQ closes a socket's listener in its I/O thread after
    close() returns, so rebinding the port of a publisher just closed can briefly fail."""
    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.bind(endpoint)
            return socket
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                socket.close()
                raise
            time.sleep(0.05)


def until(condition, timeout_s: float = 5.0, sending=None) -> None:
    """Wait for `condition`, calling `sending` meanwhile (PUB drops messages until the
    subscription arrived: the 'slow joiner')."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        if sending is not None:
            sending()
        time.sleep(0.02)


@pytest.fixture
def publisher():
    endpoint = free_tcp_endpoint()
    socket = bound_pub(endpoint)
    stream = DisplayStream(endpoint, {Topic.RESTORED, Topic.RAW})
    stream.start()
    yield endpoint, socket, stream
    stream.stop()
    socket.close(linger=0)


def test_only_the_newest_frame_of_each_stream_is_kept(publisher):
    _, socket, stream = publisher
    probe = np.zeros((4, 4), np.uint16)
    until(
        lambda: stream.counters["received"] > 0, sending=lambda: send(socket, Topic.RAW, 0, probe)
    )
    stream.take()
    frames = [np.full((8, 8), i, np.float32) for i in range(40)]
    for i, frame in enumerate(frames):
        send(socket, Topic.RESTORED, i, frame, channel="GFP")
        send(socket, Topic.RESTORED, i, frame + 100, channel="RFP")
    until(lambda: (stream.latest(Topic.RESTORED) or 0) and stream.counters["superseded"] >= 70)
    until(lambda: all(f.publication.frame_id == 39 for f in [stream.latest(Topic.RESTORED)]))
    time.sleep(0.1)
    taken = stream.take()
    assert {key[2] for key in taken} == {"GFP", "RFP"}
    for (_, _, channel, _), frame in taken.items():
        assert frame.publication.frame_id == 39
        np.testing.assert_array_equal(frame.pixels, frames[39] + (100 if channel == "RFP" else 0))
    assert stream.take() == {}  # nothing new since
    assert stream.counters["superseded"] == 78  # 80 received, 2 shown
    assert stream.counters["shown"] >= 3


def test_malformed_publications_are_counted_and_skipped(publisher):
    _, socket, stream = publisher
    probe = np.zeros((4, 4), np.uint16)
    until(
        lambda: stream.counters["received"] > 0, sending=lambda: send(socket, Topic.RAW, 0, probe)
    )
    socket.send_multipart([b"restored", b"{not json", b"xx"])
    socket.send_multipart([b"restored", b"only two parts"])
    send(socket, Topic.RESTORED, 5, np.ones((4, 4), np.float32))
    until(lambda: stream.latest(Topic.RESTORED) is not None)
    assert stream.counters["malformed"] == 2
    assert stream.is_alive()


def test_topics_change_while_running_and_lag_runs_from_the_camera_time(publisher):
    _, socket, stream = publisher
    stream.set_topics({Topic.RESTORED})
    image = np.ones((4, 4), np.float32)
    until(
        lambda: stream.latest(Topic.RESTORED) is not None,
        sending=lambda: send(socket, Topic.RESTORED, 0, image),
    )
    send(socket, Topic.RAW, 1, image.astype(np.uint16))
    time.sleep(0.2)
    assert stream.latest(Topic.RAW) is None  # unsubscribed
    stream.set_topics({Topic.RESTORED, Topic.RAW})
    until(
        lambda: stream.latest(Topic.RAW) is not None,
        sending=lambda: send(socket, Topic.RAW, 2, image.astype(np.uint16)),
    )
    stream.take()
    send(socket, Topic.RESTORED, 3, image, timestamp_s=time.time() - 0.5)
    until(lambda: stream.latest(Topic.RESTORED).publication.frame_id == 3)
    (frame,) = stream.take().values()
    shown_s, lag_s = stream.lag_samples()[-1]
    assert 0.5 <= lag_s < 1.5
    assert lag_s == pytest.approx(shown_s - frame.publication.timestamp_s)
    assert stream.lag_ms()["max"] >= 500


def test_a_stream_started_first_connects_and_survives_a_publisher_restart():
    endpoint = free_tcp_endpoint()
    stream = DisplayStream(endpoint, {Topic.RESTORED})
    stream.start()  # nobody publishes yet
    try:
        time.sleep(0.3)
        for generation in range(2):
            socket = bound_pub(endpoint)
            image = np.full((4, 4), generation, np.float32)
            until(
                lambda g=generation: (
                    (f := stream.latest(Topic.RESTORED)) is not None
                    and f.publication.acquisition_id == f"run{g}"
                ),
                sending=lambda g=generation, s=socket, i=image: send(
                    s, Topic.RESTORED, 0, i, acquisition_id=f"run{g}"
                ),
            )
            socket.close(linger=0)  # the daemon goes away; the next loop restarts it
    finally:
        stream.stop()
    assert not stream.is_alive()


def test_layer_geometry_overlays_restored_pixels_on_the_raw_ones():
    raw = publication(Topic.RAW, 0, np.zeros((4, 4), np.uint16), pixel_size_um=0.1)
    restored = publication(Topic.RESTORED, 0, np.zeros((8, 8), np.float32), pixel_size_um=0.05)
    (raw_scale, _), (raw_shift, _) = layer_geometry(raw)
    (fine_scale, _), (fine_shift, _) = layer_geometry(restored)
    assert (raw_scale, fine_scale) == (0.1, 0.05)
    # napari: the centre of pixel i is at i * scale + translate, its area +- scale / 2
    for i in range(4):
        raw_centre = i * raw_scale + raw_shift
        fine = [j * fine_scale + fine_shift for j in (2 * i, 2 * i + 1)]
        assert np.mean(fine) == pytest.approx(raw_centre)  # restored 2i, 2i+1 tile raw i
        assert fine[0] - fine_scale / 2 == pytest.approx(raw_centre - raw_scale / 2)
        assert fine[1] + fine_scale / 2 == pytest.approx(raw_centre + raw_scale / 2)
    assert fine_shift - raw_shift == pytest.approx(-0.25 * raw_scale)  # a quarter raw pixel
    volume = publication(Topic.VOLUME, 0, np.zeros((5, 8, 8), np.float32), pixel_size_um=0.05)
    volume = volume.model_copy(update={"z_step_um": 0.2})
    assert layer_geometry(volume) == ((0.2, 0.05, 0.05), (0.0, 0.025, 0.025))
    # xz and yz projections: rows are planes at the z step, so a stack shows at its true aspect
    for topic in (Topic.MIP_XZ, Topic.MIP_YZ):
        side = publication(topic, 0, np.zeros((5, 8), np.float32), pixel_size_um=0.05)
        side = side.model_copy(update={"z_step_um": 0.2})
        assert layer_geometry(side) == ((0.2, 0.05), (0.0, 0.025))


def test_contrast_limits_ignore_outliers_and_never_collapse():
    image = np.random.default_rng(0).normal(100, 10, (256, 256)).astype(np.float32)
    image[0, :20] = 60_000  # hot pixels
    lo, hi = robust_limits(image)
    assert 50 < lo < 100 < hi < 200
    assert robust_limits(np.full((4, 4), 7, np.uint16)) == (7.0, 8.0)


def test_the_panel_says_what_the_daemon_does(publisher):
    _, socket, stream = publisher
    assert status_lines(stream, DaemonState(False, 0.0))["daemon"] == "connecting..."
    absent = status_lines(stream, DaemonState(False, time.time(), "no reply"))
    assert absent["daemon"] == "daemon not reachable, retrying"
    assert absent["acquisition"] == "waiting for frames"
    image = np.ones((4, 4), np.float32)
    until(
        lambda: stream.latest(Topic.RESTORED) is not None,
        sending=lambda: send(socket, Topic.RESTORED, 7, image, acquisition_id="a1"),
    )
    adaptation = {
        "mode": "adapt",
        "ready": True,
        "serving_version": 2,
        "versions": [1, 2],
        "pending_steps": 0,
        "last": {"timepoint": 3, "accepted": True},
    }
    state = DaemonState(
        True,
        time.time(),
        status={
            "model": {"bundle_id": "test@1", "backend": "onnxruntime"},
            "acquisitions": {"a1": {"adaptation": adaptation}},
        },
        metrics={"latency_ms": {"end_to_end": {"p50_ms": 12.0}}},
    )
    lines = status_lines(stream, state)
    assert lines["daemon"] == "connected (test@1 on onnxruntime)"
    assert lines["acquisition"].startswith("a1: frame 7")
    assert lines["model"] == "test@1, weights v1"
    assert lines["adaptation"] == "adapt, serving v2 (2 kept), last t3: accepted"
    assert "daemon p50 12 ms" in lines["latency"]
    assert adaptation_summary({"mode": "off"}) == "off"
    assert "training, 5 steps" in adaptation_summary({**adaptation, "pending_steps": 5})


def test_the_status_poller_waits_for_a_daemon_and_finds_it(tmp_path):
    ingest = free_tcp_endpoint()
    poller = StatusPoller(ingest, interval_s=0.2, timeout_s=0.3)
    poller.start()
    daemon = None
    try:
        state = poller.wait_for_answer(5)
        assert not state.reachable
        assert state.checked_s > 0
        assert "no reply" in state.error or "could not send" in state.error
        daemon = start_daemon(tmp_path, endpoints={"ingest": ingest})
        until(lambda: poller.state.reachable, timeout_s=10)
        assert poller.state.status["model"]["bundle_id"] == "pass-through"
        assert "latency_ms" in poller.state.metrics
    finally:
        poller.stop()
        if daemon is not None:
            daemon.stop()


def test_a_window_opens_only_where_there_is_a_display(monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    monkeypatch.setenv("DISPLAY", ":0")
    assert not display_present()
    assert viewer_unavailable() is not None
    monkeypatch.delenv("QT_QPA_PLATFORM")
    assert display_present()
    monkeypatch.delenv("DISPLAY")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if not display_present():  # Linux: no X11 or Wayland display
        assert "no display" in (viewer_unavailable() or "no display")


def test_livedecon_view_says_why_it_cannot_open_a_window(monkeypatch):
    from typer.testing import CliRunner

    from livedecon.cli import app

    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    result = CliRunner().invoke(app, ["view"])
    assert result.exit_code == 2
    assert "cannot open the live viewer" in result.output
