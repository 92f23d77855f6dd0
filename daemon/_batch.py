"""Batch restoration beyond one process (`livedecon batch`), on dask.distributed.

Why it is built this way:

- The unit of work is one chunk of the output OME-Zarr. Its input tile is the chunk grown by
  the model's halo on each lateral side, inferred whole in one engine call; each tile is
  weighted by `tiling.blend_window` and cut into pieces, one per output chunk it overlaps; a
  chunk is the weighted sum of its pieces over the summed weights. That is `infer_tiled`'s
  blend, so the result equals the single-process restore within the tiling tolerance.
- Each output chunk is written whole by exactly one task (no two writers share a zarr chunk),
  then its provenance record is written atomically: the record is the done-marker, so a rerun
  skips exactly the chunks whose data are complete, and a chunk lost with its worker is simply
  computed again (dask reschedules; writing a chunk twice writes the same bytes).
- An unreadable input region fails its tile, which reports its coordinates; the chunks it
  feeds are reported as failed and everything else runs.
- Workers open the engine once per process (`_engine`), not once per chunk.
- Volumes are whole in depth unless `z_chunk` splits them; then chunks and halo are even, so
  the 3D network's interleaved sub-stacks (`plane_stride` 2) keep their plane pairs, and the
  blend runs along z with the same window.
- A Self-Net bundle restores each tile's axial slices (engines/_selfnet_bundle.py): every xz
  slice of the tile's rows and every yz slice of its columns, whole in depth, so its chunks
  are lateral only and the depth becomes the isotropic one. Its network is local (a receptive
  field of about 20 pixels, below the default halo), so the blended chunks equal the whole
  volume's restore within the tiling tolerance, and no worker ever holds more than a tile.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import EllipsisType
from typing import Any

import numpy as np
from pydantic import Field

from livedecon.daemon._batch_inputs import Source, plan_sources, read_region, stem
from livedecon.engines._atomic_write import write_atomically
from livedecon.engines._bundle import BundleError, BundleManifest, ModelBundle
from livedecon.engines._configfile import StrictModel
from livedecon.engines._enums import Backend
from livedecon.engines._networks import input_multiple
from livedecon.engines._offline import output_axes
from livedecon.engines._ome_zarr import ngff_image
from livedecon.engines._runtime import Runtime
from livedecon.engines._selfnet import axial_ratio, upsampled_depth
from livedecon.engines._selfnet_bundle import check_z_step, restore_isotropic
from livedecon.engines._tiling import blend_window, restore_batch_electrons

RECORDS = "livedecon_chunks"  # zarr group beside the image array: one record per done chunk
SLICE_BATCH = 8  # Self-Net: axial slices per engine call


class BatchOptions(StrictModel):
    """How `run_batch` cuts a dataset into chunks and which engine restores them."""

    backend: Backend = Backend.AUTO
    chunk_px: int = Field(256, ge=8, description="output chunk, input pixels laterally")
    halo_px: int = Field(24, ge=0, description="tiles overlap their neighbours by twice this")
    frames_per_chunk: int = Field(8, ge=1, description="2D: frames per chunk (one engine call)")
    z_chunk: int | None = Field(None, ge=2, description="3D: planes per chunk (None: all)")
    z_halo: int = Field(4, ge=0, description="3D: planes of overlap on each side of a z chunk")
    engine_threads: int = Field(1, ge=1, description="CPU threads of each worker's engine")
    in_flight: int | None = Field(None, ge=1, description="chunks submitted ahead of results")
    overwrite: bool = False


class Job(StrictModel):
    """What a worker needs to open the engine (once) and to record provenance."""

    bundle_dir: str
    bundle_id: str
    weights_sha256: str
    weights_version: int
    backend: Backend
    threads: int
    tile_shapes: tuple[tuple[int, ...], ...]
    max_batch: int


class ChunkRecord(StrictModel):
    """Provenance of one output chunk, written after its data: the chunk's done-marker."""

    chunk: tuple[int, ...]
    input_region: tuple[tuple[int, int], ...]
    bundle: str
    weights_sha256: str
    weights_version: int
    backend: str
    worker: str  # the worker that blended and wrote it
    seconds: float
    inference_worker: str | None  # the worker that inferred the chunk's own tile
    inference_seconds: float | None
    finished_utc: str


