"""What a live display needs from a running daemon, without Qt: the newest image of each
stream, how late it is, and the daemon's state.

`DisplayStream` is a thread with its own SUB socket on the daemon's publish endpoint. It drains
the socket as fast as messages arrive and keeps only the newest publication per stream (topic,
acquisition, channel, position); a display that renders at its own pace takes the newest with
`take()` and never works through a backlog, so its lag cannot grow and it cannot slow the
daemon (whose XPUB is latest-wins as well). ZMQ's CONFLATE is not used: it keeps one message
for the whole socket, not one per stream, and does not support multipart messages. A SUB socket
reconnects by itself when the daemon restarts on the same endpoint and sends its subscriptions
again, so a display may start before the daemon, or long after the acquisition began.

`StatusPoller` asks the daemon's control socket for status and metrics about once a second and
reports "not reachable" (and keeps asking) while no daemon answers.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from livedecon.daemon._client import DaemonClient, DaemonError
from livedecon.daemon._protocol import ProtocolError, Publication, Topic, decode_publication

StreamKey = tuple[Topic, str, int | str, int | str]
DEFAULT_TOPICS = (Topic.RESTORED, Topic.RAW, Topic.MIP, Topic.MIP_XZ, Topic.MIP_YZ)
AXIAL_VIEWS = {Topic.MIP_XZ, Topic.MIP_YZ}  # (Z, X) and (Z, Y) projections of a volume
VIEWER_EXTRA_HINT = 'the live viewer needs napari and a Qt binding: pip install "livedecon[viewer]"'
MAX_STREAMS = 64  # streams remembered (old acquisitions are forgotten first)
COUNTED = {Topic.RESTORED, Topic.MIP}  # one per restored frame or stack


class EventRate:
    """Events per second over the last `span_s` seconds (thread-safe enough: one writer)."""

    def __init__(self, span_s: float = 2.0) -> None:
        self.span_s = span_s
        self._times: deque[float] = deque(maxlen=4096)

    def tick(self, n: int = 1) -> None:
        now = time.monotonic()
        self._times.extend([now] * n)

    def rate(self) -> float:
        now = time.monotonic()
        recent = sum(t >= now - self.span_s for t in list(self._times))
        return recent / self.span_s


@dataclass(frozen=True)
class DisplayFrame:
    """One received publication and its pixels (read-only, owned by this frame)."""

    publication: Publication
    pixels: np.ndarray
    received_s: float  # wall clock (time.time) when this process received it

    @property
    def key(self) -> StreamKey:
        p = self.publication
        return (p.topic, p.acquisition_id, p.axes.channel, p.axes.position)

    def lag_s(self, now_s: float | None = None) -> float:
        """Seconds from the camera's time of the frame (or, when the hook sent none, from its
        publication) until `now_s`. Both are wall clocks, as the hooks' timestamps are."""
        p = self.publication
        origin = p.timestamp_s if p.timestamp_s is not None else p.published_s
        return (time.time() if now_s is None else now_s) - origin


