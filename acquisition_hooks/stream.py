"""The acquisition side of the daemon connection: it never harms the acquisition.

`DaemonStream` wraps a `DaemonClient` for hooks that run inside an acquisition: no call
raises, and none blocks longer than the client's timeout. When the daemon stops answering the
stream goes offline: frames pass on untouched, each one is counted as missed (Micro-Manager
still saves them raw), and a background watcher probes the daemon every `retry_s`. When it
answers again the stream reconnects: into the same acquisition if the daemon still has it (it
was only slow), else as a new part `<id>-part<N>` (the daemon restarted; the gap shows in the
counters and in the parts' outputs).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from livedecon.daemon.client import DaemonClient, DaemonError, DaemonUnavailable
from livedecon.daemon.protocol import Axes, Plan

log = logging.getLogger(__name__)


@dataclass
class StreamCounters:
    frames: int = 0  # seen by the hook
    sent: int = 0  # handed to the daemon
    missed: int = 0  # not sent: the daemon was unreachable or too slow
    unacknowledged: int = 0  # in flight when the daemon went away
    refused: int = 0  # the daemon answered with an error
    parts: list[str] = field(default_factory=list)  # acquisition ids used, in order
    outages: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "sent": self.sent,
            "missed": self.missed,
            "unacknowledged": self.unacknowledged,
            "refused": self.refused,
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


class DaemonStream:
    def __init__(
        self,
        acquisition_id: str,
        plan: Plan,
        address: str = "tcp://127.0.0.1:5555",
        timeout_s: float = 1.0,
        window: int = 64,
        retry_s: float = 2.0,
        shared_memory_min_bytes: int | None = None,
        secure: Callable[[zmq.Socket], None] | None = None,
        images_per_timepoint: dict[int, int] | None = None,
    ) -> None:
        """`images_per_timepoint`: how many images complete each timepoint (else a timepoint
        is complete when a later one begins, or at the end)."""
        self.base_id, self.plan = acquisition_id, plan
        self.tracker = TimepointTracker(images_per_timepoint)
        self.address, self.retry_s, self.secure = address, retry_s, secure
        self.counters = StreamCounters()
        self.client = DaemonClient(address, timeout_s, window, shared_memory_min_bytes, secure)
        self.online = False
        self.started_reply: dict[str, Any] = {}
        self._back = threading.Event()  # set by the watcher when the daemon answers again
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        self.daemon_status: dict[str, Any] = {}

    @property
    def acquisition_id(self) -> str | None:
        return self.counters.parts[-1] if self.counters.parts else None

    # -- the acquisition's calls (never raise) --------------------------------------------

    def start(self) -> None:
        self._open_part(self.base_id)

    def frame(self, image: np.ndarray, axes: Axes, timestamp_s: float | None = None) -> None:
        """Send one frame, and the timepoints it completes."""
        self._send_frame(image, axes, timestamp_s)
        for t in self.tracker.image(axes.time):
            self.timepoint_done(Axes(time=t))

    def _send_frame(self, image: np.ndarray, axes: Axes, timestamp_s: float | None) -> None:
        self.counters.frames += 1
        if not self.online and self._back.is_set():
            self._resume()
        if not self.online:
            self.counters.missed += 1
            return
        try:
            self.client.send(image, axes, timestamp_s=timestamp_s)
            self.counters.sent += 1
        except DaemonUnavailable as exc:
            self.counters.missed += 1
            self._go_offline(exc)
        except DaemonError as exc:  # an earlier frame refused; this one was sent
            self.counters.sent += 1
            self._refused(exc)

    def timepoint_done(self, axes: Axes) -> None:
        self._control(lambda: self.client.timepoint_done(axes))

    def end(self, wait_s: float | None = None) -> dict[str, Any]:
        """Close the open timepoints and end the acquisition on the daemon (waiting up to
        `wait_s` for it to be written)."""
        for t in self.tracker.remaining():
            self.timepoint_done(Axes(time=t))
        state: dict[str, Any] = {}
        if not self.online and self._back.is_set():
            self._resume()
        if self.online:
            try:
                self.client.flush()
            except DaemonError as exc:
                if isinstance(exc, DaemonUnavailable):
                    self._go_offline(exc)
                else:
                    self._refused(exc)
        if self.online:
            try:
                state = self.client.end(wait_s)
            except DaemonUnavailable as exc:
                self._go_offline(exc)
            except DaemonError as exc:
                self._refused(exc)
        self.close()
        log.info("livedecon stream ended: %s", self.counters.summary())
        return state

    def close(self) -> None:
        self._closed.set()
        self.client.close()

    # -- connection state ------------------------------------------------------------------

    def _open_part(self, acquisition_id: str) -> None:
        try:
            self.started_reply = self.client.start(acquisition_id, self.plan)
        except DaemonUnavailable as exc:
            self._go_offline(exc)
            return
        except DaemonError as exc:
            # Refused (a plan the daemon cannot serve): processing is off, the acquisition goes on.
            log.error("livedecon daemon refused acquisition %s: %s", acquisition_id, exc.message)
            self.counters.refused += 1
            return
        self.counters.parts.append(acquisition_id)
        self.online = True
        log.info("livedecon: streaming %s to %s", acquisition_id, self.address)

    def _control(self, call: Callable[[], Any]) -> None:
        if not self.online and self._back.is_set():
            self._resume()
        if not self.online:
            return
        try:
            call()
        except DaemonUnavailable as exc:
            self._go_offline(exc)
        except DaemonError as exc:
            self._refused(exc)

    def _refused(self, exc: DaemonError) -> None:
        self.counters.refused += 1
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