class ChunkFailure(StrictModel):
    """A chunk that could not be restored: its source, chunk index, input region and the error."""

    source: str
    chunk: tuple[int, ...]
    region: tuple[tuple[int, int], ...]  # input [start, stop) per axis
    error: str


class BatchSummary(StrictModel):
    """What a batch run did: outputs, chunks done, skipped and failed, voxels, time and workers."""

    outputs: list[str]
    chunks_total: int
    chunks_done: int  # written by this run
    chunks_skipped: int  # done by an earlier run
    tiles_inferred: int
    failures: list[ChunkFailure]
    voxels: int  # input voxels restored by this run
    seconds: float
    worker_seconds: dict[str, float]
    workers: int
    dashboard: str | None

    @property
    def voxels_per_s(self) -> float:
        return self.voxels / self.seconds if self.seconds else 0.0


# --- the chunk grid -------------------------------------------------------------------------

Index = tuple[int, ...]
Region = tuple[slice, ...]


@dataclass(frozen=True)
class Grid:
    """Chunks of an input array (..., [Z,] Y, X). `halo` and `scale` are per axis: Y and X have
    the lateral halo and the network's upsampling; Z a halo of planes when a volume is split
    in depth; leading axes (time, channel) neither."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    halo: tuple[int, ...]
    scale: tuple[int, ...]
    core: int  # trailing axes one engine call sees: 2 (Y, X) or 3 (Z, Y, X)
    depth_out: int | None = None  # Self-Net: the whole depth (axis -3) becomes these planes

    def _resampled(self, axis: int) -> bool:
        return self.depth_out is not None and axis == len(self.shape) - 3

    def _out_length(self, axis: int, n: int) -> int:
        # the resampled depth is only ever asked whole: its chunks span it
        return (self.depth_out or 0) if self._resampled(axis) else n * self.scale[axis]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunks, strict=True))

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self._out_length(a, n) for a, n in enumerate(self.shape))

    @property
    def out_chunks(self) -> tuple[int, ...]:
        return tuple(self._out_length(a, c) for a, c in enumerate(self.chunks))

    @property
    def upscale(self) -> int:
        return self.scale[-1]

    def blocks(self) -> Iterator[Index]:
        return itertools.product(*(range(k) for k in self.counts))

    def block(self, index: Index) -> Region:
        return tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(index, self.chunks, self.shape, strict=True)
        )

    def tile(self, index: Index) -> Region:
        """The block grown by the halo, clipped to the array."""
        return tuple(
            slice(max(s.start - h, 0), min(s.stop + h, n))
            for s, h, n in zip(self.block(index), self.halo, self.shape, strict=True)
        )

    def to_output(self, region: Region) -> Region:
        return tuple(
            slice(0, self.depth_out) if self._resampled(a) else slice(s.start * u, s.stop * u)
            for a, (s, u) in enumerate(zip(region, self.scale, strict=True))
        )

    def ramps(self) -> tuple[int | None, ...]:
        """Blend ramps of the core axes on the output grid: tiles overlap by twice the halo."""
        core = zip(self.halo[-self.core :], self.scale[-self.core :], strict=True)
        return tuple(2 * h * u if h else None for h, u in core)

    def neighbours(self, index: Index) -> list[Index]:
        """Blocks whose output a tile reaches: itself and its neighbours along halo axes."""
        steps = [(-1, 0, 1) if h else (0,) for h in self.halo]
        found = []
        for offset in itertools.product(*steps):
            moved = tuple(i + d for i, d in zip(index, offset, strict=True))
            if all(0 <= i < k for i, k in zip(moved, self.counts, strict=True)):
                found.append(moved)
        return found


def make_grid(source: Source, bundle: ModelBundle, options: BatchOptions) -> Grid:
    """Chunks of whole network multiples laterally; a volume whole in depth unless
    `z_chunk` splits it (then chunk and halo are even: plane_stride 2 keeps its pairs)."""
    manifest = bundle.manifest
    multiple = input_multiple(manifest.network)
    lateral = max(options.chunk_px // multiple, 1) * multiple
    if options.halo_px > lateral:
        raise ValueError(f"halo {options.halo_px} px must not exceed the chunk {lateral} px")
    if manifest.is_selfnet:
        return _selfnet_grid(source, bundle, options, lateral)
    core = 3 if manifest.is_3d else 2
    lead = len(source.shape) - core
    chunks = [1] * lead + [lateral, lateral]
    halo = [0] * lead + [options.halo_px] * 2
    if manifest.is_3d:
        depth = source.shape[-3]
        z_chunk = min(_even(options.z_chunk or depth), depth)
        z_halo = _even(options.z_halo) if z_chunk < depth else 0
        if z_halo > z_chunk:
            raise ValueError(f"z halo {z_halo} must not exceed the z chunk {z_chunk}")
        chunks.insert(lead, z_chunk)
        halo.insert(lead, z_halo)
    elif lead:
        chunks[lead - 1] = options.frames_per_chunk
    upscale = 2 if manifest.network.upsample else 1
    scale = (1,) * (len(source.shape) - 2) + (upscale, upscale)
    return Grid(tuple(source.shape), tuple(chunks), tuple(halo), scale, core)


def _selfnet_grid(source: Source, bundle: ModelBundle, options: BatchOptions, lateral: int) -> Grid:
    """Lateral chunks of whole volumes: every axial slice needs the full depth, which becomes
    the isotropic one (the z step the bundle learned, checked against the source's)."""
    if options.z_chunk is not None:
        raise ValueError(
            "Self-Net restores whole axial slices: a volume cannot be split in depth (drop"
            " --z-chunk; its chunks are lateral, which bounds memory)"
        )
    ratio = axial_ratio(bundle.manifest.input_pixel_um, check_z_step(bundle, source.z_step_um))
    lead = len(source.shape) - 3
    depth = source.shape[-3]
    return Grid(
        shape=tuple(source.shape),
        chunks=(*[1] * lead, depth, lateral, lateral),
        halo=(*[0] * lead, 0, options.halo_px, options.halo_px),
        scale=(1,) * len(source.shape),
        core=3,
        depth_out=upsampled_depth(depth, ratio),
    )


def _even(n: int) -> int:
    return n + n % 2


def _key(index: Index) -> str:
    return ".".join(map(str, index))


def _bounds(region: Region) -> tuple[tuple[int, int], ...]:
    return tuple((s.start, s.stop) for s in region)


# --- outputs --------------------------------------------------------------------------------


def ngff_attributes(source: Source, grid: Grid, bundle: ModelBundle) -> dict[str, Any]:
    """NGFF 0.5 multiscales (one level) with the output's pixel sizes, and the run's model."""
    manifest = bundle.manifest
    axes = output_axes(source.axes, len(source.shape), manifest.takes_volumes)
    z_step = manifest.output_z_step_um or source.z_step_um or manifest.z_step_um or 1.0
    size = {"T": 1.0, "C": 1.0, "Z": z_step, "Y": manifest.output_pixel_um}
    size["X"] = size["Y"]
    units = (
        "the input's intensity units above the bundle's offset"
        if manifest.is_selfnet
        else "photoelectrons per output pixel"
    )
    # the interval is not known here: time in index units
    ome = ngff_image(stem(Path(source.path)), {a: size[a] for a in axes})
    return {
        "ome": ome,
        "livedecon": {
            "source": source.path,
            "bundle": bundle.bundle_id,
            "weights_sha256": manifest.weights_sha256,
            "units": units,
            "chunks": grid.chunks,
            "halo": grid.halo,
            "chunk_records": RECORDS,
        },
    }


def prepare_output(source: Source, grid: Grid, bundle: ModelBundle, overwrite: bool) -> set[str]:
    """Create the output (or reopen it to resume); the keys of the chunks already done.
    An output made with other weights or another chunking is refused (or replaced)."""
    import zarr

    out = Path(source.output)
    attrs = ngff_attributes(source, grid, bundle)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    if out.exists():
        group = zarr.open_group(str(out), mode="r+")
        stored: Mapping[str, Any] = group.attrs  # JSON, as ngff_attributes wrote it
        found = stored.get("livedecon", {})
        expected = {k: attrs["livedecon"][k] for k in ("weights_sha256", "chunks", "halo")}
        level = group.get("0")
        other_level = level is not None and (
            not isinstance(level, zarr.Array) or level.shape != grid.out_shape
        )
        if {k: _jsonish(found.get(k)) for k in expected} != _jsonish(expected) or other_level:
            raise ValueError(
                f"{out} exists from another model, chunking or input ({found.get('bundle')}):"
                " use --overwrite to replace it"
            )
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(out), mode="w", zarr_format=3, attributes=attrs)
    # a run stopped while creating the output resumes here too
    if "0" not in group:
        group.create_array(
            "0", shape=grid.out_shape, chunks=grid.out_chunks, dtype="float32", fill_value=np.nan
        )
    if RECORDS not in group:
        group.create_group(RECORDS, attributes={"about": "one group per finished chunk"})
    return {p.name for p in (out / RECORDS).iterdir() if (p / "zarr.json").is_file()}