class DisplayStream(threading.Thread):
    """Newest publication per stream from the daemon's publish endpoint (see module doc)."""

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[Topic] = DEFAULT_TOPICS,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
        lag_window: int = 4096,
    ) -> None:
        super().__init__(name="livedecon-display-stream", daemon=True)
        self.endpoint = endpoint
        self._context = context or zmq.Context.instance()
        self._secure = secure
        self._lock = threading.Lock()
        self._topics = set(topics)
        self._topics_changed = True
        self._fresh: dict[StreamKey, DisplayFrame] = {}  # arrived, not yet taken
        self._latest: dict[StreamKey, DisplayFrame] = {}  # newest, taken or not
        self._lags: deque[tuple[float, float]] = deque(maxlen=lag_window)
        self.counters = {"received": 0, "shown": 0, "superseded": 0, "malformed": 0}
        # frames/s of restored frames or stacks (RESTORED, MIP; not RAW and VOLUME, which
        # come with them): a user's "frames", where the counters count every publication
        self.received_rate = EventRate()
        self.shown_rate = EventRate()
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    # -- the display's side ------------------------------------------------------------------

    def set_topics(self, topics: Iterable[Topic]) -> None:
        """Change what is subscribed to (applied by the stream's thread within ~50 ms). The
        daemon sends raw frames and whole volumes only while someone subscribes to them."""
        with self._lock:
            self._topics = set(topics)
            self._topics_changed = True

    @property
    def topics(self) -> set[Topic]:
        with self._lock:
            return set(self._topics)

    def take(self, now_s: float | None = None) -> dict[StreamKey, DisplayFrame]:
        """The newest frame of every stream that received one since the last call; they count
        as shown, and their lag (camera to now) is recorded."""
        with self._lock:
            fresh, self._fresh = self._fresh, {}
        if fresh:
            now = time.time() if now_s is None else now_s
            for frame in fresh.values():
                self._lags.append((now, frame.lag_s(now)))
            self.counters["shown"] += len(fresh)
            self.shown_rate.tick(sum(key[0] in COUNTED for key in fresh))
        return fresh

    def latest(self, topic: Topic | None = None) -> DisplayFrame | None:
        """The most recently received frame (of `topic`), whether taken or not."""
        with self._lock:
            frames = [f for f in self._latest.values() if topic is None or f.key[0] is topic]
        return max(frames, key=lambda f: f.received_s, default=None)

    def lag_samples(self) -> list[tuple[float, float]]:
        """(time shown, lag in seconds) of every recent frame handed out by `take`."""
        return list(self._lags)

    def lag_ms(self, last_s: float | None = None) -> dict[str, float]:
        """p50, p95 and max of the lag of shown frames (of the last `last_s` seconds)."""
        samples = self.lag_samples()
        if last_s is not None:
            since = time.time() - last_s
            samples = [s for s in samples if s[0] >= since]
        return lag_summary_ms([lag for _, lag in samples])

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout_s)

    # -- the stream's thread -----------------------------------------------------------------

    def run(self) -> None:
        socket = self._context.socket(zmq.SUB)
        try:
            socket.setsockopt(zmq.LINGER, 0)
            # A short queue: what waits in it is stale anyway (the daemon drops older images for
            # a slow subscriber), and a backlog of large frames would only cost memory.
            socket.setsockopt(zmq.RCVHWM, 8)
            if self._secure:
                self._secure(socket)
            socket.connect(self.endpoint)
            subscribed: set[Topic] = set()
            while not self._stopping.is_set():
                subscribed = self._apply_topics(socket, subscribed)
                if socket.poll(50):
                    self._drain(socket)
        except BaseException as exc:  # kept for the display to report; the thread ends
            self.error = exc
        finally:
            socket.close(linger=0)

    def _apply_topics(self, socket: zmq.Socket[bytes], subscribed: set[Topic]) -> set[Topic]:
        with self._lock:
            if not self._topics_changed:
                return subscribed
            wanted, self._topics_changed = set(self._topics), False
        for topic in subscribed - wanted:
            socket.unsubscribe(topic.value.encode())
        for topic in wanted - subscribed:
            socket.subscribe(topic.value.encode())
        with self._lock:  # frames of a topic no longer wanted are not shown any more
            for key in [k for k in self._fresh if k[0] not in wanted]:
                del self._fresh[key]
        return wanted

    def _drain(self, socket: zmq.Socket[bytes]) -> None:
        """Everything queued now, keeping the newest per stream."""
        while True:
            try:
                parts = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            received = time.time()
            try:
                publication, pixels = decode_publication([part.buffer for part in parts])
            except (ProtocolError, ValueError, TypeError):
                self.counters["malformed"] += 1
                continue
            if publication.topic not in self._topics:  # sent before an unsubscribe took
                continue
            frame = DisplayFrame(publication, pixels, received)
            key = frame.key
            with self._lock:
                if key in self._fresh:
                    self.counters["superseded"] += 1
                self._fresh[key] = frame
                self._latest[key] = frame
                if len(self._latest) > MAX_STREAMS:
                    oldest = min(self._latest.values(), key=lambda f: f.received_s)
                    del self._latest[oldest.key]
                    self._fresh.pop(oldest.key, None)
            self.counters["received"] += 1
            if publication.topic in COUNTED:
                self.received_rate.tick()


