"""Crash recovery (`livedecon reprocess`): every acknowledged plane ends up readable on disk.

After a kill, the journal (acked.jsonl) lists what the daemon promised and the output files
hold what it wrote; the difference is restored again from the raw pixels, taken from the spill
store (frames the daemon had parked on disk) or else from the raw dataset the acquisition
software wrote: NDTiff (Micro-Manager / pycro-manager) or OME-Zarr (pymmcore-plus through
ome-writers), read by `raw_datasets`. A 3D stack with a plane missing is restored whole, as the
daemon would have, and only its missing planes are added. A Self-Net chain writes more planes
than were acquired (z resampled to the lateral pixel); each stands for its nearest acquired
plane, and a stack missing any of them is restored whole from all of its acquired planes.

Each affected output file is rewritten next to itself and renamed over the old one, sorted by
(time, z) and finalised as OME-TIFF, so a reprocess killed halfway leaves the old file intact
and can simply be run again; a second run finds nothing to do and changes nothing.
"""

from __future__ import annotations

import contextlib
import heapq
import io
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from livedecon.daemon._daemon_config import NO_CORRECTION
from livedecon.daemon._journal import (
    AcquisitionRecord,
    JournalEntry,
    read_acquisition_record,
    read_journal,
)
from livedecon.daemon._processing import (
    PassThrough,
    Processor,
    group_volume,
    open_isotropic,
    open_processor,
    source_planes,
)
from livedecon.daemon._protocol import DTYPES, Header
from livedecon.daemon._raw_datasets import RawDataset, RawDatasetError, open_raw_dataset
from livedecon.daemon._sim_processing import SimProcessor
from livedecon.daemon._spill import SpillStore
from livedecon.daemon._writer import (
    FileScan,
    OutputBusyError,
    PlaneFile,
    PlaneKey,
    PlaneRecord,
    lock,
    output_files,
    output_path,
    read_page,
    scan_file,
    stored_plane,
    units_per_count,
)
from livedecon.daemon._zarr_output import complete_images
from livedecon.engines._atomic_write import replace_atomically
from livedecon.engines._enums import Backend
from livedecon.engines._sim import UPSCALE

BATCH = 4  # 2D frames per processor call
TEMP_SUFFIX = ".reprocess.tmp"


class ReprocessError(Exception):
    """Reprocessing cannot start or go on; the message says why and what to do."""


@dataclass
class ReprocessReport:
    """What a reprocess found and did: planes acknowledged, already written and recreated,
    those it could not recover, and the files rewritten."""

    acknowledged: int = 0  # planes the daemon acknowledged (a (Z, Y, X) frame counts Z)
    restored_planes: int = 0  # planes they make: as many, or more in a Self-Net chain
    already_written: int = 0  # of the restored planes
    recreated_from_spill: int = 0
    recreated_from_raw: int = 0
    unrecoverable: list[PlaneKey] = field(default_factory=list)  # (time, z, channel, position)
    files: list[Path] = field(default_factory=list)  # files rewritten (or removed, when empty)
    notes: list[str] = field(default_factory=list)  # what a person should know

    @property
    def complete(self) -> bool:
        return not self.unrecoverable


@dataclass(frozen=True)
class _Acked:
    entry: JournalEntry
    plane: int | None  # index into a (Z, Y, X) frame; None for a (Y, X) frame

    @property
    def shape(self) -> tuple[int, int]:
        return (self.entry.shape[-2], self.entry.shape[-1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.entry.dtype])


def _acknowledged(entries: list[JournalEntry]) -> dict[PlaneKey, _Acked]:
    planes: dict[PlaneKey, _Acked] = {}
    for entry in entries:
        axes = entry.axes
        if len(entry.shape) == 3:  # a whole stack in one frame: plane i is z = i
            for i in range(entry.shape[0]):
                planes[(axes.time, i, axes.channel, axes.position)] = _Acked(entry, i)
        else:
            planes[(axes.time, axes.z, axes.channel, axes.position)] = _Acked(entry, None)
    return planes


