"""`DaemonClient`: what acquisition hooks use to stream frames to the daemon.

Frames go out zero-copy (the array must not change until acknowledged; camera buffers from
Micro-Manager are fresh arrays) or, for large frames on the same host, through a shared-memory
ring. At most `window` frames are unacknowledged; no call blocks longer than `timeout_s`.
Replies arrive in request order, so each one is matched to the oldest request in flight. A
daemon error becomes a `DaemonError` carrying the daemon's sentence; an error about an earlier
frame is raised by the next call (after that call's own frame was sent). Every refused frame is
counted in `refused_frames` (by code in `refusals`), also those whose error was not raised.

Acknowledged planes that the daemon later failed to write (a disk removed, an I/O error) are
reported in the reply to the next call about the acquisition; they are counted in
`write_failures`, their sentences kept in `warnings` and logged, and nothing is raised: the
frames stay recoverable by `livedecon reprocess` and the acquisition goes on.

Not thread-safe: use one client per thread.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import zmq

from livedecon.daemon._protocol import (
    PROTOCOL_VERSION,
    Axes,
    ErrorCode,
    Header,
    Kind,
    Plan,
    Reply,
    SharedMemorySlot,
    encode,
    frame_header,
)

log = logging.getLogger(__name__)


class DaemonError(Exception):
    """The daemon refused a request; `code` says why, `message` is the daemon's sentence."""

    def __init__(self, code: str, message: str, frame_id: int | None = None) -> None:
        where = f" (frame {frame_id})" if frame_id is not None else ""
        super().__init__(f"{code}{where}: {message}")
        self.code, self.message, self.frame_id = code, message, frame_id