def lag_summary_ms(lags_s: Iterable[float]) -> dict[str, float]:
    """Count, median, 95th percentile and maximum of display lags, in milliseconds."""
    values = np.asarray(list(lags_s), dtype=np.float64) * 1e3
    if not values.size:
        return {"count": 0}
    p50, p95 = np.percentile(values, [50, 95])
    return {"count": int(values.size), "p50": p50, "p95": p95, "max": float(values.max())}


# -- the daemon's state ----------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonState:
    """What the last status poll found: whether the daemon answered, when, and its status and
    metrics."""

    reachable: bool
    checked_s: float  # wall clock of the last attempt; 0: not yet asked
    error: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class StatusPoller(threading.Thread):
    """Status and metrics from the daemon's control socket every `interval_s` (a thread, so a
    missing daemon never blocks the display for the client's timeout)."""

    def __init__(
        self,
        endpoint: str,
        interval_s: float = 1.0,
        timeout_s: float = 0.5,
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        super().__init__(name="livedecon-status-poller", daemon=True)
        self.endpoint, self.interval_s, self.timeout_s = endpoint, interval_s, timeout_s
        self._secure, self._context = secure, context
        self._state = DaemonState(False, 0.0, "not asked yet")
        self._stopping = threading.Event()
        self._asked = threading.Event()

    @property
    def state(self) -> DaemonState:
        return self._state

    def wait_for_answer(self, timeout_s: float) -> DaemonState:
        """The state after the next attempt (for tests and command-line use)."""
        self._asked.clear()
        self._asked.wait(timeout_s)
        return self._state

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout_s)

    def run(self) -> None:
        client = DaemonClient(
            self.endpoint, timeout_s=self.timeout_s, secure=self._secure, context=self._context
        )
        try:
            while not self._stopping.is_set():
                try:
                    self._state = DaemonState(
                        True, time.time(), "", client.status(), client.metrics()
                    )
                except DaemonError as exc:  # unreachable, or an answer it could not give
                    self._state = DaemonState(False, time.time(), exc.message)
                    client.reconnect()  # a late reply must not answer the next request
                self._asked.set()
                self._stopping.wait(self.interval_s)
        finally:
            client.close()


# -- what the panel says -----------------------------------------------------------------------


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.0f} ms"


def adaptation_summary(adaptation: dict[str, Any] | None) -> str:
    """One line for an acquisition's adaptation status (the daemon's `status` answer)."""
    if not adaptation or adaptation.get("mode", "off") == "off":
        return "off"
    parts = [str(adaptation["mode"])]
    if "serving_version" in adaptation:
        kept = adaptation.get("versions") or []
        parts.append(f"serving v{adaptation['serving_version']} ({len(kept)} kept)")
    if adaptation.get("pending_steps"):
        parts.append(f"training, {adaptation['pending_steps']} steps to go")
    elif adaptation.get("ready") is False:
        parts.append("preparing")
    last = adaptation.get("last")
    if last:
        verdict = "accepted" if last.get("accepted") else f"rejected ({last.get('reason', '')})"
        parts.append(f"last t{last.get('timepoint', '?')}: {verdict}")
    return ", ".join(parts)