def restored_planes(
    record: AcquisitionRecord, acked: dict[PlaneKey, _Acked]
) -> dict[PlaneKey, PlaneKey]:
    """Every plane the acknowledged ones make, and the acknowledged plane it stands for
    (records, raw pixels): itself, or in a Self-Net chain's resampled stacks the acquired
    plane nearest to it (`processing.source_planes`, as the daemon maps them)."""
    z_count, depth = record.plan.z_count, record.stack_depth
    if record.plan.mode == "2d" or not z_count or not depth or depth == z_count:
        return {key: key for key in acked}
    stacks: dict[tuple[int, Any, Any], list[int]] = defaultdict(list)
    for time, z, channel, position in acked:
        stacks[(time, channel, position)].append(z)
    restored = {}
    for (time, channel, position), zs in stacks.items():
        for k, z in enumerate(source_planes(z_count, depth, sorted(zs))):
            restored[(time, k, channel, position)] = (time, z, channel, position)
    return restored


def _settled(
    record: AcquisitionRecord, source: dict[PlaneKey, PlaneKey], on_disk: set[PlaneKey]
) -> set[PlaneKey]:
    """The acknowledged planes whose raw pixels nothing needs any more: their restored planes
    are on disk; in a Self-Net chain or SIM, every restored plane of their group."""
    if record.isotropic_bundle_path is None and record.plan.mode != "sim":
        return {source[k] for k in source if k in on_disk}
    pending = {(s[0], s[2], s[3]) for k, s in source.items() if k not in on_disk}
    return {s for s in source.values() if (s[0], s[2], s[3]) not in pending}


class _Sources:
    """Where the raw pixels of a plane are: the spill store first, then the raw dataset."""

    def __init__(self, store: SpillStore, acquisition: AcquisitionRecord, raw: Path | None) -> None:
        self.store, self._raw_path, self._channels = store, raw, acquisition.plan.channels
        self._raw: RawDataset | None = None
        self.spilled: dict[PlaneKey, tuple[Path, int | None]] = {}
        self.spill_frames: dict[Path, list[PlaneKey]] = {}
        self._cached: tuple[Path, np.ndarray] | None = None
        folder = store.directory(acquisition.acquisition_id)
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                header = Header.model_validate_json(path.read_bytes())
            except (OSError, ValidationError):
                continue  # not a spilled frame header
            if header.axes is None or header.shape is None:
                continue
            axes, keys = header.axes, []
            stack = len(header.shape) == 3
            for i in range(header.shape[0] if stack else 1):
                key = (axes.time, i if stack else axes.z, axes.channel, axes.position)
                self.spilled[key] = (path, i if stack else None)
                keys.append(key)
            self.spill_frames[path] = keys

    @property
    def has_raw(self) -> bool:
        return self._raw_path is not None

    @property
    def raw(self) -> RawDataset | None:
        if self._raw is None and self._raw_path is not None:
            try:
                self._raw = open_raw_dataset(self._raw_path, self._channels)
            except RawDatasetError as exc:
                raise ReprocessError(str(exc)) from None
        return self._raw

    def where(self, key: PlaneKey) -> str | None:
        if key in self.spilled:
            return "spill"
        if self.raw is not None and self.raw.has(key):
            return "raw"
        return None

    def load(self, key: PlaneKey, acked: _Acked | None) -> tuple[np.ndarray, str]:
        """The raw plane and where it came from; ValueError when it is not usable."""
        if key in self.spilled:
            path, index = self.spilled[key]
            if self._cached is None or self._cached[0] != path:  # a stack: read it once
                self._cached = (path, self.store.load(path)[1])
            pixels, source = self._cached[1], "spill"
            plane = pixels if index is None else pixels[index]
        elif self.raw is not None and self.raw.has(key):
            plane, source = self.raw.read(key), "raw"
        else:
            where = "the raw dataset" if self.raw is not None else "a raw dataset (no --raw)"
            raise ValueError(f"in neither the spill store nor {where}")
        if acked is not None:
            if plane.shape != acked.shape:
                raise ValueError(f"{source} plane has shape {plane.shape}, sent {acked.shape}")
            if plane.dtype != acked.dtype:
                if not np.can_cast(plane.dtype, acked.dtype, "safe"):
                    raise ValueError(f"{source} plane is {plane.dtype}, sent {acked.dtype}")
                plane = plane.astype(acked.dtype)
        return plane, source

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()