class DaemonUnavailable(DaemonError):  # noqa: N818 (reads as a state, like TimeoutError)
    """No daemon answered in time (not running, unreachable, or refused our keys)."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


class DaemonClient:
    """Streams frames of an acquisition to a daemon and collects its acknowledgements
    (see the module docstring for the guarantees)."""

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        timeout_s: float = 5.0,
        window: int = 64,
        shared_memory_min_bytes: int | None = None,
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        """`shared_memory_min_bytes`: frames this large or larger travel through a
        shared-memory ring (daemon on the same host); None: always over the socket."""
        if window < 1 or timeout_s <= 0:
            raise ValueError("window must be >= 1 and timeout_s > 0")
        self.address, self.timeout_s, self.window = address, timeout_s, window
        self.shared_memory_min_bytes = shared_memory_min_bytes
        self._context = context or zmq.Context.instance()
        self._secure = secure
        self._pending: deque[tuple[Kind, int | None]] = deque()
        self._errors: list[DaemonError] = []
        self._ring: shared_memory.SharedMemory | None = None
        self._ring_slot_bytes = 0
        self._sent_frames = 0
        self.refused_frames = 0
        self.refusals: Counter[str] = Counter()
        self.write_failures = 0
        self._failures_told = 0  # of the current acquisition, as its replies said
        self.warnings: deque[str] = deque(maxlen=100)
        self.acquisition_id: str | None = None
        self._next_frame_id = 0
        self._socket = self._connect()

    def _connect(self) -> zmq.Socket[bytes]:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a daemon that is not there
        socket.setsockopt(zmq.SNDHWM, self.window + 8)
        if self._secure:
            self._secure(socket)
        socket.connect(self.address)
        return socket

    def reconnect(self) -> None:
        """Drop the connection and everything in flight (after the daemon restarted)."""
        self._socket.close(linger=0)
        self._pending.clear()
        self._errors.clear()
        self._socket = self._connect()

    # -- acquisition -------------------------------------------------------------------------

    def start(self, acquisition_id: str, plan: Plan) -> dict[str, Any]:
        header = Header(
            version=PROTOCOL_VERSION,
            kind=Kind.ACQUISITION_START,
            acquisition_id=acquisition_id,
            plan=plan,
        )
        reply = self._request(header)
        self.acquisition_id, self._next_frame_id = acquisition_id, 0
        self._failures_told = 0
        return reply.data

    def send(
        self,
        image: np.ndarray,
        axes: Axes | None = None,
        timestamp_s: float | None = None,
        pixel_size_um: float | None = None,
    ) -> int:
        """Queue one frame (Y, X) or stack (Z, Y, X); returns its frame id once sent."""
        if self.acquisition_id is None:
            raise RuntimeError("call start() before send()")
        deadline = time.monotonic() + self.timeout_s
        while len(self._pending) >= self.window:
            self._receive(deadline)
        frame_id = self._next_frame_id
        image = np.ascontiguousarray(image)
        header = frame_header(
            self.acquisition_id, frame_id, image, axes or Axes(), pixel_size_um, timestamp_s
        )
        if (
            self.shared_memory_min_bytes is not None
            and image.nbytes >= self.shared_memory_min_bytes
        ):
            slot = self._place_in_ring(image)
            frames = encode(header.model_copy(update={"shm": slot}))
        else:
            frames = encode(header, image)
        self._send(frames, Kind.FRAME, frame_id, deadline)
        self._next_frame_id += 1
        self._drain()
        self._raise_pending()
        return frame_id

    def timepoint_done(self, axes: Axes) -> None:
        self._request(self._header(Kind.TIMEPOINT_DONE, axes=axes))

    def end(self, wait_s: float | None = None) -> dict[str, Any]:
        """End the acquisition; with `wait_s`, also wait until every frame is written."""
        reply = self._request(self._header(Kind.ACQUISITION_END))
        acquisition_id, self.acquisition_id = self.acquisition_id, None
        if wait_s is None:
            return reply.data
        deadline = time.monotonic() + wait_s
        while True:
            state = self.status()["acquisitions"].get(acquisition_id, {})
            if state.get("finished"):
                self._note_failures(state.get("write_failures", 0), state.get("missing", {}))
                return state
            if time.monotonic() > deadline:
                raise DaemonUnavailable(
                    f"acquisition {acquisition_id} not finished after {wait_s} s: {state}"
                )
            time.sleep(0.05)

    def flush(self) -> None:
        """Wait for every frame in flight to be acknowledged."""
        deadline = time.monotonic() + self.timeout_s
        while self._pending:
            self._receive(deadline)
        self._raise_pending()

    # -- control -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._request(self._header(Kind.STATUS)).data

    def metrics(self) -> dict[str, Any]:
        return self._request(self._header(Kind.METRICS)).data

    def load_model(self, bundle: str) -> dict[str, Any]:
        return self._request(self._header(Kind.LOAD_MODEL, request={"bundle": bundle})).data

    def adaptation(self, action: str = "status", **request: Any) -> dict[str, Any]:
        """Adaptation of the current acquisition: 'status', 'set' (plan={...}) or 'rollback'
        (version=N, default: the previous version)."""
        header = self._header(Kind.ADAPTATION, request={"action": action, **request})
        return self._request(header).data

    def shutdown(self) -> None:
        self._request(self._header(Kind.SHUTDOWN))

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._ring is not None:
            self._ring.close()
            self._ring.unlink()
            self._ring = None

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        return sum(kind is Kind.FRAME for kind, _ in self._pending)

    # -- plumbing ----------------------------------------------------------------------------

    def _header(self, kind: Kind, **fields: Any) -> Header:
        acquisition = (
            {"acquisition_id": self.acquisition_id}
            if kind in (Kind.TIMEPOINT_DONE, Kind.ACQUISITION_END, Kind.ADAPTATION)
            else {}
        )
        if acquisition and self.acquisition_id is None:
            raise RuntimeError(f"{kind} needs a started acquisition")
        return Header(version=PROTOCOL_VERSION, kind=kind, **acquisition, **fields)

    def _request(self, header: Header) -> Reply:
        deadline = time.monotonic() + self.timeout_s
        self._send(encode(header), header.kind, None, deadline)
        while True:  # earlier frames' acks come first: replies are in request order
            reply, (kind, _) = self._receive(deadline)
            if kind is header.kind:
                break
        if not reply.ok:
            raise DaemonError(reply.code or ErrorCode.INTERNAL, reply.message or "")
        self._raise_pending()
        return reply

    def _send(
        self, frames: list[bytes | memoryview], kind: Kind, frame_id: int | None, deadline: float
    ) -> None:
        while True:
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise DaemonUnavailable(
                        f"could not send to the daemon at {self.address} within "
                        f"{self.timeout_s} s (not running, or not accepting this client)"
                    ) from None
                self._drain()
                time.sleep(0.001)
        self._pending.append((kind, frame_id))
        self._sent_frames += kind is Kind.FRAME

    def _receive(self, deadline: float) -> tuple[Reply, tuple[Kind, int | None]]:
        """Wait (until `deadline`) for the next reply and match it to its request."""
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1e3))
        if not self._socket.poll(remaining_ms):
            raise DaemonUnavailable(
                f"no reply from the daemon at {self.address} within {self.timeout_s} s"
            )
        return self._take(self._socket.recv())

    def _drain(self) -> None:
        while self._pending:
            try:
                raw = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._take(raw)

    def _take(self, raw: bytes) -> tuple[Reply, tuple[Kind, int | None]]:
        reply = Reply.model_validate_json(raw)
        request = self._pending.popleft() if self._pending else (Kind.STATUS, None)
        kind, frame_id = request
        failed = reply.data.get("write_failed") if reply.ok else None
        if isinstance(failed, dict):
            self._note_failures(int(failed.get("total", 0)), failed)
        if not reply.ok and kind is Kind.FRAME:
            self.refused_frames += 1
            self.refusals[str(reply.code)] += 1
            self._errors.append(
                DaemonError(reply.code or ErrorCode.INTERNAL, reply.message or "", frame_id)
            )
        return reply, request

    def _note_failures(self, total: int, about: dict[str, Any]) -> None:
        """The daemon says `total` acknowledged planes of this acquisition failed to be
        written: count the ones not heard of before, keep and log the sentence."""
        if total <= self._failures_told:
            return
        self.write_failures += total - self._failures_told
        self._failures_told = total
        message = about.get("message") or (
            f"{total} acknowledged plane(s) could not be written ({about.get('latest_error')});"
            f" recover them with `{about.get('recover')}`"
        )
        self.warnings.append(str(message))
        log.warning("livedecon daemon: %s", message)

    def _raise_pending(self) -> None:
        if self._errors:
            error = self._errors.pop(0)
            self._errors.clear()
            raise error

    def _place_in_ring(self, image: np.ndarray) -> SharedMemorySlot:
        """Copy into slot (frames sent % window) of a ring sized for `window` frames: a slot
        is reused only after `window` newer sends, by which time its frame was acknowledged."""
        if self._ring is None or image.nbytes > self._ring_slot_bytes:
            if self._ring is not None:
                self.flush()
                self._ring.close()
                self._ring.unlink()
            self._ring_slot_bytes = image.nbytes
            self._ring = shared_memory.SharedMemory(create=True, size=image.nbytes * self.window)
        offset = (self._sent_frames % self.window) * self._ring_slot_bytes
        target = np.ndarray(image.shape, image.dtype, buffer=self._ring.buf, offset=offset)
        target[...] = image
        return SharedMemorySlot(segment=self._ring.name, offset=offset, length=image.nbytes)
