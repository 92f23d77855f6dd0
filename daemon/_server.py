"""The daemon: a ROUTER socket for ingest and control, the pipeline threads, the publisher.

The ingest thread (the one that calls `serve`) validates each message, records it, queues it
and acknowledges it; an acknowledged frame is in the journal and in the queue (memory or
disk). Every request gets exactly one reply, in order; a bad request gets an error reply and
changes nothing else.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import threading
import time
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any, Literal

import zmq
from pydantic import ValidationError

from livedecon.daemon._adaptation_scheduler import adaptation_for
from livedecon.daemon._daemon_config import NO_CORRECTION, DaemonConfig
from livedecon.daemon._diskspace import FreeSpace, contained, sub_path
from livedecon.daemon._journal import (
    ACQUISITION_FILE,
    AcquisitionRecord,
    Journal,
    JournalEntry,
    safe_name,
    write_acquisition_record,
)
from livedecon.daemon._pipeline import (
    IDLE_CLOSE,
    Acquisition,
    Job,
    JobQueue,
    Worker,
    WriterThread,
    planned_plane_bytes,
)
from livedecon.daemon._processing import (
    AdaptableProcessor,
    IsotropicProcessor,
    ModelProcessor,
    PassThrough,
    Processor,
    Stream,
    open_isotropic,
    open_processor,
)
from livedecon.daemon._protocol import (
    AdaptationPlan,
    ErrorCode,
    Header,
    Kind,
    Plan,
    ProtocolError,
    Reply,
    decode,
    parse_header,
)
from livedecon.daemon._publisher import Publisher
from livedecon.daemon._security import server_security
from livedecon.daemon._sim_processing import MIN_SIM_PX, SimProcessor
from livedecon.daemon._spill import SpillStore
from livedecon.daemon._telemetry import Metrics
from livedecon.daemon._writer import output_path
from livedecon.engines._bundle import BundleError
from livedecon.engines._ome_tiff import PIXEL_SIZE_TOLERANCE
from livedecon.engines._selfnet import MIN_PLANES as MIN_ISOTROPIC_PLANES

log = logging.getLogger(__name__)
PASS_THROUGH = "pass-through"
FINISHED_KEPT = 100  # ended acquisitions still listed by `status`
REFUSALS_LOGGED = 20  # per second
SEGMENTS_KEPT = 16  # shared-memory segments kept mapped (clients' rings), least recent closed
FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _io_refusal(exc: OSError, what: str) -> ProtocolError:
    """A failed write before the ack, as the refusal the client gets."""
    if exc.errno in FULL_ERRNOS:
        return ProtocolError(
            ErrorCode.DISK_FULL, f"{what}: the disk is full ({exc.strerror}); frame refused"
        )
    return ProtocolError(ErrorCode.IO_ERROR, f"{what}: {exc.strerror or exc}; frame refused")


class Daemon:
    """The restoration server: receives frames on its sockets, restores them, writes and
    publishes them, and adapts its model between time points (`run` until stopped)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.metrics = Metrics(config.telemetry.latency_window)
        # Everything the daemon writes lies under these two, resolved once; a symbolic link
        # inside them that leads out is never followed.
        config.output_dir.mkdir(parents=True, exist_ok=True)
        self.root = config.output_dir.resolve()
        config.spill_path.mkdir(parents=True, exist_ok=True)
        self.spill_root = config.spill_path.resolve()
        self._spill_elsewhere = not self.spill_root.is_relative_to(self.root)
        storage = config.storage
        self.free = FreeSpace(
            int(storage.reserve_mb * 2**20), storage.free_check_ms / 1e3, self._pending_bytes
        )
        self.spill = SpillStore(self.spill_root)
        self.jobs = JobQueue(int(config.queues.memory_queue_mb * 2**20), self.spill, self.metrics)
        self.active: dict[str, Acquisition] = {}
        self.ended: dict[str, Acquisition] = {}
        self._processors: dict[str, Processor] = {}
        self._chains: dict[tuple[str, str, float], IsotropicProcessor] = {}
        self._segments: dict[str, shared_memory.SharedMemory] = {}
        self._stopping = threading.Event()
        self._refusal_window: list[float] = [0.0, 0, 0]  # window start, logged, not logged
        self._secure, self._authenticator = None, None
        if config.endpoints.curve_keys_dir is not None:
            self._secure, self._authenticator = server_security(
                self.context, config.endpoints.curve_keys_dir
            )
        self.default_model = config.model.bundle
        self._processor(self.default_model)  # fail at start, not at the first acquisition
        self.writer = WriterThread(config.queues.write_queue_planes, self.metrics)
        self.publisher = Publisher(
            self.context, config.endpoints.publish, self.metrics, self._secure
        )
        queues = config.queues
        self.worker = Worker(
            self.jobs,
            self.writer,
            self.publisher,
            self.metrics,
            queues.batch_max_frames,
            queues.batch_deadline_ms / 1e3,
            queues.stack_timeout_s,
        )
        self.metrics.gauges["jobs"] = self.jobs.depth
        self.metrics.gauges["write_planes"] = self.writer.queue.qsize

    # -- lifecycle ---------------------------------------------------------------------------

    def serve(self, ready: threading.Event | None = None) -> None:
        """Serve until a shutdown request or SIGTERM/SIGINT, then finish every queued frame."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stopping.set())
        self.publisher.start()
        self.publisher.ready.wait(10)
        if self.publisher.error is not None:
            raise RuntimeError(f"cannot publish on {self.config.endpoints.publish}") from (
                self.publisher.error
            )
        self.writer.start()
        self.worker.start()
        threading.Thread(target=self._sync_journals, name="journal-sync", daemon=True).start()
        router = self.context.socket(zmq.ROUTER)
        try:
            router.setsockopt(zmq.LINGER, 1000)
            # ZMQ stops reading a client that outruns its window, instead of buffering it all.
            router.setsockopt(zmq.RCVHWM, 2 * self.config.limits.max_inflight_frames + 16)
            # A part larger than any valid one (a header, a whole stack) closes its connection
            # before the daemon reads it.
            router.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_message_part_bytes)
            if self._secure:
                self._secure(router)
            router.bind(self.config.endpoints.ingest)
            log.info(
                "serving: ingest %s, publish %s, model %s, output %s",
                self.config.endpoints.ingest,
                self.config.endpoints.publish,
                self._describe(self._processor(self.default_model)),
                self.config.output_dir,
            )
            if ready is not None:
                ready.set()
            self._loop(router)
        finally:
            router.close()
            self._drain()

    def _loop(self, router: zmq.Socket[bytes]) -> None:
        next_log = time.monotonic() + self.config.telemetry.log_interval_s
        next_idle_check = time.monotonic() + 1.0
        last_logged: dict[str, int] = {}
        while not self._stopping.is_set():
            if router.poll(100):
                while not self._stopping.is_set():
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_message(router, frames)
            if time.monotonic() >= next_idle_check:
                next_idle_check = time.monotonic() + 1.0
                self._close_idle()
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + self.config.telemetry.log_interval_s
                if self.metrics.counters != last_logged:  # an idle daemon keeps quiet
                    last_logged = dict(self.metrics.counters)
                    log.info("%s", self.metrics.log_line())

    def _sync_journals(self) -> None:
        """The fsync policy (daemon/_journal.py): what was acknowledged reaches the disk within
        storage.journal_fsync_s."""
        interval = self.config.storage.journal_fsync_s
        if interval == 0:
            return  # every line is fsynced before its ack
        while not self._stopping.wait(interval):
            for acquisition in tuple(self.active.values()):
                if acquisition.journal is not None:
                    acquisition.journal.sync()

    def _close_idle(self) -> None:
        """Acquisitions silent for limits.idle_close_s give back their file descriptors (the
        journal here, the output files in the writer); their next message reopens them."""
        limit = self.config.limits.idle_close_s
        now = time.monotonic()
        for acquisition in tuple(self.active.values()):
            if not acquisition.idle_closed and now - acquisition.last_message_s > limit:
                acquisition.idle_closed = True
                if acquisition.journal is not None:
                    acquisition.journal.close()
                self.jobs.put(Job(acquisition, IDLE_CLOSE, Header(version=1, kind=Kind.STATUS)))
                log.info("acquisition %s idle for %.0f s: files closed", acquisition.id, limit)

    def _drain(self) -> None:
        log.info("shutting down: finishing %s", self.jobs.depth())
        for acquisition in self.active.values():
            if acquisition.journal:
                acquisition.journal.close()
        self.worker.stop()
        self.worker.join()
        self.writer.join()
        self.publisher.stop()
        self.publisher.join(5)
        for segment in self._segments.values():
            segment.close()
        if self._authenticator is not None:
            self._authenticator.stop()
        log.info("stopped; %s", self.metrics.log_line())

    # -- messages ----------------------------------------------------------------------------

    def _on_message(self, router: zmq.Socket[bytes], frames: list[zmq.Frame]) -> None:
        received = time.perf_counter()
        # DEALER clients send [identity, header, payload]; REQ ones add an empty delimiter.
        envelope = 2 if len(frames) > 1 and len(frames[1].bytes) == 0 else 1
        route = [frame.bytes for frame in frames[:envelope]]
        parts = [frame.buffer for frame in frames[envelope:]]
        frame_id = None
        try:
            header, pixels = self._decode(parts)
            frame_id = header.frame_id
            reply = self._dispatch(header, pixels, received)
            reply = self._with_write_failures(header, reply)
        except ProtocolError as exc:
            self.metrics.count("errors")
            self._log_refusal(exc)
            reply = Reply.error(exc, frame_id)
        except Exception as exc:
            self.metrics.count("errors")
            log.exception("request failed")
            reply = Reply.error(
                ProtocolError(ErrorCode.INTERNAL, f"the daemon failed: {exc}"), frame_id
            )
        router.send_multipart([*route, reply.to_bytes()])
        self.metrics.observe("ingest", time.perf_counter() - received)

    def _log_refusal(self, exc: ProtocolError) -> None:
        """One warning line per refusal, at most REFUSALS_LOGGED a second (a flood of bad
        input must not flood the log); the rest are counted in the next line."""
        now = time.monotonic()
        if now - self._refusal_window[0] >= 1.0:
            self._refusal_window = [now, 0, self._refusal_window[2]]
        if self._refusal_window[1] >= REFUSALS_LOGGED:
            self._refusal_window[2] += 1
            return
        self._refusal_window[1] += 1
        suppressed, self._refusal_window[2] = self._refusal_window[2], 0
        more = f" ({suppressed} more refusals not logged)" if suppressed else ""
        log.warning("refused a message: %s%s", exc, more)

    def _with_write_failures(self, header: Header, reply: Reply) -> Reply:
        """A reply about an acquisition also tells of its planes that failed to be written
        since the client last heard (`data.write_failed`): acknowledged, then not written."""
        name = header.acquisition_id
        acquisition = self.active.get(name or "") or self.ended.get(name or "")
        if acquisition is None or acquisition.failures <= acquisition.reported_failures:
            return reply
        failed = acquisition.unreported_failures()
        return reply.model_copy(update={"data": {**reply.data, "write_failed": failed}})

    def _decode(self, parts: list[memoryview]) -> tuple[Header, Any]:
        limits = self.config.limits
        if not parts:
            raise ProtocolError(ErrorCode.BAD_JSON, "empty message")
        header = parse_header(parts[0], limits.max_header_bytes)
        shared = None
        if len(parts) == 1 and header.shm is not None:
            shared = self._shared_buffer(header)
        return decode(parts, limits.max_frame_pixels, limits.max_z, shared, header=header)

    def _shared_buffer(self, header: Header) -> memoryview:
        slot = header.shm
        assert slot is not None
        segment = self._segments.get(slot.segment)
        if segment is None:
            try:
                segment = shared_memory.SharedMemory(name=slot.segment)
            except (FileNotFoundError, ValueError, OSError):
                raise ProtocolError(
                    ErrorCode.MISSING_PAYLOAD,
                    f"shared-memory segment {slot.segment!r} does not exist on this host",
                ) from None
            # The client owns the segment; the tracker would otherwise unlink it when we exit.
            # It registered the POSIX name, which is the public name with its leading slash.
            resource_tracker.unregister(f"/{segment.name}", "shared_memory")
            self._segments[slot.segment] = segment
            while len(self._segments) > SEGMENTS_KEPT:  # names from clients: bound what we map
                oldest = next(iter(self._segments))
                old = self._segments.pop(oldest)
                try:
                    old.close()
                except BufferError:  # still viewed: keep it, try again later
                    self._segments[oldest] = old
                    break
        else:
            self._segments[slot.segment] = self._segments.pop(slot.segment)  # most recent last
        if slot.offset + slot.length > segment.size:
            raise ProtocolError(
                ErrorCode.PAYLOAD_LENGTH,
                f"slot {slot.offset}+{slot.length} runs past the segment's {segment.size} bytes",
            )
        buffer = segment.buf
        assert buffer is not None  # None only once closed, and _segments keeps open ones
        return buffer[slot.offset : slot.offset + slot.length]

    def _dispatch(self, header: Header, pixels: Any, received: float) -> Reply:
        kind = header.kind
        if kind is Kind.FRAME:
            return self._frame(header, pixels, received)
        if kind is Kind.ACQUISITION_START:
            return self._start(header)
        if kind is Kind.TIMEPOINT_DONE:
            acquisition = self._acquisition(header)
            self.jobs.put(Job(acquisition, kind, header, received_s=received))
            return Reply(ok=True)
        if kind is Kind.ACQUISITION_END:
            return self._end(header, received)
        if kind is Kind.STATUS:
            return Reply(ok=True, data=self.status())
        if kind is Kind.METRICS:
            return Reply(ok=True, data=self.metrics.snapshot())
        if kind is Kind.LOAD_MODEL:
            return self._load_model(header.request)
        if kind is Kind.ADAPTATION:
            return self._adaptation(header, received)
        if kind is Kind.SHUTDOWN:
            self._stopping.set()
            return Reply(ok=True, data={"message": "finishing queued frames, then stopping"})
        raise ProtocolError(
            ErrorCode.UNSUPPORTED, f"{kind} is not available in this version of the daemon"
        )

    def _acquisition(self, header: Header) -> Acquisition:
        acquisition = self.active.get(header.acquisition_id or "")
        if acquisition is None:
            state = "has ended" if header.acquisition_id in self.ended else "is not running"
            raise ProtocolError(
                ErrorCode.UNKNOWN_ACQUISITION,
                f"acquisition {header.acquisition_id!r} {state}; send acquisition_start first",
            )
        acquisition.last_message_s = time.monotonic()
        if acquisition.idle_closed:  # it speaks again: reopen what the idle close closed
            if acquisition.journal is not None:
                try:
                    acquisition.journal = Journal(
                        acquisition.directory, self.config.storage.journal_fsync_s
                    )
                except OSError as exc:
                    raise _io_refusal(exc, f"reopening the journal of {acquisition.id}") from None
            acquisition.idle_closed = False
        return acquisition

    def _output_directory(self, plan_output_dir: str | None, acquisition_id: str) -> Path:
        """Where an acquisition writes: inside the output root, whatever the client asked."""
        directory = self.root.joinpath(*sub_path(plan_output_dir), safe_name(acquisition_id))
        contained(self.root, directory)  # a symbolic link on the way that leads out: refused
        if directory.is_relative_to(self.spill_root) or self.spill_root.is_relative_to(directory):
            raise ProtocolError(
                ErrorCode.OUTPUT_CONFLICT,
                f"acquisition {acquisition_id!r} would write into (or around) the spill store"
                f" {self.spill_root}; use another id or output_dir",
            )
        return directory

    def _start(self, header: Header) -> Reply:
        plan, acquisition_id = header.plan, header.acquisition_id
        assert plan is not None
        assert acquisition_id is not None
        directory = self._output_directory(plan.output_dir, acquisition_id)
        contained(self.spill_root, self.spill.directory(acquisition_id))
        if acquisition_id in self.active or (plan.save and (directory / ACQUISITION_FILE).exists()):
            raise ProtocolError(
                ErrorCode.DUPLICATE_ACQUISITION,
                f"acquisition {acquisition_id!r} already exists (output {directory}); "
                "start it under a new id",
            )
        limit = self.config.limits.max_active_acquisitions
        if len(self.active) >= limit:
            raise ProtocolError(
                ErrorCode.TOO_MANY_ACQUISITIONS,
                f"{len(self.active)} acquisitions are running, the most this daemon takes"
                f" (limits.max_active_acquisitions = {limit}); end one first",
            )
        if plan.save:
            self.free.promise(self.root, 0, f"acquisition {acquisition_id!r}")
        if plan.sim is not None:  # patterns it finds are kept beside the output
            processor: Processor = self._sim(plan, directory if plan.save else None)
        else:
            processor = self._processor(plan.model or self.default_model)
        if plan.isotropic is not None:
            processor = self._isotropic(processor, plan)
        if isinstance(processor, ModelProcessor) and processor.bundle.manifest.is_sim:
            raise ProtocolError(
                ErrorCode.PLAN_MISMATCH,
                f"{processor.bundle_id} restores SR-SIM images: start a sim acquisition (raw"
                " SIM frames) with it as the model",
            )
        if processor.is_3d is not None and processor.is_3d != (plan.mode == "3d"):
            raise ProtocolError(
                ErrorCode.PLAN_MISMATCH,
                f"a {plan.mode} acquisition needs a {plan.mode} model; "
                f"{processor.bundle_id} is {'3d' if processor.is_3d else '2d'}",
            )
        trained_um = processor.trained_pixel_um
        if trained_um is not None:
            off = abs(plan.pixel_size_um / trained_um - 1)
            if off > PIXEL_SIZE_TOLERANCE:
                raise ProtocolError(
                    ErrorCode.PLAN_MISMATCH,
                    f"pixel size {plan.pixel_size_um} µm, but {processor.bundle_id} was trained"
                    f" at {trained_um} µm: its PSF would be the wrong width",
                )
        correction = processor.correction  # models only
        bundle_dir = processor.bundle_dir
        record = AcquisitionRecord(
            acquisition_id=acquisition_id,
            plan=plan,
            processor=_kind(processor),
            bundle_path=str(bundle_dir) if bundle_dir is not None else None,
            correction=correction.settings() if correction is not None else None,
            bundle_id=processor.bundle_id,
            weights_version=processor.weights_version,
            backend=processor.backend,
            input_pixel_um=plan.pixel_size_um,
            output_pixel_um=plan.pixel_size_um / processor.upscale,
            units=processor.units,
            finishing=processor.finishing,
            spill_dir=str(self.spill_root),
            ome_zarr=self.config.storage.ome_zarr,
            isotropic_bundle_path=(
                str(processor.selfnet_dir) if isinstance(processor, IsotropicProcessor) else None
            ),
            output_z_count=processor.output_depth(plan.z_count) if plan.z_count else None,
            output_z_step_um=(
                processor.output_z_step_um
                if isinstance(processor, IsotropicProcessor)
                else plan.z_step_um
            ),
        )
        adaptable: AdaptableProcessor | None = None
        if plan.adaptation.mode != "off":
            if not isinstance(processor, AdaptableProcessor):
                raise ProtocolError(
                    ErrorCode.PLAN_MISMATCH, f"{processor.name} cannot adapt its weights"
                )
            processor = adaptable = processor.fork()  # its weights will change
        journal = None
        if plan.save:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                contained(self.root, directory)  # nothing swapped in while it was created
                write_acquisition_record(directory, record)
                journal = Journal(directory, self.config.storage.journal_fsync_s)
            except OSError as exc:
                refusal = _io_refusal(exc, f"creating {directory}")
                raise ProtocolError(
                    refusal.code, refusal.message.replace("frame refused", "not started")
                ) from None
        acquisition = Acquisition(record, processor, directory, journal)
        if adaptable is not None:
            acquisition.adaptation = adaptation_for(adaptable, plan.adaptation, acquisition)
        self.active[acquisition_id] = acquisition
        log.info("acquisition %s started: %s, %s", acquisition_id, plan.mode, processor.bundle_id)
        return Reply(
            ok=True,
            data={
                "bundle_id": processor.bundle_id,
                "weights_version": processor.weights_version,
                "backend": record.backend,
                "output": str(directory) if plan.save else None,
                "max_inflight_frames": self.config.limits.max_inflight_frames,
            },
        )

    def _frame(self, header: Header, pixels: Any, received: float) -> Reply:
        """Acknowledge a frame only once everything its write needs was checked and its line
        is in the journal (an ack is a promise); otherwise refuse it with the reason."""
        acquisition = self._acquisition(header)
        frame_id = header.frame_id
        assert frame_id is not None
        assert header.axes is not None
        if frame_id <= acquisition.last_frame_id:
            raise ProtocolError(
                ErrorCode.FRAME_ORDER,
                f"frame id {frame_id} is not after the last one ({acquisition.last_frame_id}):"
                " a repeat would be restored twice",
            )
        new_stream = self._check_against_plan(acquisition, header, pixels)
        promised = self._check_space(acquisition, pixels) if acquisition.record.plan.save else 0
        if header.shm is not None:
            pixels = pixels.copy()  # the client reuses the slot once we acknowledge
        journal = acquisition.journal
        if journal is not None:
            try:
                journal.append(
                    JournalEntry(
                        frame_id=frame_id,
                        axes=header.axes,
                        dtype=header.dtype or "",
                        shape=header.shape or (),
                        timestamp_s=header.timestamp_s,
                    )
                )
            except OSError as exc:
                raise _io_refusal(exc, f"journal of {acquisition.id}") from None
        try:
            where = self.jobs.put(Job(acquisition, Kind.FRAME, header, pixels, received))
        except OSError as exc:  # spilling it failed: take its journal line back, refuse it
            if journal is not None:
                journal.retract()
            raise _io_refusal(exc, f"spilling a frame of {acquisition.id}") from None
        if new_stream is not None:
            stream, identity, name = new_stream
            acquisition.streams[stream] = identity
            if name is not None:
                acquisition.file_names[name] = stream
        acquisition.last_frame_id = frame_id
        acquisition.promised_bytes += promised
        acquisition.acknowledged += 1
        acquisition.spilled += where == "spilled"
        self.metrics.count("frames_received")
        self.metrics.received_rate.tick()
        return Reply(ok=True, frame_id=frame_id)

    def _pending_bytes(self) -> int:
        """Restored bytes acknowledged but not yet written (statvfs cannot see them yet)."""
        unfinished = [a for a in self.ended.values() if not a.finished.is_set()]
        return sum(
            max(0, a.promised_bytes - a.written_bytes) for a in (*self.active.values(), *unfinished)
        )

    def _check_space(self, acquisition: Acquisition, pixels: Any) -> int:
        """The frame's restored planes (and its raw pixels, should it spill) fit above the
        reserve; checked against a cached free-space figure (daemon/_diskspace.py). Returns the
        restored bytes promised."""
        planes = pixels.shape[0] if pixels.ndim == 3 else 1
        record = acquisition.record
        if record.plan.z_count and record.stack_depth:
            # restored planes per raw plane: more in a Self-Net chain, 1/9 for 3 x 3 SIM; exact,
            # so what is promised and not yet written stays bounded over a long acquisition
            planes *= record.stack_depth / record.plan.z_count
        upscale = acquisition.processor.upscale
        plane_px = pixels.shape[-1] * pixels.shape[-2] * upscale * upscale
        restored = math.ceil(planes * planned_plane_bytes(plane_px))
        what = f"frame of {acquisition.id}"
        if self._spill_elsewhere:
            self.free.promise(self.root, restored, what)
            self.free.promise(self.spill_root, pixels.nbytes, what)
        else:
            self.free.promise(self.root, restored + pixels.nbytes, what)
        return restored

    @staticmethod
    def _check_against_plan(
        acquisition: Acquisition, header: Header, pixels: Any
    ) -> tuple[Stream, tuple[tuple[int, ...], str], str | None] | None:
        """Refuse what the plan or the output files cannot take. For the first frame of a
        (position, channel): what to record once it is acknowledged (stream, its shape and
        dtype, its output file's casefolded name)."""
        plan, axes = acquisition.record.plan, header.axes
        assert axes is not None

        def refuse(message: str) -> ProtocolError:
            return ProtocolError(ErrorCode.PLAN_MISMATCH, message)

        if plan.mode == "2d" and pixels.ndim != 2:
            raise refuse(f"a 2d acquisition takes (Y, X) frames, got shape {list(pixels.shape)}")
        if plan.mode in ("3d", "sim"):
            z_count = plan.z_count or 1
            what = "frames of a SIM sequence" if plan.mode == "sim" else "planes"
            if pixels.ndim == 2 and not axes.z < z_count:
                raise refuse(f"z index {axes.z} is outside the plan's {z_count} {what}")
            if pixels.ndim == 3 and pixels.shape[0] != z_count:
                raise refuse(f"a stack of {pixels.shape[0]} {what}; the plan says {z_count}")
        if plan.mode == "sim" and min(pixels.shape[-2:]) < MIN_SIM_PX:
            raise refuse(
                f"SIM frames must be at least {MIN_SIM_PX} x {MIN_SIM_PX} pixels, got"
                f" {list(pixels.shape[-2:])}"
            )
        size = header.pixel_size_um
        if size is not None and abs(size / plan.pixel_size_um - 1) > PIXEL_SIZE_TOLERANCE:
            raise refuse(
                f"pixel size {header.pixel_size_um} µm differs from the plan's "
                f"{plan.pixel_size_um} µm"
            )
        stream = (axes.position, axes.channel)
        where = f"position {axes.position!r}, channel {axes.channel!r}"
        identity = (tuple(pixels.shape[-2:]), pixels.dtype.name)
        known = acquisition.streams.get(stream)
        if known is not None:
            if identity[0] != known[0]:
                raise refuse(
                    f"frame {list(identity[0])} differs from earlier frames {list(known[0])}"
                    f" of {where}"
                )
            if identity[1] != known[1]:
                raise ProtocolError(
                    ErrorCode.DTYPE_MISMATCH,
                    f"a {identity[1]} frame, but the earlier frames of {where} are {known[1]}:"
                    " one output file holds one dtype",
                )
            return None
        if not plan.save:
            return stream, identity, None
        path = output_path(acquisition.directory, axes.position, axes.channel)
        name = path.name.casefold()
        other = acquisition.file_names.get(name)
        if other is not None:
            raise ProtocolError(
                ErrorCode.NAME_COLLISION,
                f"{where} would share the file {path.name} with position {other[0]!r},"
                f" channel {other[1]!r} (names that differ only in case); rename one",
            )
        if os.path.lexists(path):
            raise ProtocolError(
                ErrorCode.OUTPUT_CONFLICT,
                f"{path.name} already exists in {acquisition.directory} and was not written by"
                " this acquisition; it is not overwritten",
            )
        return stream, identity, name

    def _adaptation(self, header: Header, received: float) -> Reply:
        """Per-acquisition adaptation: status, set (request.plan) or rollback
        (request.version, default: the previous one). Changes run in the worker, in order."""
        acquisition = self._acquisition(header)
        request, action = header.request, header.request.get("action", "status")
        state = acquisition.adaptation
        if action == "status":
            return Reply(ok=True, data=state.status() if state else {"mode": "off"})
        if action == "rollback":
            if state is None or len(state.versions) < 2:
                raise ProtocolError(ErrorCode.BAD_HEADER, "there is no earlier weights version")
            version = request.get("version")
            if version is not None and version not in state.versions:
                raise ProtocolError(
                    ErrorCode.BAD_HEADER,
                    f"no weights version {version}; kept: {sorted(state.versions)}",
                )
        elif action == "set":
            if not isinstance(acquisition.processor, AdaptableProcessor):
                name = acquisition.processor.name
                raise ProtocolError(ErrorCode.PLAN_MISMATCH, f"{name} cannot adapt its weights")
            try:
                AdaptationPlan.model_validate(request.get("plan", {}))
            except ValidationError as exc:
                raise ProtocolError(
                    ErrorCode.BAD_HEADER, f"adaptation plan: {exc.errors()[0]['msg']}"
                ) from None
        else:
            raise ProtocolError(
                ErrorCode.BAD_HEADER, f"adaptation action {action!r}: use status, set or rollback"
            )
        self.jobs.put(Job(acquisition, Kind.ADAPTATION, header, received_s=received))
        return Reply(ok=True, data={"scheduled": action})

    def _end(self, header: Header, received: float) -> Reply:
        acquisition = self._acquisition(header)
        acquisition.ended = True
        if acquisition.journal is not None:
            acquisition.journal.close()
        self.jobs.put(Job(acquisition, Kind.ACQUISITION_END, header, received_s=received))
        del self.active[acquisition.id]
        self.ended[acquisition.id] = acquisition
        while len(self.ended) > FINISHED_KEPT:
            self.ended.pop(next(iter(self.ended)))
        log.info("acquisition %s ended: %d frames", acquisition.id, acquisition.acknowledged)
        return Reply(ok=True, data=acquisition.status())

    # -- models and state --------------------------------------------------------------------

    def _processor(self, name: str, sim: bool = False) -> Processor:
        """The processor of bundle `name`, opened once; `sim`: a SIM model, which restores
        SR images and so takes none of the camera corrections raw frames get."""
        key = f"sim:{name}" if sim else name
        if key in self._processors:
            return self._processors[key]
        model = self.config.model
        correction = NO_CORRECTION if sim else self.config.correction
        if name == PASS_THROUGH:
            processor: Processor = PassThrough(delay_s=model.pass_through_delay_ms / 1e3)
        else:
            try:
                processor = open_processor(
                    name,
                    model.backend,
                    model.precision,
                    max_batch=self.config.queues.batch_max_frames,
                    tile_px=model.tile_px,
                    correction=correction,
                )
            except Exception as exc:
                raise ProtocolError(ErrorCode.MODEL, f"cannot load model {name!r}: {exc}") from exc
        self._processors[key] = processor
        return processor

    def _sim(self, plan: Plan, directory: Path | None) -> SimProcessor:
        """The live SIM reconstruction of a sim plan, then the plan's SIM model if it names
        one (ZS-DeconvNet-SIM or DPS, trained behind the same reconstruction)."""
        assert plan.sim is not None
        if plan.output_dtype != "float32":
            raise ProtocolError(
                ErrorCode.PLAN_MISMATCH, "a sim acquisition writes float32 SR images only"
            )
        network = None
        if plan.model is not None:
            model = self._processor(plan.model, sim=True)
            if not isinstance(model, ModelProcessor):
                raise ProtocolError(
                    ErrorCode.PLAN_MISMATCH,
                    f"model {plan.model!r}: after the SIM reconstruction only a SIM model"
                    " serves; leave the model out for the reconstruction alone",
                )
            network = model
        try:
            return SimProcessor(plan.sim, plan.pixel_size_um, directory, network)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.PLAN_MISMATCH, f"model {plan.model!r}: {exc}") from None

    def _isotropic(self, first: Processor, plan: Plan) -> IsotropicProcessor:
        """The plan's model chained with its Self-Net bundle, for stacks of its z step."""
        assert plan.isotropic is not None
        assert plan.z_step_um is not None  # a 3d plan has one
        if not isinstance(first, ModelProcessor) or not first.is_3d:
            raise ProtocolError(
                ErrorCode.PLAN_MISMATCH,
                f"isotropic {plan.isotropic!r}: Self-Net follows a 3D model; {first.bundle_id}"
                " is not one",
            )
        if (plan.z_count or 0) < MIN_ISOTROPIC_PLANES:
            raise ProtocolError(
                ErrorCode.PLAN_MISMATCH,
                f"isotropic {plan.isotropic!r}: Self-Net needs stacks of at least"
                f" {MIN_ISOTROPIC_PLANES} planes; the plan has {plan.z_count}",
            )
        key = (first.bundle_id, plan.isotropic, plan.z_step_um)
        if key not in self._chains:
            model = self.config.model
            try:
                chain = open_isotropic(
                    first, plan.isotropic, plan.z_step_um, model.backend, model.precision
                )
            except (ValueError, BundleError) as exc:
                raise ProtocolError(
                    ErrorCode.PLAN_MISMATCH, f"isotropic {plan.isotropic!r}: {exc}"
                ) from None
            except Exception as exc:
                raise ProtocolError(
                    ErrorCode.MODEL, f"cannot load Self-Net bundle {plan.isotropic!r}: {exc}"
                ) from exc
            self._chains[key] = chain
        return self._chains[key]

    def _load_model(self, request: dict[str, Any]) -> Reply:
        name = request.get("bundle")
        if not isinstance(name, str) or not name:
            raise ProtocolError(ErrorCode.BAD_HEADER, "load_model needs request.bundle (a name)")
        processor = self._processor(name)
        self.default_model = name
        return Reply(ok=True, data=self._describe(processor))

    @staticmethod
    def _describe(processor: Processor) -> dict[str, Any]:
        correction = processor.correction
        return {
            "bundle_id": processor.bundle_id,
            "weights_version": processor.weights_version,
            "backend": processor.backend,
            "correction": correction.describe() if correction is not None else "none",
        }

    def status(self) -> dict[str, Any]:
        return {
            "model": self._describe(self._processor(self.default_model)),
            "acquisitions": {aid: acq.status() for aid, acq in (self.ended | self.active).items()},
            "queues": self.jobs.depth(),
            "limits": self.config.limits.model_dump(),
        }


def _kind(processor: Processor) -> Literal["model", "pass-through", "sim"]:
    """What acquisition.json calls the processor (reprocess opens the same kind)."""
    if isinstance(processor, PassThrough):
        return "pass-through"
    return "sim" if isinstance(processor, SimProcessor) else "model"