@dataclass
class _Work:
    """What one output file needs: 2D planes, or whole stacks (time, channel, position)."""

    planes: list[PlaneKey] = field(default_factory=list)
    stacks: dict[int, list[PlaneKey]] = field(default_factory=dict)  # time -> missing keys


def _open_processor(
    record: AcquisitionRecord, directory: Path, backend: Backend, shapes: set[tuple[int, ...]]
) -> Processor:
    if record.processor == "pass-through":
        return PassThrough()
    sim = record.plan.sim if record.processor == "sim" else None
    if sim is not None and record.bundle_path is None:  # the reconstruction alone
        return SimProcessor(sim, record.plan.pixel_size_um, directory)
    if record.bundle_path is None:
        raise ReprocessError(f"{record.acquisition_id}: the record names no model bundle")
    if sim is not None:  # SR images of the raw groups' shape, twice as fine
        shapes = {tuple(UPSCALE * n for n in shape[-2:]) for shape in shapes}
    model = open_processor(
        record.bundle_path,
        backend,
        frame_shapes=tuple(sorted(shapes)),
        max_batch=BATCH,
        correction=record.correction if sim is None else NO_CORRECTION,
    )
    processor: Processor = model
    if sim is not None:  # with the patterns the daemon found, kept in `directory`
        processor = SimProcessor(sim, record.plan.pixel_size_um, directory, model)
    elif record.isotropic_bundle_path is not None:
        assert record.plan.z_step_um is not None  # a 3d plan has one
        selfnet, z_step = record.isotropic_bundle_path, record.plan.z_step_um
        processor = open_isotropic(model, selfnet, z_step, backend)
    if processor.bundle_id != record.bundle_id:
        raise ReprocessError(
            f"the bundle(s) at {record.bundle_path} are now {processor.bundle_id}, but this"
            f" acquisition was restored with {record.bundle_id}: its weights changed since."
            " Restore the original bundle, or pass a processor explicitly to accept the new one"
        )
    if record.finishing is not None and processor.finishing != record.finishing:
        raise ReprocessError(
            f"the bundle at {record.bundle_path} now finishes with"
            f" {processor.finishing or 'nothing'!r} after its network, but this acquisition was"
            f" restored with {record.finishing or 'nothing'!r}: its refinement changed since."
            " Set the bundle's refine_iterations back, or pass a processor explicitly to accept"
            " the new one"
        )
    return processor


