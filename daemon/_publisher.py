"""The display stream: restored (and, on request, raw) images on an XPUB socket.

Display is latest-wins: each stream (topic, acquisition, channel, position) has one slot; an
image that is replaced before it was sent is counted as dropped, never queued behind the
newer one, so a slow viewer cannot hold memory or delay the pipeline. XPUB tells the daemon
which topics have subscribers, so raw frames and whole volumes cost nothing unless wanted.
The socket belongs to the publisher thread; other threads hand images over with `offer`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import zmq

from livedecon.daemon._protocol import Publication, Topic, encode_publication
from livedecon.daemon._telemetry import Metrics

log = logging.getLogger(__name__)
_ids = itertools.count()


class Publisher(threading.Thread):
    """The publisher thread: owns the XPUB socket and sends the newest image of each stream."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        metrics: Metrics,
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
    ) -> None:
        super().__init__(name="publisher", daemon=True)
        self.metrics = metrics
        self._context, self._endpoint, self._secure = context, endpoint, secure
        self._wake_address = f"inproc://livedecon-publisher-wake-{next(_ids)}"
        # per stream (topic, acquisition, channel, position): the newest image, when ready
        self._slots: dict[
            tuple[Topic, str, int | str, int | str], tuple[Publication, np.ndarray, float]
        ] = {}
        self._lock = threading.Lock()
        self._subscribed: set[bytes] = set()
        self._stopping = threading.Event()
        self._local = threading.local()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def wants(self, topic: Topic) -> bool:
        """Whether any subscriber would receive `topic` (an empty subscription takes all)."""
        name = topic.value.encode()
        return any(name.startswith(prefix) for prefix in self._subscribed)

    def offer(self, publication: Publication, pixels: np.ndarray, ready_s: float) -> None:
        """Hand an image over for display (latest wins); `ready_s` is when it was produced."""
        key = (
            publication.topic,
            publication.acquisition_id,
            publication.axes.channel,
            publication.axes.position,
        )
        with self._lock:
            if key in self._slots:
                self.metrics.count("display_dropped")
            self._slots[key] = (publication, pixels, ready_s)
        waker = getattr(self._local, "waker", None)
        if waker is None:
            waker = self._local.waker = self._context.socket(zmq.PUSH)
            waker.setsockopt(zmq.SNDHWM, 1)
            waker.setsockopt(zmq.LINGER, 0)
            waker.connect(self._wake_address)
        with contextlib.suppress(zmq.Again):  # a wake-up already pending sends this slot too
            waker.send(b"", zmq.NOBLOCK)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # surfaced by the server; the thread must not die silently
            self.error = exc
            self.ready.set()
            log.exception("publisher failed")

    def _serve(self) -> None:
        xpub = self._context.socket(zmq.XPUB)
        wake = self._context.socket(zmq.PULL)
        try:
            xpub.setsockopt(zmq.SNDHWM, 8)  # a slow viewer loses frames at the socket
            xpub.setsockopt(zmq.LINGER, 0)
            if self._secure:
                self._secure(xpub)
            xpub.bind(self._endpoint)
            wake.bind(self._wake_address)
            poller = zmq.Poller()
            poller.register(xpub, zmq.POLLIN)
            poller.register(wake, zmq.POLLIN)
            self.ready.set()
            while not self._stopping.is_set():
                events = dict(poller.poll(100))
                if xpub in events:
                    self._subscriptions(xpub)
                if wake in events:
                    while True:
                        try:
                            wake.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                    self._send_pending(xpub)
        finally:
            xpub.close()
            wake.close()

    def _subscriptions(self, xpub: zmq.Socket[bytes]) -> None:
        while True:
            try:
                message = xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] == b"\x01":
                self._subscribed.add(message[1:])
            elif message[:1] == b"\x00":
                self._subscribed.discard(message[1:])

    def _send_pending(self, xpub: zmq.Socket[bytes]) -> None:
        with self._lock:
            pending, self._slots = self._slots, {}
        for publication, pixels, ready_s in pending.values():
            publication = publication.model_copy(update={"published_s": time.time()})
            xpub.send_multipart(encode_publication(publication, pixels), copy=False)
            self.metrics.observe("publish", time.perf_counter() - ready_s)
            self.metrics.count("frames_published")