def _jsonish(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonish(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    return value


def _fsync_chunk(output: Path, index: Index) -> None:
    """Flush the chunk's file (zarr v3 default key encoding: 0/c/i/j/k). A chunk that is all
    fill value has no file, and nothing to flush."""
    path = output / "0" / "c" / Path(*map(str, index))
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_record(output: Path, record: ChunkRecord) -> None:
    """The chunk's record as a zarr group's attributes, renamed into place (atomic)."""
    import json

    folder = output / RECORDS / _key(record.chunk)
    folder.mkdir(parents=True, exist_ok=True)
    body = {"zarr_format": 3, "node_type": "group", "attributes": record.model_dump(mode="json")}
    write_atomically(folder / "zarr.json", json.dumps(body, indent=1))


# --- worker side ----------------------------------------------------------------------------

# per (bundle directory, weights hash, backend, threads)
_ENGINES: dict[tuple[str, str, Backend, int], tuple[ModelBundle, Runtime]] = {}
_ENGINE_LOCK = threading.Lock()
ENGINE_OPENS = [0]  # per process: how often an engine was opened (tests: once per worker)


def _engine(job: Job) -> tuple[ModelBundle, Runtime]:
    """This process's engine for the job's bundle, opened on first use."""
    from livedecon.engines._backends import open_runtime

    key = (job.bundle_dir, job.weights_sha256, job.backend, job.threads)
    with _ENGINE_LOCK:
        if key not in _ENGINES:
            bundle = ModelBundle.load(job.bundle_dir)
            if bundle.manifest.weights_sha256 != job.weights_sha256:
                raise BundleError(f"{job.bundle_dir}: the bundle changed since the run started")
            with contextlib.suppress(Exception):
                import torch

                torch.set_num_threads(job.threads)
            runtime, _ = open_runtime(
                bundle,
                Path(job.bundle_dir),
                job.backend,
                frame_shapes=list(job.tile_shapes),
                max_batch=job.max_batch,
                threads=job.threads,
            )
            _ENGINES[key] = (bundle, runtime)
            ENGINE_OPENS[0] += 1
        return _ENGINES[key]


def warm_engine(job: Job) -> str:
    """Open the engine on one worker first: the artifact cache is built once, not raced."""
    _, runtime = _engine(job)
    return str(runtime.describe().get("backend"))


def engine_opens() -> int:
    """How often this process opened an engine (tests check it is once per worker)."""
    return ENGINE_OPENS[0]


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:
        return "local"


# where in the block; weighted data; weight; (worker, seconds) of the inference, on the
# piece for the tile's own block only
Piece = tuple[tuple[slice, ...], np.ndarray, np.ndarray, tuple[str, float] | None]


def infer_tile(
    job: Job, source: Source, grid: Grid, index: Index
) -> dict[Index, Piece] | ChunkFailure:
    """Restore the tile of block `index`; its weighted pieces, keyed by the block each feeds."""
    started = time.perf_counter()
    region = grid.tile(index)
    try:
        raw = read_region(source, region)
    except Exception as exc:  # corrupt or unreadable input: reported, never fatal to the run
        return ChunkFailure(
            source=source.path, chunk=index, region=_bounds(region), error=f"{exc!r}"[:500]
        )
    bundle, runtime = _engine(job)
    items = raw.reshape(-1, *raw.shape[-grid.core :])
    restored = _restore_items(bundle, runtime, items, source, grid)
    restored = restored.reshape(*raw.shape[: -grid.core], *restored.shape[1:])
    window = blend_window(restored.shape[-grid.core :], grid.ramps())
    weighted = restored * window
    tile_out = grid.to_output(region)[-grid.core :]
    spent = (_worker_name(), time.perf_counter() - started)
    pieces: dict[Index, Piece] = {}
    for neighbour in grid.neighbours(index):
        block_out = grid.to_output(grid.block(neighbour))[-grid.core :]
        inside, in_block = [], []
        for t, b in zip(tile_out, block_out, strict=True):
            lo, hi = max(t.start, b.start), min(t.stop, b.stop)
            inside.append(slice(lo - t.start, hi - t.start))
            in_block.append(slice(lo - b.start, hi - b.start))
        if all(s.stop > s.start for s in inside):
            part = tuple(inside)
            data = np.ascontiguousarray(weighted[(..., *part)], dtype=np.float32)
            own = spent if neighbour == index else None
            pieces[neighbour] = (tuple(in_block), data, window[part], own)
    return pieces


def _restore_items(
    bundle: ModelBundle, runtime: Runtime, items: np.ndarray, source: Source, grid: Grid
) -> np.ndarray:
    """One tile's frames or volumes (N, [Z,] Y, X) of raw values, restored."""
    if bundle.manifest.is_selfnet:
        return np.stack(
            [
                restore_isotropic(bundle, runtime.infer, v, source.z_step_um, SLICE_BATCH)
                for v in items
            ]
        )
    norm = bundle.manifest.normalisation
    electrons = norm.electrons(items)
    restored = restore_batch_electrons(
        runtime.infer, electrons, norm.scale_e, runtime.multiple, grid.upscale, bundle.flux_share
    )
    # refined tile by tile, halo included: the seams' blend hides where tiles disagree
    return np.stack([bundle.refine(r, e) for r, e in zip(restored, electrons, strict=True)])


def piece_for(tile: dict[Index, Piece] | ChunkFailure, block: Index) -> Piece | ChunkFailure:
    """One block's piece of a tile (runs where the tile is: only the piece travels)."""
    return tile if isinstance(tile, ChunkFailure) else tile[block]


def write_chunk(
    job: Job, source: Source, grid: Grid, index: Index, pieces: list[Piece | ChunkFailure]
) -> ChunkRecord | ChunkFailure:
    """Blend the pieces of one output chunk, write it, then its record (the done-marker)."""
    import zarr

    started = time.perf_counter()
    region = grid.block(index)
    failed = [p for p in pieces if isinstance(p, ChunkFailure)]
    if failed:
        causes = "; ".join(
            f"input region {[list(r) for r in f.region]} of {f.source}: {f.error}" for f in failed
        )
        return ChunkFailure(
            source=source.path, chunk=index, region=_bounds(region), error=f"unreadable {causes}"
        )
    out_region = grid.to_output(region)
    shape = tuple(s.stop - s.start for s in out_region)
    total = np.zeros(shape, np.float64)
    weight = np.zeros(shape[-grid.core :], np.float64)
    inference = None
    for where, data, w, spent in [p for p in pieces if not isinstance(p, ChunkFailure)]:
        key: tuple[EllipsisType | slice, ...] = (..., *where)  # leading axes whole
        total[key] += data
        weight[where] += w
        inference = spent or inference
    result = (total / weight).astype(np.float32)
    zarr.open_array(source.output, path="0", mode="r+")[out_region] = result
    _fsync_chunk(Path(source.output), index)  # the data reach the disk before the record
    record = ChunkRecord(
        chunk=index,
        input_region=_bounds(region),
        bundle=job.bundle_id,
        weights_sha256=job.weights_sha256,
        weights_version=job.weights_version,
        backend=job.backend,
        worker=_worker_name(),
        seconds=time.perf_counter() - started,
        inference_worker=inference[0] if inference else None,
        inference_seconds=inference[1] if inference else None,
        finished_utc=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_record(Path(source.output), record)
    return record


# --- driver ---------------------------------------------------------------------------------


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    workers: int | None = None,
    dashboard_address: str = ":8787",
    backend: Backend = Backend.AUTO,
) -> Iterator[Any]:
    """A client of the cluster at `scheduler`, or of a local cluster sized to this machine,
    closed on exit."""
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers or local_workers(backend),
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard_address,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def local_workers(backend: Backend) -> int:
    """One single-threaded worker per core for CPU engines; one per GPU for GPU engines (more
    engines than GPUs would only share them). Pinning each worker to its own GPU on a
    multi-GPU node is dask-cuda's job (README)."""
    from livedecon.engines._backends import choose_backend

    if choose_backend(backend).backend in (Backend.TENSORRT, Backend.TORCH_CUDA):
        import torch

        return max(torch.cuda.device_count(), 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


Progress = Callable[[int, int, ChunkRecord | ChunkFailure], None]


def _engine_shapes(grid: Grid) -> set[tuple[int, ...]]:
    """What the engine sees of a grid's largest tile (a chunk and its halo, within the array):
    the tile, or for Self-Net its axial slices (isotropic depth by tile height, and by width)."""
    n = grid.core
    core = zip(grid.chunks[-n:], grid.halo[-n:], grid.shape[-n:], strict=True)
    tile = tuple(min(c + 2 * h, size) for c, h, size in core)
    if grid.depth_out is None:
        return {tile}
    return {(grid.depth_out, side) for side in tile[1:]}


def _max_batch(manifest: BundleManifest, options: BatchOptions) -> int:
    """Items per engine call: a tile's frames (2D), one stack (3D), axial slices (Self-Net)."""
    if manifest.is_selfnet:
        return SLICE_BATCH
    return 1 if manifest.is_3d else options.frames_per_chunk


def make_job(
    bundle: ModelBundle, bundle_dir: Path, grids: list[Grid], options: BatchOptions
) -> Job:
    """The engine every worker opens, with the tile shapes it will see (TensorRT profiles)."""
    manifest = bundle.manifest
    shapes = set().union(*(_engine_shapes(g) for g in grids))
    return Job(
        bundle_dir=str(bundle_dir.resolve()),
        bundle_id=bundle.bundle_id,
        weights_sha256=manifest.weights_sha256,
        weights_version=manifest.weights_version,
        backend=options.backend,
        threads=options.engine_threads,
        tile_shapes=tuple(sorted(shapes)),
        max_batch=_max_batch(manifest, options),
    )


def run_batch(
    client: Any,
    bundle_dir: Path,
    inputs: Sequence[str | Path],
    out: Path,
    options: BatchOptions | None = None,
    progress: Progress | None = None,
) -> BatchSummary:
    """Restore every input chunk by chunk on the cluster behind `client`."""
    options = options or BatchOptions()
    bundle = ModelBundle.load(bundle_dir)
    sources = plan_sources(inputs, Path(out), bundle)
    grids = [make_grid(s, bundle, options) for s in sources]
    done = [
        prepare_output(s, g, bundle, options.overwrite) for s, g in zip(sources, grids, strict=True)
    ]
    todo = [
        (i, index)
        for i, g in enumerate(grids)
        for index in g.blocks()
        if _key(index) not in done[i]
    ]
    total = sum(math.prod(g.counts) for g in grids)
    job = make_job(bundle, Path(bundle_dir), grids, options)
    if todo:
        client.submit(warm_engine, job, pure=False).result()  # builds the artifact once
        client.run(warm_engine, job)  # then every worker present opens its engine
    started = time.perf_counter()
    results = _submit_all(client, job, sources, grids, todo, options, progress)
    seconds = time.perf_counter() - started
    written = [r for r in results if isinstance(r, ChunkRecord)]
    return BatchSummary(
        outputs=[s.output for s in sources],
        chunks_total=total,
        chunks_done=len(written),
        chunks_skipped=total - len(todo),
        tiles_inferred=len(_tile_keys(grids, todo)),
        failures=[r for r in results if isinstance(r, ChunkFailure)],
        voxels=sum(math.prod(b - a for a, b in r.input_region) for r in written),
        seconds=seconds,
        worker_seconds=_busy_per_worker(written),
        workers=len(client.scheduler_info().get("workers", {})),
        dashboard=getattr(client, "dashboard_link", None),
    )


def _tile_keys(grids: list[Grid], todo: list[tuple[int, Index]]) -> set[tuple[int, Index]]:
    return {(i, t) for i, index in todo for t in grids[i].neighbours(index)}


def _submit_all(
    client: Any,
    job: Job,
    sources: list[Source],
    grids: list[Grid],
    todo: list[tuple[int, Index]],
    options: BatchOptions,
    progress: Progress | None,
) -> list[ChunkRecord | ChunkFailure]:
    """Submit chunks in order, at most `in_flight` ahead of the results, so memory holds a
    band of tiles rather than the dataset. A tile is dropped once its last chunk is queued."""
    from distributed import as_completed

    run = uuid.uuid4().hex[:8]
    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
    in_flight = options.in_flight or 2 * max(threads, 1) + 2
    users: dict[tuple[int, Index], int] = {}
    for i, index in todo:
        for t in grids[i].neighbours(index):
            users[(i, t)] = users.get((i, t), 0) + 1
    tiles: dict[tuple[int, Index], Any] = {}
    pending = as_completed()
    where: dict[str, tuple[int, Index]] = {}
    results: list[ChunkRecord | ChunkFailure] = []
    queue = iter(todo)

    def submit_next() -> bool:
        item = next(queue, None)
        if item is None:
            return False
        i, index = item
        source, grid = sources[i], grids[i]
        pieces = []
        for t in grid.neighbours(index):
            if (i, t) not in tiles:
                tiles[(i, t)] = client.submit(
                    infer_tile, job, source, grid, t, key=f"tile-{run}-{i}-{_key(t)}"
                )
            pieces.append(
                client.submit(
                    piece_for, tiles[(i, t)], index, key=f"piece-{run}-{i}-{_key(t)}-{_key(index)}"
                )
            )
            users[(i, t)] -= 1
            if not users[(i, t)]:
                del tiles[(i, t)]
        future = client.submit(
            write_chunk, job, source, grid, index, pieces, key=f"chunk-{run}-{i}-{_key(index)}"
        )
        where[future.key] = item
        pending.add(future)
        return True

    for _ in range(in_flight):
        if not submit_next():
            break
    for future in pending:
        i, index = where.pop(future.key)
        try:
            result = future.result()
        except Exception as exc:  # lost too often (KilledWorker), or a bug: report, go on
            region = _bounds(grids[i].block(index))
            result = ChunkFailure(
                source=sources[i].path, chunk=index, region=region, error=repr(exc)
            )
        results.append(result)
        future.release()
        if progress:
            progress(len(results), len(todo), result)
        submit_next()
    return results


def _busy_per_worker(records: list[ChunkRecord]) -> dict[str, float]:
    """Seconds each worker spent inferring tiles and writing chunks, from the chunks' records
    (tiles inferred only for a finished neighbour's blend are not counted)."""
    busy: dict[str, float] = {}
    for r in records:
        busy[r.worker] = busy.get(r.worker, 0.0) + r.seconds
        if r.inference_worker is not None and r.inference_seconds is not None:
            busy[r.inference_worker] = busy.get(r.inference_worker, 0.0) + r.inference_seconds
    return busy


# --- benchmark ------------------------------------------------------------------------------


def bench_batch(
    workers: Sequence[int] = (1, 2),
    model: str = "fast2d-sim",
    frames: int = 16,
    size: int = 512,
    options: BatchOptions | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Voxels/s of `livedecon batch` on local clusters of each size in `workers` (one
    single-threaded engine per worker), restoring the same synthetic time series."""
    import tempfile

    import zarr

    from livedecon.engines._bundle import find_bundle

    options = options or BatchOptions(frames_per_chunk=4)
    bundle_dir = find_bundle(model)
    rng = np.random.default_rng(0)
    counts = rng.poisson(150.0, (frames, size, size)).astype(np.uint16)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="livedecon-bench-batch-") as scratch:
        raw = Path(scratch) / "raw.zarr"
        zarr.create_array(str(raw), data=counts, chunks=(options.frames_per_chunk, 256, 256))
        for n in workers:
            progress(f"{n} worker{'s' * (n > 1)}")
            with connect(workers=n, dashboard_address=":0") as client:
                client.wait_for_workers(n)
                out = Path(scratch) / f"out-{n}.ome.zarr"
                summary = run_batch(client, bundle_dir, [raw], out, options)
            rows.append(
                {
                    "scenario": f"batch {model}, {n} worker{'s' * (n > 1)}",
                    "workers": n,
                    "input": f"{frames}x{size}x{size}",
                    "chunks": summary.chunks_done,
                    "seconds": summary.seconds,
                    "voxels_per_s": summary.voxels_per_s,
                    "failures": len(summary.failures),
                }
            )
    base = rows[0]["voxels_per_s"] if rows else 0.0
    for row in rows:
        row["speedup"] = row["voxels_per_s"] / base if base else float("nan")
    return rows