class _Rebuild:
    """Recreates missing planes, in (time, z) order per file, from their raw pixels."""

    def __init__(
        self,
        record: AcquisitionRecord,
        acked: dict[PlaneKey, _Acked],
        sources: _Sources,
        processor: Processor,
        report: ReprocessReport,
    ) -> None:
        self.record, self.acked, self.sources = record, acked, sources
        self.source = restored_planes(record, acked)  # restored plane -> acknowledged plane
        self.processor, self.report = processor, report
        self.done: set[PlaneKey] = set()
        self.reasons: dict[str, list[PlaneKey]] = defaultdict(list)
        self._progress: Callable[[int, int], None] | None = None
        self._total = self._count = 0

    def set_progress(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        """Report (planes done, `total`) to `progress` from now on, from (0, total)."""
        self._progress, self._total, self._count = progress, total, 0
        if progress:
            progress(0, total)

    def _step(self) -> None:
        self._count += 1
        if self._progress:
            self._progress(self._count, self._total)

    def _plane_record(self, key: PlaneKey, incomplete: bool = False) -> PlaneRecord:
        time, z, channel, position = key
        entry = self.acked[self.source[key]].entry
        return PlaneRecord(
            frame_id=entry.frame_id,
            time=time,
            z=z,
            channel=channel,
            position=position,
            timestamp_s=entry.timestamp_s,
            bundle_id=self.processor.bundle_id,
            weights_version=self.processor.weights_version,
            incomplete_stack=incomplete,
            units_per_count=units_per_count(
                self.record.plan.output_dtype, self.processor.bright_level
            ),
        )

    def _stored(
        self, key: PlaneKey, plane: np.ndarray, incomplete: bool = False
    ) -> tuple[PlaneRecord, np.ndarray]:
        """A recreated plane and its record as the daemon would have written them."""
        pixels, record = stored_plane(plane, self._plane_record(key, incomplete))
        return record, pixels

    def lost(self, keys: list[PlaneKey], why: str) -> None:
        self.report.unrecoverable.extend(keys)
        self.reasons[why].extend(keys)
        for _ in keys:
            self._step()

    def _made(self, key: PlaneKey, source: str) -> None:
        if source == "spill":
            self.report.recreated_from_spill += 1
        else:
            self.report.recreated_from_raw += 1
        self.done.add(key)
        self._step()

    def _check(self, out: np.ndarray, shape: tuple[int, ...]) -> None:
        up = self.processor.upscale
        depth = (self.processor.output_depth(shape[0]),) if len(shape) == 3 else ()
        expected = (*depth, shape[-2] * up, shape[-1] * up)
        if out.shape != expected:
            raise ReprocessError(
                f"processor {self.processor.name} made shape {out.shape} from {shape};"
                f" expected {expected}"
            )

    def _flush(
        self, batch: list[tuple[PlaneKey, np.ndarray, str]]
    ) -> Iterator[tuple[PlaneRecord, np.ndarray]]:
        streams = [(key[3], key[2]) for key, _, _ in batch]  # (position, channel)
        outputs = self.processor.process([raw for _, raw, _ in batch], streams)
        for (key, raw, source), out in zip(batch, outputs, strict=True):
            self._check(out, raw.shape)
            self._made(key, source)
            yield self._stored(key, out)

    def planes(self, keys: list[PlaneKey]) -> Iterator[tuple[PlaneRecord, np.ndarray]]:
        """Restored 2D planes, up to BATCH frames of one shape per processor call."""
        batch: list[tuple[PlaneKey, np.ndarray, str]] = []
        for key in keys:
            try:
                raw, source = self.sources.load(key, self.acked[key])
            except (ValueError, OSError) as exc:
                self.lost([key], str(exc))
                continue
            if batch and (len(batch) == BATCH or raw.shape != batch[0][1].shape):
                yield from self._flush(batch)
                batch = []
            batch.append((key, raw, source))
        if batch:
            yield from self._flush(batch)

    def stack(self, missing: list[PlaneKey]) -> Iterator[tuple[PlaneRecord, np.ndarray]]:
        """The missing planes of one stack, restored from the planes the daemon acknowledged
        by the daemon's own rule (`processing.stack_volume`)."""
        time, _, channel, position = missing[0]
        present = sorted(
            k[1] for k in self.acked if (k[0], k[2], k[3]) == (time, channel, position)
        )
        raw: dict[int, np.ndarray] = {}
        sources: dict[int, str] = {}
        for z in present:
            key = (time, z, channel, position)
            try:
                raw[z], sources[z] = self.sources.load(key, self.acked[key])
            except (ValueError, OSError) as exc:
                self.lost(missing, f"its stack needs plane z={z}, which is {exc}")
                return
        if len({plane.shape for plane in raw.values()}) != 1:
            self.lost(missing, "the raw planes of its stack differ in shape")
            return
        volume, complete = group_volume(self.record.plan, raw)
        out = self.processor.process([volume], [(position, channel)])[0]
        self._check(out, volume.shape)
        incomplete = not complete
        for key in missing:
            self._made(key, sources[self.source[key][1]])
            yield self._stored(key, out[key[1]], incomplete)

    def recreated(self, work: _Work) -> Iterator[tuple[PlaneRecord, np.ndarray]]:
        yield from self.planes(work.planes)
        for time in sorted(work.stacks):
            yield from self.stack(work.stacks[time])

    def explain(self) -> None:
        for why, keys in self.reasons.items():
            self.report.notes.append(
                f"{len(keys)} plane(s) not recoverable, e.g. (time, z, channel, position)"
                f" {keys[0]}: {why}"
            )


def _existing(scan: FileScan | None) -> list[tuple[PlaneRecord, Any]]:
    if scan is None:
        return []
    latest = {record.key: (record, page) for page, record in scan.planes()}
    return list(latest.values())


def _rewrite(
    path: Path,
    scan: FileScan | None,
    handle: io.BufferedReader | None,
    recreated: Iterator[tuple[PlaneRecord, np.ndarray]],
    record: AcquisitionRecord,
    origin: float | None,
) -> bool:
    """Write the old planes and the recreated ones, sorted by (time, z), to a temporary file
    and rename it over `path`. False when there was no plane at all to write."""
    old = ((r, page) for r, page in sorted(_existing(scan), key=lambda item: item[0].key[:2]))

    def loaded() -> Iterator[tuple[PlaneRecord, np.ndarray]]:
        for r, page in old:
            assert handle is not None  # these pages come from a scan of the open file
            yield r, read_page(handle, page)

    merged = heapq.merge(loaded(), recreated, key=lambda item: item[0].key[:2])
    temp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
    temp.unlink(missing_ok=True)
    target = PlaneFile(temp)
    wrote = False
    try:
        for plane_record, pixels in merged:
            target.append(pixels, plane_record)
            wrote = True
        target.close(record, origin)
        if not wrote:
            temp.unlink()
            return False
        replace_atomically(temp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            target.close(record, origin)
        temp.unlink(missing_ok=True)
        raise
    return True


def _foreign(scans: dict[Path, FileScan]) -> list[Path]:
    """Output-named files with pages livedecon did not write: never rewritten."""
    return [path for path, scan in scans.items() if any(r is None for r in scan.records)]


def _time_origin(acked: dict[PlaneKey, _Acked], scans: dict[Path, FileScan]) -> float | None:
    stamps = [a.entry.timestamp_s for a in acked.values() if a.entry.timestamp_s is not None]
    stamps += [
        r.timestamp_s for s in scans.values() for _, r in s.planes() if r.timestamp_s is not None
    ]
    return min(stamps) if stamps else None


@dataclass
class _Outputs:
    """An acquisition's output files as reprocess found them, each held open and locked
    against a daemon still writing until `close`."""

    directory: Path
    scans: dict[Path, FileScan] = field(default_factory=dict)
    untouchable: list[Path] = field(default_factory=list)  # not livedecon's: never rewritten
    handles: dict[Path, io.BufferedReader] = field(default_factory=dict)

    def open(self, report: ReprocessReport) -> None:
        for path in output_files(self.directory):
            handle = open(path, "rb")  # noqa: SIM115 (held, locked, to the end)
            self.handles[path] = handle
            try:
                lock(handle, path)
            except OutputBusyError:
                raise ReprocessError(
                    f"{path}: a daemon is still writing this acquisition; stop it first"
                ) from None
            try:
                self.scans[path] = scan_file(handle, path)
            except ValueError:
                self.untouchable.append(path)
        for stale in self.directory.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink()  # left by a reprocess that was killed; the files it read are intact
        self.untouchable += _foreign(self.scans)
        for path in self.untouchable:
            self.scans.pop(path, None)
            report.notes.append(f"{path.name}: not written by livedecon; left alone")

    def written(self) -> set[PlaneKey]:
        return {r.key for scan in self.scans.values() for _, r in scan.planes()}

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def reprocess(
    acquisition_dir: Path,
    raw: Path | None = None,
    spill_root: Path | None = None,
    processor: Processor | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    backend: Backend = Backend.AUTO,
) -> ReprocessReport:
    """Make every acknowledged plane of an acquisition readable on disk (see the module doc).

    `processor`: restore with this one (default: what acquisition.json names, refused if the
    bundle's weights changed since); `backend` picks the engine for the default one.
    """
    directory = Path(acquisition_dir)
    if not directory.is_dir():
        raise ReprocessError(f"{directory}: no such directory")
    try:
        record = read_acquisition_record(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise ReprocessError(str(exc)) from None
    if raw is not None and not Path(raw).is_dir():
        raise ReprocessError(f"{raw}: no such raw dataset directory")
    report = ReprocessReport()
    raw_path = Path(raw) if raw is not None else None
    default_spill = Path(record.spill_dir) if record.spill_dir else directory.parent / "spill"
    sources = _Sources(SpillStore(spill_root or default_spill), record, raw_path)
    outputs = _Outputs(directory)
    try:
        outputs.open(report)
        acked = _acknowledged(read_journal(directory))
        rebuild = _Rebuild(record, acked, sources, processor or PassThrough(), report)
        _recover(outputs, rebuild, processor is not None, backend, progress)
    finally:
        sources.close()
        outputs.close()
    return report


def _recover(
    outputs: _Outputs,
    rebuild: _Rebuild,
    processor_given: bool,
    backend: Backend,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Recreate every acknowledged plane not on disk into its file, then free the spill."""
    written = outputs.written()
    missing = sorted((key for key in rebuild.source if key not in written), key=lambda k: k[:2])
    report = rebuild.report
    report.acknowledged = len(rebuild.acked)
    report.restored_planes = len(rebuild.source)
    report.already_written = len(rebuild.source) - len(missing)
    rebuild.set_progress(progress, len(missing))
    todo = _sourced(outputs, rebuild, missing)
    if todo and not processor_given:
        shapes = _shapes(rebuild, todo)
        rebuild.processor = _open_processor(rebuild.record, outputs.directory, backend, shapes)
    _rewrite_files(outputs, rebuild, _work(outputs.directory, rebuild.record, todo))
    if rebuild.record.ome_zarr:
        tiffs = [p for p in output_files(outputs.directory) if p not in outputs.untouchable]
        copied = complete_images(tiffs, rebuild.record)
        report.notes.append(f"OME-Zarr images complete ({copied} plane(s) copied in)")
    rebuild.explain()
    settled = _settled(rebuild.record, rebuild.source, written | rebuild.done)
    _release_spill(rebuild.sources, settled, report)


def _sourced(outputs: _Outputs, rebuild: _Rebuild, missing: list[PlaneKey]) -> list[PlaneKey]:
    """The missing planes that can be recreated; the others are reported lost, with why."""
    directory, sources = outputs.directory, rebuild.sources
    blocked = {k for k in missing if output_path(directory, k[3], k[2]) in outputs.untouchable}
    if blocked:
        rebuild.lost(sorted(blocked, key=lambda k: k[:2]), "its output file is not livedecon's")
    unsourced = [
        k for k in missing if k not in blocked and sources.where(rebuild.source[k]) is None
    ]
    if unsourced:
        where = "the raw dataset" if sources.has_raw else "a raw dataset (no --raw given)"
        rebuild.lost(unsourced, f"in neither the spill store nor {where}")
    skipped = blocked.union(unsourced)
    return [k for k in missing if k not in skipped]


def _shapes(rebuild: _Rebuild, todo: list[PlaneKey]) -> set[tuple[int, ...]]:
    """The item shapes the processor will see: frames, or whole stacks in 3D."""
    plan = rebuild.record.plan
    depth = plan.z_count if plan.mode in ("3d", "sim") else None
    shapes = {rebuild.acked[rebuild.source[k]].shape for k in todo}
    return {(depth, *shape) if depth else shape for shape in shapes}


def _work(directory: Path, record: AcquisitionRecord, todo: list[PlaneKey]) -> dict[Path, _Work]:
    """The planes to recreate, by output file: single planes, or whole stacks in 3D."""
    whole_stacks = record.plan.mode in ("3d", "sim")  # as the daemon restores them
    work: dict[Path, _Work] = defaultdict(_Work)
    for key in todo:
        target = work[output_path(directory, key[3], key[2])]
        if whole_stacks:
            target.stacks.setdefault(key[0], []).append(key)
        else:
            target.planes.append(key)
    return work


def _rewrite_files(outputs: _Outputs, rebuild: _Rebuild, work: dict[Path, _Work]) -> None:
    """Rewrite each file with work to do, and each one never finalised, whole and in order."""
    report = rebuild.report
    unfinished = {p for p, scan in outputs.scans.items() if not scan.finalised}
    origin = _time_origin(rebuild.acked, outputs.scans)
    for path in sorted(set(work) | unfinished):
        recreated = rebuild.recreated(work.get(path, _Work()))
        scan, handle = outputs.scans.get(path), outputs.handles.get(path)
        if _rewrite(path, scan, handle, recreated, rebuild.record, origin):
            report.files.append(path)
        elif path.exists():
            path.unlink()  # a header and a torn first page: nothing in it to keep
            report.files.append(path)
            report.notes.append(f"{path.name}: held no whole plane; removed")


def _release_spill(sources: _Sources, on_disk: set[PlaneKey], report: ReprocessReport) -> None:
    """Free every spilled frame whose planes are all on disk now; keep the others."""
    left = 0
    for frame, keys in sources.spill_frames.items():
        if all(k in on_disk for k in keys):
            sources.store.remove(frame)
        else:
            left += 1
    if left:
        report.notes.append(f"{left} spilled frame(s) kept: their planes are not on disk")
