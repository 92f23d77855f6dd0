"""The acquisition side of the daemon connection: it never harms the acquisition.

`DaemonStream` is what hooks call from the acquisition thread, and none of those calls waits
on the daemon: `start`, `frame`, `timepoint_done` and `end` (without `wait_s`) only hand their
item to a bounded queue, which a sender thread of the stream empties into a `DaemonClient`.
Nothing raises. A frame that finds the queue full, or the sender stuck on the daemon for more
than `stall_s`, is counted as missed at once (Micro-Manager still saves it raw); so is every
frame while the daemon is unreachable. The hand-off costs the acquisition thread a lock and an
append: its time per frame is recorded (`hand_off_stats`).

When the daemon stops answering, the sender goes offline and a watcher probes the daemon every
`retry_s`. When it answers again the sender reconnects: into the same acquisition if the daemon
still has it (it was only slow), else as a new part `<id>-part<N>` (the daemon restarted; the
gap shows in the counters and in the parts' outputs). Frames the daemon refused (`disk_full`,
...) are counted by code, and acknowledged frames it could not write later are counted in
`write_failed`; the acquisition goes on in every case.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zmq

from livedecon.daemon._client import DaemonClient, DaemonError, DaemonUnavailable
from livedecon.daemon._protocol import Axes, ErrorCode, Plan

log = logging.getLogger(__name__)
# refusals of an acquisition start that may pass later: the stream asks again every retry_s
RETRIED_STARTS = {ErrorCode.DISK_FULL, ErrorCode.TOO_MANY_ACQUISITIONS, ErrorCode.IO_ERROR}


@dataclass
class StreamCounters:
    """Each field has one writer: the acquisition thread (frames, missed_at_hand_off) or the
    sender thread (the rest)."""

    frames: int = 0  # seen by the hook
    missed_at_hand_off: int = 0  # queue full or sender stalled: never queued
    sent: int = 0  # handed to the daemon
    missed_offline: int = 0  # queued, but the daemon was unreachable
    unacknowledged: int = 0  # in flight when the daemon went away
    refused: int = 0  # the daemon answered with an error (frames and control calls)
    refusals: dict[str, int] = field(default_factory=dict)  # refused frames by error code
    write_failed: int = 0  # acknowledged, then not written (recoverable by reprocess)
    parts: list[str] = field(default_factory=list)  # acquisition ids used, in order
    outages: int = 0

    @property
    def missed(self) -> int:
        """Frames never handed to the daemon (Micro-Manager saved them raw all the same)."""
        return self.missed_at_hand_off + self.missed_offline

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "sent": self.sent,
            "missed": self.missed,
            "missed_at_hand_off": self.missed_at_hand_off,
            "unacknowledged": self.unacknowledged,
            "refused": self.refused,
            "refusals": dict(self.refusals),
            "write_failed": self.write_failed,
            "parts": list(self.parts),
            "outages": self.outages,
        }


class TimepointTracker:
    """Says when a timepoint is complete: all its expected images seen, or a later one began."""

    def __init__(self, images_per_timepoint: dict[int, int] | None = None) -> None:
        self.expected = images_per_timepoint or {}
        self._seen: Counter[int] = Counter()
        self._done: set[int] = set()

    def image(self, time_index: int) -> list[int]:
        """Record an image of `time_index`; returns the timepoints this completes, in order."""
        self._seen[time_index] += 1
        done = [t for t in sorted(self._seen) if t < time_index and t not in self._done]
        expected = self.expected.get(time_index)
        if expected is not None and self._seen[time_index] >= expected:
            done.append(time_index)
        self._done.update(done)
        return done

    def remaining(self) -> list[int]:
        return [t for t in sorted(self._seen) if t not in self._done]


# What the acquisition's calls hand the sender thread, one kind per call.
_Item = (
    tuple[Literal["start"]]
    | tuple[Literal["frame"], np.ndarray, Axes, float | None]
    | tuple[Literal["timepoint"], Axes]
    | tuple[Literal["end"], float | None]
)


class DaemonStream:
    """One acquisition's connection to the daemon, whose calls never block or raise in the
    acquisition thread (see the module doc)."""

    def __init__(
        self,
        acquisition_id: str,
        plan: Plan,
        address: str = "tcp://127.0.0.1:5555",
        timeout_s: float = 1.0,
        window: int = 64,
        retry_s: float = 2.0,
        shared_memory_min_bytes: int | None = None,
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
        images_per_timepoint: dict[int, int] | None = None,
        queue_frames: int = 32,
        stall_s: float = 0.5,
    ) -> None:
        """`images_per_timepoint`: how many images complete each timepoint (else a timepoint
        is complete when a later one begins, or at the end). `queue_frames`: frames waiting
        for the sender at most; `stall_s`: a sender blocked this long on the daemon makes new
        frames count as missed instead of queueing behind it."""
        if queue_frames < 1 or stall_s <= 0:
            raise ValueError("queue_frames must be >= 1 and stall_s > 0")
        self.base_id, self.plan = acquisition_id, plan
        self.tracker = TimepointTracker(images_per_timepoint)
        self.address, self.retry_s, self.secure = address, retry_s, secure
        self.queue_frames, self.stall_s = queue_frames, stall_s
        self.counters = StreamCounters()
        self.client = DaemonClient(address, timeout_s, window, shared_memory_min_bytes, secure)
        self.online = False
        self.started_reply: dict[str, Any] = {}
        self.final_state: dict[str, Any] = {}
        self.daemon_status: dict[str, Any] = {}
        self._back = threading.Event()  # set by the watcher when the daemon answers again
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        # the hand-off: items for the sender, frames among them bounded by queue_frames
        self._items: deque[_Item] = deque()
        self._queued_frames = 0
        self._ready = threading.Condition()
        self._busy_since: float | None = None  # when the sender's current daemon call began
        self._sender = threading.Thread(target=self._run, name="livedecon-sender", daemon=True)
        self._done = threading.Event()  # the sender has ended the acquisition and stopped
        self._ended = False
        self._other_refusals = 0  # refused control requests (starts, timepoints, end)
        self.hand_off_s: deque[float] = deque(maxlen=100_000)  # per frame() call

    @property
    def acquisition_id(self) -> str | None:
        return self.counters.parts[-1] if self.counters.parts else None

    # -- the acquisition's calls: never raise, never wait on the daemon -------------------

    def start(self) -> None:
        if not self._sender.is_alive() and not self._done.is_set():
            self._sender.start()
        self._put(("start",))

    def frame(self, image: np.ndarray, axes: Axes, timestamp_s: float | None = None) -> None:
        """Hand one frame to the sender (or count it missed), and the timepoints it completes.
        The image is not copied: it must not change afterwards (camera images are new arrays)."""
        began = time.perf_counter()
        self.counters.frames += 1
        busy = self._busy_since
        with self._ready:
            stalled = busy is not None and time.monotonic() - busy > self.stall_s
            if stalled or self._queued_frames >= self.queue_frames or self._ended:
                self.counters.missed_at_hand_off += 1
            else:
                self._items.append(("frame", image, axes, timestamp_s))
                self._queued_frames += 1
                self._ready.notify()
            for t in self.tracker.image(axes.time):
                # bounded too: behind a sender stuck for long, later boundaries are dropped
                if not self._ended and len(self._items) < 2 * self.queue_frames + 16:
                    self._items.append(("timepoint", Axes(time=t)))
        self.hand_off_s.append(time.perf_counter() - began)

    def timepoint_done(self, axes: Axes) -> None:
        self._put(("timepoint", axes))

    def end(self, wait_s: float | None = None) -> dict[str, Any]:
        """Close the open timepoints and end the acquisition on the daemon. Returns at once
        with {} unless `wait_s` is given: then it waits up to `wait_s` (this call, not the
        frames, is held) for every frame to be written, and returns the daemon's final state."""
        with self._ready:
            if self._ended:
                return self.final_state
            for t in self.tracker.remaining():
                self._items.append(("timepoint", Axes(time=t)))
            self._items.append(("end", wait_s))
            self._ended = True
            self._ready.notify()
        if not self._sender.is_alive() and not self._done.is_set():
            self._sender.start()  # ended without a start: the sender just finishes
        if wait_s is None:
            return {}
        return self.join(wait_s + 2 * self.client.timeout_s + 1)

    def join(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for the sender to finish (after `end`); the daemon's final state, if known."""
        self._done.wait(timeout_s)
        return self.final_state

    def close(self) -> None:
        """Stop at once: what is still queued is dropped (counted as missed)."""
        self._closed.set()
        with self._ready:
            if not self._ended:
                self._items.append(("end", None))
                self._ended = True
            self._ready.notify()
        if not self._sender.is_alive() and not self._done.is_set():
            self.client.close()
            self._done.set()

    def hand_off_stats(self) -> dict[str, float]:
        """Time `frame` took on the acquisition thread, in microseconds."""
        samples = sorted(self.hand_off_s)
        if not samples:
            return {"n": 0}
        return {
            "n": len(samples),
            "p50_us": samples[len(samples) // 2] * 1e6,
            "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
            "max_us": samples[-1] * 1e6,
        }

    def _put(self, item: _Item) -> None:
        with self._ready:
            if self._ended:
                return
            self._items.append(item)
            self._ready.notify()

    # -- the sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._ready:
                    while not self._items:
                        self._ready.wait()
                    item = self._items.popleft()
                    if item[0] == "frame":
                        self._queued_frames -= 1
                kind = item[0]
                if self._closed.is_set() and kind != "end":
                    self.counters.missed_offline += kind == "frame"
                    continue
                try:
                    if item[0] == "start":
                        self._open_part(self.base_id)
                    elif item[0] == "frame":
                        self._send_frame(*item[1:])
                    elif item[0] == "timepoint":
                        self._timepoint_done(item[1])
                    elif item[0] == "end":
                        if not self._closed.is_set():
                            self.final_state = self._finish(item[1])
                        return
                except Exception:  # never let the sender die with frames queued behind it
                    log.exception("livedecon sender failed on a %s", kind)
                finally:
                    self._busy_since = None
                    self._note_client()
        finally:
            self._closed.set()
            self.client.close()
            self._done.set()
            log.info("livedecon stream ended: %s", self.counters.summary())

    def _note_client(self) -> None:
        self.counters.write_failed = self.client.write_failures
        self.counters.refusals = dict(self.client.refusals)
        self.counters.refused = self._other_refusals + self.client.refused_frames

    def _call(self, call: Callable[[], Any]) -> Any:
        self._busy_since = time.monotonic()
        try:
            return call()
        finally:
            self._busy_since = None

    def _send_frame(self, image: np.ndarray, axes: Axes, timestamp_s: float | None) -> None:
        if not self.online and self._back.is_set():
            self._resume()
        if not self.online:
            self.counters.missed_offline += 1
            return
        try:
            self._call(lambda: self.client.send(image, axes, timestamp_s=timestamp_s))
            self.counters.sent += 1
        except DaemonUnavailable as exc:
            self.counters.missed_offline += 1
            self._go_offline(exc)
        except DaemonError as exc:  # an earlier frame refused; this one was sent
            self.counters.sent += 1
            self._refused(exc)

    def _finish(self, wait_s: float | None) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if not self.online and self._back.is_set():
            self._resume()
        if self.online:
            try:
                self._call(self.client.flush)
            except DaemonError as exc:
                if isinstance(exc, DaemonUnavailable):
                    self._go_offline(exc)
                else:
                    self._refused(exc)
        if self.online:
            try:
                state = self._call(lambda: self.client.end(wait_s))
            except DaemonUnavailable as exc:
                self._go_offline(exc)
            except DaemonError as exc:
                self._refused(exc)
        return state

    # -- connection state (sender thread) ----------------------------------------------------

    def _open_part(self, acquisition_id: str) -> None:
        try:
            self.started_reply = self._call(lambda: self.client.start(acquisition_id, self.plan))
        except DaemonUnavailable as exc:
            self._go_offline(exc)
            return
        except DaemonError as exc:
            self._other_refusals += 1
            if exc.code in RETRIED_STARTS:  # it may take it later: ask again every retry_s
                log.warning(
                    "livedecon daemon cannot take acquisition %s now (%s); frames pass through"
                    " unprocessed, asking again every %.0f s",
                    acquisition_id,
                    exc,
                    self.retry_s,
                )
                self._watch_for_daemon()
                return
            # Refused (a plan the daemon cannot serve): processing is off, the acquisition goes on.
            log.error("livedecon daemon refused acquisition %s: %s", acquisition_id, exc.message)
            return
        self.counters.parts.append(acquisition_id)
        self.online = True
        log.info("livedecon: streaming %s to %s", acquisition_id, self.address)

    def _timepoint_done(self, axes: Axes) -> None:
        self._control(lambda: self.client.timepoint_done(axes))

    def _control(self, call: Callable[[], Any]) -> None:
        if not self.online and self._back.is_set():
            self._resume()
        if not self.online:
            return
        try:
            self._call(call)
        except DaemonUnavailable as exc:
            self._go_offline(exc)
        except DaemonError as exc:
            self._refused(exc)

    def _refused(self, exc: DaemonError) -> None:
        if exc.frame_id is None:  # refused frames are counted by the client, every one
            self._other_refusals += 1
        log.warning("livedecon daemon refused a request: %s", exc)

    def _go_offline(self, exc: Exception) -> None:
        if self.online:
            self.counters.unacknowledged += self.client.in_flight
            self.counters.outages += 1
        self.online = False
        log.warning(
            "livedecon daemon unavailable (%s); frames pass through unprocessed, retrying every"
            " %.0f s",
            exc,
            self.retry_s,
        )
        self._watch_for_daemon()

    def _watch_for_daemon(self) -> None:
        """Probe the daemon every retry_s; the next item after it answers resumes."""
        self._back.clear()
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(
                target=self._watch, name="livedecon-watch", daemon=True
            )
            self._watcher.start()

    def _watch(self) -> None:
        """Probe the daemon with a client of its own (ours is not thread-safe)."""
        while not self._closed.wait(self.retry_s):
            probe = DaemonClient(self.address, timeout_s=min(1.0, self.retry_s), secure=self.secure)
            try:
                self.daemon_status = probe.status()
                self._back.set()
                return
            except DaemonError:
                continue
            finally:
                probe.close()

    def _resume(self) -> None:
        """The daemon answers again: same acquisition if it still has it, else a new part."""
        self._back.clear()
        self.client.reconnect()
        current = self.acquisition_id
        acquisitions = self.daemon_status.get("acquisitions", {})
        if current is not None and current in acquisitions and not acquisitions[current]["ended"]:
            self.online = True
            log.info("livedecon: the daemon is back; continuing %s", current)
            return
        parts = self.counters.parts
        self._open_part(f"{self.base_id}-part{len(parts) + 1}" if parts else self.base_id)


def ended_state(own: dict[str, Any], stream: DaemonStream | None) -> dict[str, Any]:
    """A hook's view of the daemon's final state: what its own end call returned, else what
    the stream's sender got when it ended the acquisition ({} until then)."""
    return own or (stream.final_state if stream is not None else {})
