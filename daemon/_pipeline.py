"""From acknowledged frames to restored planes: queue, batching, z-stacks, engine, outputs.

    ingest -> JobQueue (memory, spilling to disk beyond its budget) -> Worker thread:
      2D: micro-batch same-shape frames of one acquisition | 3D: assemble z-stacks
      -> processor -> Publisher (latest-wins display) + WriterThread (disk, bounded queue)

Back-pressure runs backwards: a slow disk fills the write queue, which stalls the worker, whose
queue then spills to disk; memory stays bounded and no frame to be saved is dropped. Markers
(timepoint done, acquisition end) travel through the same queue, so they are handled after
every frame sent before them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livedecon.daemon._adaptation_scheduler import (
    AcquisitionAdaptation,
    TimepointReport,
    Weights,
    adaptation_for,
)
from livedecon.daemon._journal import AcquisitionRecord, Journal
from livedecon.daemon._processing import (
    AdaptableProcessor,
    Processor,
    Stream,
    group_volume,
    source_planes,
)
from livedecon.daemon._protocol import AdaptationPlan, Axes, Header, Kind, Publication, Topic
from livedecon.daemon._publisher import Publisher
from livedecon.daemon._spill import SpillStore
from livedecon.daemon._telemetry import Metrics
from livedecon.daemon._writer import AcquisitionWriter, PlaneRecord, units_per_count
from livedecon.daemon._zarr_output import ZarrMirror

log = logging.getLogger(__name__)


MISSING_LISTED = 100  # planes named in an acquisition's status when some could not be written
PLANE_OVERHEAD_BYTES = 4096  # a TIFF page's IFD and plane record, generously


def planned_plane_bytes(pixels: int) -> int:
    """Disk space promised for one restored plane of `pixels` pixels (float32 at most)."""
    return pixels * 4 + PLANE_OVERHEAD_BYTES


@dataclass
class Acquisition:
    """One acquisition's state, shared by the threads (each field has one writer, or a lock)."""

    record: AcquisitionRecord
    processor: Processor
    directory: Path
    journal: Journal | None
    last_frame_id: int = -1
    # per (position, channel): plane shape and dtype, fixed by its first acknowledged frame
    streams: dict[Stream, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    file_names: dict[str, Stream] = field(default_factory=dict)  # casefolded name -> stream
    acknowledged: int = 0
    restored: int = 0
    written: int = 0
    spilled: int = 0
    incomplete_stacks: int = 0
    timepoints_done: int = 0
    ended: bool = False
    finished: threading.Event = field(default_factory=threading.Event)
    adaptation: AcquisitionAdaptation | None = None  # owned by the worker thread
    last_message_s: float = field(default_factory=time.monotonic)  # ingest thread
    idle_closed: bool = False  # ingest thread: files closed for silence, reopened on demand
    # Acknowledged planes that could not be written (worker and writer threads, under _lock);
    # the ingest thread tells the client about the ones it has not yet reported.
    failures: int = 0
    failed: list[str] = field(default_factory=list)
    last_failure: str = ""
    reported_failures: int = 0
    close_error: str | None = None
    promised_bytes: int = 0  # ingest thread: disk space promised to acknowledged planes
    written_bytes: int = 0  # writer thread: of which written (or given up on)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.record.acquisition_id

    def adaptable(self) -> AdaptableProcessor:
        """The processor, as one whose weights change: an acquisition that adapts has a fork of
        its own (the daemon refuses adaptation where the processor cannot adapt)."""
        processor = self.processor
        if not isinstance(processor, AdaptableProcessor):
            raise TypeError(f"acquisition {self.id}: {processor.name} has no weights to adapt")
        return processor

    def note_failure(self, what: str, error: BaseException | str) -> None:
        """An acknowledged plane will not reach its file (it stays recoverable by reprocess)."""
        with self._lock:
            self.failures += 1
            self.last_failure = f"{what}: {error}"
            if len(self.failed) < MISSING_LISTED:
                self.failed.append(what)

    def unreported_failures(self) -> dict[str, Any] | None:
        """What the client has not yet been told about failed writes (ingest thread)."""
        failures = self.failures
        if failures <= self.reported_failures:
            return None
        new = failures - self.reported_failures
        self.reported_failures = failures
        return {
            "count": new,
            "total": failures,
            "message": f"{new} acknowledged plane(s) of {self.id} could not be written"
            f" (latest: {self.last_failure}); they stay recoverable with `livedecon reprocess"
            f" {self.directory} --raw <raw data>`",
        }

    def status(self) -> dict[str, Any]:
        finished = self.finished.is_set()
        state = {
            "mode": self.record.plan.mode,
            "bundle_id": self.processor.bundle_id,
            "weights_version": self.processor.weights_version,
            "output": str(self.directory),
            "acknowledged": self.acknowledged,
            "restored": self.restored,
            "written": self.written,
            "spilled": self.spilled,
            "write_failures": self.failures,
            "incomplete_stacks": self.incomplete_stacks,
            "timepoints_done": self.timepoints_done,
            "ended": self.ended,
            "finished": finished,
            "complete": finished and not self.failures and self.close_error is None,
            "adaptation": self.adaptation.status() if self.adaptation else {"mode": "off"},
        }
        if self.failures or self.close_error:
            state["missing"] = {
                "planes": self.failures,
                "listed": list(self.failed),
                "latest_error": self.last_failure,
                "not_finalised": self.close_error,
                "recover": f"livedecon reprocess {self.directory} --raw <raw data>",
            }
        return state


def describe_plane(record: PlaneRecord) -> str:
    """A plane record in words, for messages."""
    return (
        f"frame {record.frame_id} (t={record.time}, z={record.z}, channel {record.channel!r},"
        f" position {record.position!r})"
    )


IDLE_CLOSE = "idle_close"  # a daemon-internal job: the acquisition fell silent


@dataclass
class Job:
    """One message (or daemon-internal job) on its way through the pipeline, with its pixels."""

    acquisition: Acquisition
    kind: Kind | str
    header: Header
    pixels: np.ndarray | None = None
    received_s: float = 0.0  # perf_counter when the message arrived
    spill_path: Path | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.pixels is None else self.pixels.nbytes


def _stream(job: Job) -> Stream:
    """The (position, channel) a frame belongs to."""
    axes = job.header.axes or Axes()
    return (axes.position, axes.channel)


def frame_pixels(job: Job) -> np.ndarray:
    """A frame job's pixels (those of a spilled frame are read back as it leaves the queue)."""
    if job.pixels is None:
        raise ValueError(f"frame {job.header.frame_id} has no pixels")
    return job.pixels


class JobQueue:
    """FIFO of jobs with a memory budget; beyond it, frames to be saved go to disk (in order:
    once anything is on disk, newer frames follow it there until it drains), and display-only
    frames are dropped."""

    def __init__(self, budget_bytes: int, spill: SpillStore, metrics: Metrics) -> None:
        self.budget_bytes, self.spill, self.metrics = budget_bytes, spill, metrics
        self._memory: deque[Job] = deque()
        self._spilled: deque[Job] = deque()  # headers only; pixels on disk
        self._bytes = 0
        self._ready = threading.Condition()

    def put(self, job: Job) -> str:
        """Queue a job; returns 'memory', 'spilled' or 'dropped'."""
        with self._ready:
            over = self._bytes + job.nbytes > self.budget_bytes and self._memory
            if job.pixels is not None and (self._spilled or over):
                if not job.acquisition.record.plan.save:
                    self.metrics.count("display_only_dropped")
                    return "dropped"
                job.spill_path = self.spill.put(job.header, job.pixels)
                job.pixels = None
                self._spilled.append(job)
                self.metrics.count("frames_spilled")
                where = "spilled"
            elif self._spilled:
                self._spilled.append(job)  # a marker keeps its place behind spilled frames
                where = "spilled"
            else:
                self._memory.append(job)
                self._bytes += job.nbytes
                where = "memory"
            self._ready.notify()
            return where

    def get(self, timeout: float) -> Job | None:
        with self._ready:
            if not self._memory and not self._spilled:
                self._ready.wait(timeout)
            if self._memory:
                job = self._memory.popleft()
                self._bytes -= job.nbytes
                return job
            if not self._spilled:
                return None
            job = self._spilled.popleft()
        if job.spill_path is not None:  # read outside the lock: ingest keeps going meanwhile
            _, job.pixels = SpillStore.load(job.spill_path)
        return job

    def depth(self) -> dict[str, float]:
        return {
            "memory_frames": len(self._memory),
            "memory_mb": self._bytes / 2**20,
            "spilled_frames": len(self._spilled),
        }

    def empty(self) -> bool:
        return not self._memory and not self._spilled


@dataclass
class Stack:
    """The planes of one z-stack received so far, and when the last arrived."""

    acquisition: Acquisition
    planes: dict[int, Job] = field(default_factory=dict)
    last_s: float = field(default_factory=time.monotonic)


StackKey = tuple[str, int | str, int, int | str]  # (acquisition, position, time, channel)


class StackAssembler:
    """Single planes of 3D acquisitions gathered into z-stacks keyed by acquisition, position,
    time and channel; the plan says how many planes make a stack."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._open: dict[StackKey, Stack] = {}

    @staticmethod
    def key(job: Job) -> StackKey:
        axes = job.header.axes or Axes()
        return (job.acquisition.id, axes.position, axes.time, axes.channel)

    def add(self, job: Job) -> Stack | None:
        """Add a plane; the stack when this plane completed it."""
        key = self.key(job)
        stack = self._open.setdefault(key, Stack(job.acquisition))
        stack.planes[(job.header.axes or Axes()).z] = job
        stack.last_s = time.monotonic()
        if len(stack.planes) >= (job.acquisition.record.plan.z_count or 1):
            return self._open.pop(key)
        return None

    def expired(self) -> list[Stack]:
        now = time.monotonic()
        keys = [k for k, s in self._open.items() if now - s.last_s > self.timeout_s]
        return [self._open.pop(k) for k in keys]

    def flush(self, acquisition_id: str | None = None) -> list[Stack]:
        """The open stacks of an acquisition (of all, by default), incomplete as they are."""
        keys = [k for k in self._open if acquisition_id in (None, k[0])]
        return [self._open.pop(k) for k in keys]

    def next_deadline(self) -> float | None:
        if not self._open:
            return None
        return min(s.last_s for s in self._open.values()) + self.timeout_s


@dataclass
class WriteItem:
    """What the writer thread receives: a restored plane and its record, or a close or suspend
    of an acquisition's files."""

    acquisition: Acquisition
    plane: np.ndarray | None = None
    record: PlaneRecord | None = None
    spill_paths: tuple[Path, ...] = ()
    queued_s: float = 0.0
    close: bool = False  # the acquisition's last item: finalise its files
    suspend: bool = False  # the acquisition went idle: close its files, reopen on demand


class WriterThread(threading.Thread):
    """Writes restored planes; a spilled frame's file goes once its last plane is on disk.
    A plane that cannot be written is noted in its acquisition (the client hears of it on its
    next call, and the acquisition ends incomplete, naming it); writing goes on."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        super().__init__(name="writer", daemon=True)
        self.queue: queue.Queue[WriteItem | None] = queue.Queue(maxsize=capacity)
        self.metrics = metrics
        self._writers: dict[str, AcquisitionWriter] = {}

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if item.close:
                    self._close(item.acquisition)
                elif item.suspend:
                    writer = self._writers.get(item.acquisition.id)
                    if writer is not None:
                        writer.suspend()
                else:
                    self._write(item)
            except Exception:  # a bug: this thread must go on regardless
                self.metrics.count("errors")
                log.exception("the writer failed on %s", item)
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception:
                log.exception("finalising %s failed", writer.directory)

    def _close(self, acquisition: Acquisition) -> None:
        writer = self._writers.pop(acquisition.id, None)
        try:
            if writer is not None:
                writer.close()
        except Exception as exc:
            # The planes are on disk, readable; only the OME-XML is missing (reprocess adds it).
            acquisition.close_error = f"{type(exc).__name__}: {exc}"
            self.metrics.count("errors")
            log.error("finalising the files of %s failed: %s", acquisition.id, exc)
        finally:
            acquisition.finished.set()

    def _write(self, item: WriteItem) -> None:
        acquisition = item.acquisition
        assert item.plane is not None
        assert item.record is not None
        acquisition.written_bytes += planned_plane_bytes(item.plane.size)
        try:
            writer = self._writers.get(acquisition.id)
            if writer is None:
                record = acquisition.record
                mirror = ZarrMirror(record) if record.ome_zarr else None
                writer = AcquisitionWriter(acquisition.directory, record, mirror)
                self._writers[acquisition.id] = writer
            writer.write(item.plane, item.record)
        except Exception as exc:
            # The plane stays recoverable (journal + raw or spill) by `livedecon reprocess`.
            self.metrics.count("errors")
            self.metrics.count("write_failures")
            acquisition.note_failure(describe_plane(item.record), exc)
            if isinstance(exc, OSError | ValueError):  # the disk, not a bug: no traceback
                log.error("writing %s failed: %s", describe_plane(item.record), exc)
            else:
                log.exception("writing %s of %s failed", item.record, acquisition.id)
            return
        acquisition.written += 1
        self.metrics.count("planes_written")
        self.metrics.observe("write", time.perf_counter() - item.queued_s)
        for path in item.spill_paths:
            SpillStore.remove(path)


class Worker(threading.Thread):
    """Takes jobs off the queue, runs the engine, hands results to display and disk."""

    def __init__(
        self,
        jobs: JobQueue,
        writer: WriterThread,
        publisher: Publisher,
        metrics: Metrics,
        batch_max: int,
        batch_deadline_s: float,
        stack_timeout_s: float,
    ) -> None:
        super().__init__(name="worker", daemon=True)
        self.jobs, self.writer, self.publisher, self.metrics = jobs, writer, publisher, metrics
        self.batch_max, self.batch_deadline_s = batch_max, batch_deadline_s
        self.stacks = StackAssembler(stack_timeout_s)
        self._held: Job | None = None  # taken while batching, but belongs to the next batch
        self._adapting: dict[str, Acquisition] = {}  # acquisitions with steps to run
        # accepted weights being prepared off this thread, committed here between batches
        self._swaps: deque[
            tuple[Future[Callable[[], None]], Acquisition, TimepointReport, float]
        ] = deque()
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="weights")
        self._last_step = (0.0, 0.0)  # perf_counter start and end of the latest step
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Stop once everything queued has been processed."""
        self._stopping.set()

    def run(self) -> None:
        while True:
            self._commit_ready_swaps()
            if self._stopping.is_set():
                self._adapting.clear()  # shutting down: finish the frames, not the training
            adapting = next(iter(self._adapting.values()), None)
            job = self._next(timeout=0.0 if adapting else 0.05)
            if job is None:
                if adapting is not None:
                    self._adapt(adapting)  # one step: a frame arriving now waits at most this
                    continue
                for stack in self.stacks.expired():
                    self._run_stack(stack)
                if self._stopping.is_set() and self.jobs.empty():
                    break
                continue
            self._note_training_delay(job)
            try:
                self._handle(job)
            except Exception as exc:
                self.metrics.count("errors")
                if job.kind is Kind.FRAME:
                    job.acquisition.note_failure(f"frame {job.header.frame_id}", exc)
                log.exception("processing %s of %s failed", job.header.frame_id, job.acquisition.id)
        for stack in self.stacks.flush():
            self._run_stack(stack)
        self._preparer.shutdown(wait=True)
        self._commit_ready_swaps()
        self.writer.queue.put(None)

    # -- test-time adaptation (between batches, in this thread) ----------------------------

    def _adapt(self, acquisition: Acquisition) -> None:
        """One step of `acquisition`'s adaptation, or its conclusion once the steps are done."""
        adaptation = acquisition.adaptation
        if adaptation is None or not (adaptation.busy or adaptation.awaiting_check):
            self._adapting.pop(acquisition.id, None)
            return
        start = time.perf_counter()
        try:
            if adaptation.busy:
                self.metrics.observe("adaptation_step", adaptation.step())
            else:
                self._conclude(acquisition)
        except Exception:
            self._adapting.pop(acquisition.id, None)
            self.metrics.count("errors")
            log.exception("adaptation of %s failed; the serving weights stay", acquisition.id)
        self._last_step = (start, time.perf_counter())

    def _conclude(self, acquisition: Acquisition) -> None:
        """Check the candidate; if it passes, prepare it off this thread (export, new session)
        and swap it in between two batches once ready (`_commit_ready_swaps`)."""
        assert acquisition.adaptation is not None
        self._adapting.pop(acquisition.id, None)
        report, weights = acquisition.adaptation.conclude()
        if weights is None:
            log.info("adaptation of %s: %s", acquisition.id, report)
            return
        processor = acquisition.adaptable()
        future = self._preparer.submit(processor.prepare_weights, weights, report.version)
        self._swaps.append((future, acquisition, report, time.perf_counter()))

    def _commit_ready_swaps(self) -> None:
        while self._swaps and self._swaps[0][0].done():
            future, acquisition, report, started = self._swaps.popleft()
            try:
                commit = future.result()
            except Exception:
                self.metrics.count("errors")
                log.exception("preparing weights v%d of %s failed", report.version, acquisition.id)
                continue
            start = time.perf_counter()
            try:
                commit()
            except Exception:  # a failed refit must not stop the worker: acked frames wait
                self.metrics.count("errors")
                log.exception("swapping weights v%d of %s failed", report.version, acquisition.id)
                continue
            assert acquisition.adaptation is not None
            acquisition.adaptation.serving_version = report.version
            report.swap_ms = (time.perf_counter() - start) * 1e3
            report.prepare_ms = (start - started) * 1e3
            self.metrics.observe("swap", report.swap_ms / 1e3)
            self.metrics.observe("swap_prepare", report.prepare_ms / 1e3)
            log.info("adaptation of %s: %s", acquisition.id, report)

    def _serve(self, acquisition: Acquisition, weights: Weights, version: int) -> None:
        acquisition.adaptable().update_weights(weights, version)
        assert acquisition.adaptation is not None
        acquisition.adaptation.serving_version = version

    def _note_training_delay(self, job: Job) -> None:
        """How long a frame waited for a training step that was running when it arrived."""
        start, end = self._last_step
        if job.kind is Kind.FRAME and start < job.received_s < end:
            self.metrics.observe("training_delay", end - job.received_s)

    def _control_adaptation(self, acquisition: Acquisition, request: dict[str, Any]) -> None:
        if request.get("action") == "rollback":
            assert acquisition.adaptation is not None
            # weights still being prepared for this acquisition must not land after it
            self._swaps = deque(s for s in self._swaps if s[1] is not acquisition)
            version = acquisition.adaptation.rollback(request.get("version"))
            self._serve(acquisition, acquisition.adaptation.versions[version], version)
            log.info("%s rolled back to weights version %d", acquisition.id, version)
            return
        plan = AdaptationPlan.model_validate(request.get("plan", {}))
        if acquisition.adaptation is None:
            if plan.mode == "off":
                return
            processor = acquisition.adaptable().fork()
            acquisition.processor = processor
            acquisition.adaptation = adaptation_for(processor, plan, acquisition)
        else:
            acquisition.adaptation.plan = plan

    def _next(self, timeout: float) -> Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        deadline = self.stacks.next_deadline()
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        return self.jobs.get(timeout)

    def _handle(self, job: Job) -> None:
        acquisition = job.acquisition
        if job.kind is Kind.TIMEPOINT_DONE:
            acquisition.timepoints_done += 1
            if acquisition.adaptation is not None and job.header.axes is not None:
                if acquisition.adaptation.busy or acquisition.adaptation.awaiting_check:
                    # the next timepoint is complete before this one's steps: judge what the
                    # steps so far gave, then adapt to the newer data
                    self._conclude(acquisition)
                acquisition.adaptation.timepoint_done(job.header.axes.time)
                if acquisition.adaptation.busy:
                    self._adapting[acquisition.id] = acquisition
            return
        if job.kind is Kind.ADAPTATION:
            self._control_adaptation(acquisition, job.header.request)
            return
        if job.kind is Kind.ACQUISITION_END:
            self._adapting.pop(acquisition.id, None)  # no frame left to serve better
            for stack in self.stacks.flush(acquisition.id):
                self._run_stack(stack)
            self.writer.queue.put(WriteItem(acquisition, close=True))
            return
        if job.kind == IDLE_CLOSE:
            self.writer.queue.put(WriteItem(acquisition, suspend=True))
            return
        self.metrics.observe("queue", time.perf_counter() - job.received_s)
        grouped = acquisition.record.plan.mode in ("3d", "sim")  # stacks, or SIM sequences
        if grouped and job.pixels is not None and job.pixels.ndim == 2:
            completed = self.stacks.add(job)
            if completed is not None:
                self._run_stack(completed)
            return
        self._run_batch(self._batch(job))

    def _batch(self, first: Job) -> list[Job]:
        """`first` and the frames queued right behind it that can share its engine call."""
        batch = [first]
        deadline = time.perf_counter() + self.batch_deadline_s
        while len(batch) < self.batch_max:
            job = self.jobs.get(max(0.0, deadline - time.perf_counter()))
            if job is None:
                break
            # Same acquisition and shape: 2D frames, or whole stacks (planes of a 3D
            # acquisition never get here: they go to the stack assembler).
            same = (
                job.kind is Kind.FRAME
                and job.acquisition is first.acquisition
                and job.pixels is not None
                and first.pixels is not None
                and job.pixels.shape == first.pixels.shape
            )
            if not same:
                self._held = job
                break
            self.metrics.observe("queue", time.perf_counter() - job.received_s)
            batch.append(job)
        return batch

    def _infer(
        self, acquisition: Acquisition, items: list[np.ndarray], streams: list[Stream]
    ) -> list[np.ndarray]:
        """Restore same-shape items of the given (position, channel) streams."""
        start = time.perf_counter()
        outputs = acquisition.processor.process(items, streams)
        self.metrics.observe("inference", time.perf_counter() - start)
        return outputs

    def _lost(self, acquisition: Acquisition, jobs: list[Job], exc: Exception) -> None:
        self.metrics.count("errors")
        for job in jobs:
            acquisition.note_failure(f"frame {job.header.frame_id}", f"restoring failed: {exc}")
        log.exception("restoring %d frame(s) of %s failed", len(jobs), acquisition.id)

    def _run_batch(self, batch: list[Job]) -> None:
        acquisition = batch[0].acquisition
        try:
            pixels = [frame_pixels(job) for job in batch]
            outputs = self._infer(acquisition, pixels, [_stream(job) for job in batch])
        except Exception as exc:
            self._lost(acquisition, batch, exc)
            return
        for job, output in zip(batch, outputs, strict=True):
            axes = job.header.axes or Axes()
            if output.ndim == 3:  # a whole stack (or SIM sequence) in one message
                planes = [(z, job) for z in range(len(output))]
                self._deliver_stack(acquisition, [job], planes, output, frame_pixels(job), False)
                continue
            self._display(Topic.RESTORED, job, output)
            if self.publisher.wants(Topic.RAW) and job.pixels is not None:
                self._display(Topic.RAW, job, job.pixels)
            self._save(acquisition, job, output, axes.z, (job.spill_path,), False)
            self._finished_frames(acquisition, 1, job)
            self._observe(acquisition, axes.time, job.pixels)

    def _run_stack(self, stack: Stack) -> None:
        acquisition = stack.acquisition
        z_count = acquisition.record.plan.z_count or 1
        present = sorted(stack.planes)
        jobs = [stack.planes[z] for z in present]
        try:
            planes = {z: frame_pixels(j) for z, j in stack.planes.items()}
            volume, complete = group_volume(acquisition.record.plan, planes)
            (output,) = self._infer(acquisition, [volume], [_stream(jobs[0])])
        except Exception as exc:
            self._lost(acquisition, jobs, exc)
            return
        if not complete:
            acquisition.incomplete_stacks += 1
            log.warning(
                "%s: stack %s incomplete (%d of %d planes); restoring what arrived",
                acquisition.id,
                StackAssembler.key(next(iter(stack.planes.values())))[1:],
                len(present),
                z_count,
            )
        if len(output) == len(volume):  # planes as acquired: only the arrived ones are written
            written = list(zip(present, jobs, strict=True))
        else:  # resampled (Self-Net) or reconstructed (SIM): every plane, for its nearest frame
            nearest = source_planes(len(volume), len(output), present)
            written = [(k, stack.planes[z]) for k, z in enumerate(nearest)]
        self._deliver_stack(acquisition, jobs, written, output, volume, not complete)
        if complete:
            self._observe(acquisition, (jobs[0].header.axes or Axes()).time, volume)

    def _deliver_stack(
        self,
        acquisition: Acquisition,
        group: list[Job],
        written: list[tuple[int, Job]],
        output: np.ndarray,
        raw: np.ndarray,
        incomplete: bool,
    ) -> None:
        """Publish a restored group (`output`, from the raw `raw`) and write its planes:
        `written` pairs each plane written (z) with the message whose record it carries. The
        group's spill files go with its last plane: recovering any plane needs all of them."""
        last = group[-1]
        self._publish_group(last, output, raw)
        spills = tuple(dict.fromkeys(job.spill_path for job in group))
        for i, (z, job) in enumerate(written):
            final = i == len(written) - 1
            self._save(acquisition, job, output[z], z, spills if final else (), incomplete)
        self._finished_frames(acquisition, len(group), last)

    def _publish_group(self, last: Job, output: np.ndarray, raw: np.ndarray) -> None:
        """SIM: the SR image beside the widefield image (the mean of the frames that came, as
        the raw topic); 3D: maximum projections along z, y and x, and the volume on demand."""
        if last.acquisition.record.plan.mode == "sim":
            self._display(Topic.RESTORED, last, output[0])
            if self.publisher.wants(Topic.RAW):
                widefield = np.asarray(np.nanmean(raw, axis=0, dtype=np.float32))
                self._display(Topic.RAW, last, widefield)
            return
        self._display(Topic.MIP, last, output.max(axis=0))
        for topic, axis in ((Topic.MIP_XZ, 1), (Topic.MIP_YZ, 2)):
            if self.publisher.wants(topic):
                self._display(topic, last, output.max(axis=axis))
        if self.publisher.wants(Topic.VOLUME):
            self._display(Topic.VOLUME, last, output)

    @staticmethod
    def _observe(acquisition: Acquisition, time_index: int, counts: np.ndarray | None) -> None:
        adaptation = acquisition.adaptation
        if adaptation is not None and counts is not None and adaptation.wants(time_index):
            electrons = acquisition.adaptable().electrons(counts)
            adaptation.observe(time_index, electrons)

    def _finished_frames(self, acquisition: Acquisition, n: int, job: Job) -> None:
        acquisition.restored += n
        self.metrics.count("frames_restored", n)
        self.metrics.restored_rate.tick(n)
        self.metrics.observe("end_to_end", time.perf_counter() - job.received_s)

    def _save(
        self,
        acquisition: Acquisition,
        job: Job,
        plane: np.ndarray,
        z: int,
        spill_paths: tuple[Path | None, ...],
        incomplete: bool,
    ) -> None:
        if not acquisition.record.plan.save:
            return
        axes = job.header.axes or Axes()
        record = PlaneRecord(
            frame_id=job.header.frame_id or 0,
            time=axes.time,
            z=z,
            channel=axes.channel,
            position=axes.position,
            timestamp_s=job.header.timestamp_s,
            bundle_id=acquisition.processor.bundle_id,
            weights_version=acquisition.processor.weights_version,
            incomplete_stack=incomplete,
            units_per_count=units_per_count(
                acquisition.record.plan.output_dtype, acquisition.processor.bright_level
            ),
        )
        paths = tuple(p for p in spill_paths if p is not None)
        # Not the job: its raw pixels (zero-copy ZMQ buffers) would stay referenced until the
        # write, outside the memory budget. A failed plane is recovered from the raw data.
        self.writer.queue.put(WriteItem(acquisition, plane, record, paths, time.perf_counter()))

    def _display(self, topic: Topic, job: Job, pixels: np.ndarray) -> None:
        record = job.acquisition.record
        processor = job.acquisition.processor
        restored = topic is not Topic.RAW
        publication = Publication(
            topic=topic,
            acquisition_id=job.acquisition.id,
            frame_id=job.header.frame_id or 0,
            axes=job.header.axes or Axes(),
            dtype=str(pixels.dtype),
            shape=tuple(pixels.shape),
            pixel_size_um=record.output_pixel_um if restored else record.input_pixel_um,
            z_step_um=record.stack_z_step_um if restored else record.plan.z_step_um,
            timestamp_s=job.header.timestamp_s,
            published_s=0.0,
            bundle_id=processor.bundle_id if restored else "raw",
            weights_version=processor.weights_version if restored else 0,
            units=record.units if restored else "camera counts",
        )
        self.publisher.offer(publication, pixels, time.perf_counter())