def status_lines(stream: DisplayStream, daemon: DaemonState) -> dict[str, str]:
    """The status panel's rows: daemon, acquisition, model, adaptation, latency, frames/s."""
    shown = stream.latest(Topic.RESTORED) or stream.latest(Topic.MIP) or stream.latest()
    lines: dict[str, str] = {}
    if daemon.reachable:
        model = daemon.status.get("model", {})
        lines["daemon"] = (
            f"connected ({model.get('bundle_id', '?')} on {model.get('backend', '?')})"
        )
    elif daemon.checked_s == 0:
        lines["daemon"] = "connecting..."
    else:  # the client's sentence is in `daemon.error`; the panel stays short
        lines["daemon"] = "daemon not reachable, retrying"
    if shown is None:
        lines["acquisition"] = "waiting for frames"
        lines["model"] = "-"
    else:
        p = shown.publication
        a = p.axes
        lines["acquisition"] = (
            f"{p.acquisition_id}: frame {p.frame_id} (t {a.time}, z {a.z}, channel {a.channel},"
            f" position {a.position})"
        )
        lines["model"] = f"{p.bundle_id}, weights v{p.weights_version}"
    acquisition = (
        daemon.status.get("acquisitions", {}).get(shown.publication.acquisition_id)
        if shown is not None
        else None
    )
    lines["adaptation"] = adaptation_summary((acquisition or {}).get("adaptation"))
    lag = stream.lag_ms(last_s=5.0)
    daemon_e2e = daemon.metrics.get("latency_ms", {}).get("end_to_end", {}).get("p50_ms")
    lines["latency"] = (
        f"camera to display p50 {_fmt_ms(lag.get('p50'))}, p95 {_fmt_ms(lag.get('p95'))}"
        f" (daemon p50 {_fmt_ms(daemon_e2e)})"
    )
    lines["frames/s"] = (
        f"received {stream.received_rate.rate():.1f}, shown {stream.shown_rate.rate():.1f}"
        f" (superseded {stream.counters['superseded']})"
    )
    return lines


# -- geometry and contrast -------------------------------------------------------------------


def layer_geometry(publication: Publication) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """napari `scale` and `translate` (µm) that put every stream on one physical grid.

    napari puts the centre of pixel i at i * scale + translate. Translating by half a pixel
    puts pixel i's area at [i, i + 1) * pixel size, so the field of view starts at 0 whatever
    the pixel size: restored pixels 2i and 2i + 1 (half the raw size) then cover exactly raw
    pixel i, as the 2x upsampling defines them (its loss average-pools them back onto raw
    pixel i). In raw pixels the restored layer sits 0.25 to the left of a plain half-size
    layer. Planes of a volume are samples along z: plane k at k * z step, in a volume and in
    the rows of its xz and yz projections alike, so an anisotropic stack shows at its true
    aspect."""
    pixel = publication.pixel_size_um or 1.0
    lateral = ((pixel, pixel), (pixel / 2, pixel / 2))
    if publication.topic in AXIAL_VIEWS:  # rows are planes at the z step, columns pixels
        z = publication.z_step_um or pixel
        return (z, pixel), (0.0, pixel / 2)
    if len(publication.shape) == 3:
        z = publication.z_step_um or pixel
        return (z, *lateral[0]), (0.0, *lateral[1])
    return lateral


def robust_limits(pixels: np.ndarray, low: float = 0.5, high: float = 99.8) -> tuple[float, float]:
    """Contrast limits from percentiles of (a subsample of) `pixels`: outliers such as hot
    pixels do not set them. Set once, never per frame, so a time-lapse does not flicker."""
    flat = np.asarray(pixels).reshape(-1)
    step = max(1, flat.size // 262_144)
    lo, hi = (float(v) for v in np.percentile(flat[::step], [low, high]))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


# -- can a window open here --------------------------------------------------------------------


def display_present() -> bool:
    """Whether a window would be seen: not under QT_QPA_PLATFORM=offscreen/minimal (tests, CI),
    and on Linux only with an X11 or Wayland display."""
    if os.environ.get("QT_QPA_PLATFORM", "").split(":")[0] in {"offscreen", "minimal", "vnc"}:
        return False
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def viewer_unavailable() -> str | None:
    """Why the live viewer cannot open here, or None when it can."""
    import importlib.util

    for module in ("napari", "qtpy"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return VIEWER_EXTRA_HINT
    if not display_present():
        return "no display (DISPLAY / WAYLAND_DISPLAY unset, or QT_QPA_PLATFORM=offscreen)"
    return None
