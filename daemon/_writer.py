"""Restored planes on disk: one BigTIFF OME-TIFF per (acquisition, position, channel).

Planes arrive live, in any (time, z) order, for as long as the acquisition runs, so each file
is appended to one page at a time (tifffile, uncompressed, one IFD per plane, linked as soon as
it is written). Each page's ImageDescription is that plane's `PlaneRecord` as JSON, so a file
whose writer was killed is self-describing and readable up to its last whole page: tifffile
flushes every page to the OS before `write` returns, and a kill cannot undo what the OS holds.

`close` finalises a file as OME-TIFF: the first page's description is replaced by OME-XML
(physical sizes, SizeT/Z/C, one TiffData per plane naming its IFD, Plane elements with DeltaT,
each plane's model provenance as an annotation, and every plane record as JSON, the first
page's included). The XML is appended at the end of the file and the tag is switched to it in
one small write, so a kill during finalisation leaves the old, still valid, description.

Reading uses a small BigTIFF parser of its own: a killed writer can leave the last IFD link
pointing at a page that was never written, and that must end the file quietly, not fail it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import tifffile
from ome_types import to_xml
from ome_types.model import (
    OME,
    AnnotationRef,
    Channel,
    CommentAnnotation,
    Image,
    Map,
    MapAnnotation,
    Pixels,
    Plane,
    StructuredAnnotations,
    TiffData,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livedecon.daemon._journal import AcquisitionRecord, safe_name
from livedecon.daemon._protocol import OutputDtype

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; its sharing rules refuse the worst cases
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FILE_PREFIX = "restored_"
FILE_SUFFIX = ".ome.tif"
OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
RECORDS_NAMESPACE = "livedecon/plane-records/v1"
MODEL_NAMESPACE = "livedecon/model"
ACQUISITION_NAMESPACE = "livedecon/acquisition"
DTYPES = {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)}
_OME_TYPES = {"uint8": "uint8", "uint16": "uint16", "float32": "float"}

PlaneKey = tuple[int, int, int | str, int | str]  # (time, z, channel, position)

# uint16 output: a bright pixel (the processor's `bright_level`, the training data's bright
# percentile) is stored as this count. A count is 1/256 of it: its rounding error (0.3 count
# rms) stays below the shot noise of any pixel under 800,000 e-, and samples 256x brighter
# than the training data still fit
UINT16_BRIGHT_COUNTS = 256
UINT16_MAX = np.iinfo(np.uint16).max


class PlaneRecord(BaseModel):
    """What one restored plane is: its place in the acquisition and the model that made it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    frame_id: int
    time: int
    z: int
    channel: int | str
    position: int | str
    timestamp_s: float | None = None
    bundle_id: str
    weights_version: int
    incomplete_stack: bool = False
    units_per_count: float | None = Field(
        None, gt=0, description="uint16 output: the units (e.g. photoelectrons) of one count"
    )
    clipped_px: int = Field(0, ge=0, description="uint16 output: pixels above its range")

    @property
    def key(self) -> PlaneKey:
        return (self.time, self.z, self.channel, self.position)


def units_per_count(dtype: OutputDtype, bright_level: float) -> float | None:
    """What one stored count means in an acquisition's output: None for float32 (values are
    the units themselves); for uint16, fixed by the processor's bright level, so every plane of
    an acquisition, and every plane `reprocess` recreates, shares one scale."""
    return None if dtype == "float32" else bright_level / UINT16_BRIGHT_COUNTS


def stored_plane(plane: np.ndarray, record: PlaneRecord) -> tuple[np.ndarray, PlaneRecord]:
    """The plane as the file keeps it: float32 as it is, or rounded to uint16 counts of
    `record.units_per_count` (negative values to 0; those above the range to its top, counted
    in the returned record)."""
    if record.units_per_count is None:
        return plane, record
    counts = np.rint(np.asarray(plane, dtype=np.float32) / np.float32(record.units_per_count))
    clipped = int(np.count_nonzero(counts > UINT16_MAX))
    stored = np.clip(counts, 0, UINT16_MAX).astype(np.uint16)
    return stored, record.model_copy(update={"clipped_px": clipped})


def in_units(pixels: np.ndarray, record: PlaneRecord) -> np.ndarray:
    """A stored plane back in its units (float32), whichever dtype the file keeps."""
    if record.units_per_count is None:
        return np.asarray(pixels, dtype=np.float32)
    return pixels.astype(np.float32) * np.float32(record.units_per_count)


class OutputBusyError(RuntimeError):
    """Another process (a running daemon, a reprocess) holds the file open for writing."""


def output_path(directory: Path, position: int | str, channel: int | str) -> Path:
    """The file holding the restored planes of one position and channel."""
    return (
        Path(directory) / f"{FILE_PREFIX}p{safe_name(position)}_c{safe_name(channel)}{FILE_SUFFIX}"
    )


def output_files(directory: Path) -> list[Path]:
    """The output files in `directory`, sorted by name."""
    return sorted(Path(directory).glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))


# ---------------------------------------------------------------------------------------------
# Reading: a BigTIFF walker that trusts nothing past the last whole page.

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
_INT_FORMATS = {3: "H", 4: "I", 16: "Q"}
_SAMPLE_DTYPES: dict[tuple[int, int], np.dtype] = {
    (1, 8): np.dtype(np.uint8),
    (1, 16): np.dtype(np.uint16),
    (3, 32): np.dtype(np.float32),
}
_MAX_TAGS = 256


@dataclass(frozen=True)
class Page:
    """One whole page: every byte it refers to lies inside the file."""

    index: int
    shape: tuple[int, int]
    dtype: np.dtype
    strips: tuple[tuple[int, int], ...]  # (offset, bytecount)
    description: bytes
    description_entry: int  # file offset of the ImageDescription IFD entry (0: none)


@dataclass
class FileScan:
    """What a scan of an output file found: its whole pages and their plane records, and whether
    its OME-XML is finalised."""

    path: Path
    pages: list[Page]
    records: list[PlaneRecord | None]  # per page; None: the page has no plane record
    is_ome: bool  # the first page holds OME-XML (finalised at least once)
    described: int  # plane records listed in the OME-XML
    end: int  # end of the last byte a whole page refers to
    size: int
    last_link: int | None  # offset of the last whole page's next-IFD link

    @property
    def finalised(self) -> bool:
        """OME-XML describes every page and nothing torn follows them."""
        return self.is_ome and self.described == len(self.pages) and self.end == self.size

    def planes(self) -> Iterator[tuple[Page, PlaneRecord]]:
        for page, record in zip(self.pages, self.records, strict=True):
            if record is not None:
                yield page, record


def _read_at(fh: BinaryIO, length: int, offset: int) -> bytes:
    fh.seek(offset)
    return fh.read(length)


def _write_at(fh: BinaryIO, data: bytes, offset: int) -> None:
    fh.seek(offset)
    fh.write(data)
    fh.flush()


def _values(fh: BinaryIO, size: int, entry: bytes) -> tuple[int, tuple[int, int] | None, bytes]:
    """Tag code, out-of-line (offset, length) if any, and the raw value bytes of one entry."""
    code, dtype, count = struct.unpack_from("<HHQ", entry)
    length = _TYPE_SIZES.get(dtype, 0) * count
    if length == 0 or count > 2**32:
        raise ValueError("bad tag")
    if length <= 8:
        return code, None, entry[12 : 12 + length]
    (offset,) = struct.unpack_from("<Q", entry, 12)
    if offset + length > size:
        raise ValueError("tag value past the end of the file")
    return code, (offset, length), _read_at(fh, length, offset)


def _ints(raw: bytes, entry: bytes) -> tuple[int, ...]:
    dtype, count = struct.unpack_from("<HQ", entry, 2)
    return struct.unpack(f"<{count}{_INT_FORMATS[dtype]}", raw)


def _page(fh: BinaryIO, size: int, index: int, offset: int) -> tuple[Page, int, int, int]:
    """Parse and check the IFD at `offset`: the page, the offset of its next-IFD link, the next
    IFD's offset and the end of the last byte it refers to. ValueError: not a whole page."""
    if offset < 16 or offset + 8 > size:
        raise ValueError("IFD offset outside the file")
    (count,) = struct.unpack("<Q", _read_at(fh, 8, offset))
    if not 0 < count <= _MAX_TAGS or offset + 16 + 20 * count > size:
        raise ValueError("bad IFD")
    block = _read_at(fh, 20 * count + 8, offset + 8)
    link = offset + 8 + 20 * count
    end = link + 8
    tags: dict[int, tuple[bytes, bytes]] = {}
    description_entry = 0
    for i in range(count):
        entry = block[20 * i : 20 * i + 20]
        code, where, raw = _values(fh, size, entry)
        tags[code] = (raw, entry)
        if where:
            end = max(end, where[0] + where[1])
        if code == 270:
            description_entry = offset + 8 + 20 * i
    try:
        width, height = (_ints(*tags[c])[0] for c in (256, 257))
        bits = _ints(*tags[258])[0] if 258 in tags else 1
        sample_format = _ints(*tags[339])[0] if 339 in tags else 1
        offsets, counts = _ints(*tags[273]), _ints(*tags[279])
        compression = _ints(*tags[259])[0] if 259 in tags else 1
        samples = _ints(*tags[277])[0] if 277 in tags else 1
    except (KeyError, struct.error) as exc:
        raise ValueError(f"missing or bad image tag {exc}") from None
    dtype = _SAMPLE_DTYPES.get((sample_format, bits))
    if dtype is None or compression != 1 or samples != 1 or len(offsets) != len(counts):
        raise ValueError("not an uncompressed grey plane")
    if sum(counts) != width * height * dtype.itemsize:
        raise ValueError("strip sizes do not add up to the plane")
    for strip_offset, strip_count in zip(offsets, counts, strict=True):
        if strip_offset + strip_count > size:
            raise ValueError("plane data past the end of the file")  # a torn page
        end = max(end, strip_offset + strip_count)
    description = tags[270][0].rstrip(b"\0") if 270 in tags else b""
    (next_offset,) = struct.unpack_from("<Q", block, 20 * count)
    strips = tuple(zip(offsets, counts, strict=True))
    page = Page(index, (height, width), dtype, strips, description, description_entry)
    return page, link, next_offset, end


def _first_ifd(fh: BinaryIO, path: Path) -> int:
    header = _read_at(fh, 16, 0)
    if len(header) < 16 or header[:4] != b"II+\x00":
        raise ValueError(f"{path}: not a little-endian BigTIFF (livedecon writes only those)")
    return struct.unpack_from("<Q", header, 8)[0]


def _records_in_ome(description: bytes) -> list[PlaneRecord]:
    root = ET.fromstring(description)
    for note in root.iter(f"{{{OME_NS}}}CommentAnnotation"):
        if note.get("Namespace") == RECORDS_NAMESPACE:
            value = note.find(f"{{{OME_NS}}}Value")
            if value is None:
                raise ValueError("plane records without their Value element")
            return [PlaneRecord.model_validate(r) for r in json.loads(value.text or "[]")]
    return []


def scan_file(fh: BinaryIO, path: Path) -> FileScan:
    """Every whole page of a file written by this module, with its plane record. A torn last
    page (a kill mid-write, a truncated copy) ends the scan; it never raises for one."""
    size = os.fstat(fh.fileno()).st_size
    pages: list[Page] = []
    end, last_link = 16, None
    offset = _first_ifd(fh, path) if size else 0
    seen: set[int] = set()
    while offset and offset not in seen:
        seen.add(offset)
        try:
            page, link, offset, page_end = _page(fh, size, len(pages), offset)
        except ValueError:
            break
        pages.append(page)
        end, last_link = max(end, page_end), link
    records: list[PlaneRecord | None] = []
    is_ome, described = False, 0
    for page in pages:
        try:
            records.append(PlaneRecord.model_validate_json(page.description))
            continue
        except ValidationError:
            pass
        if page.index == 0 and page.description.rstrip().endswith(b"OME>"):
            try:
                listed = _records_in_ome(page.description)
            except (ET.ParseError, ValueError):
                listed = []
            is_ome, described = True, len(listed)
            records.append(listed[0] if listed else None)
        else:
            records.append(None)  # a page someone else wrote; not a plane of ours
    return FileScan(
        Path(path), pages, records, is_ome, described, end if pages else 0, size, last_link
    )


def read_page(fh: io.BufferedIOBase, page: Page) -> np.ndarray:
    """The pixels of one page, read straight into a new array."""
    pixels = np.empty(page.shape, page.dtype)
    view = pixels.reshape(-1).view(np.uint8).data
    position = 0
    for offset, count in page.strips:
        fh.seek(offset)
        got = fh.readinto(view[position : position + count])
        if got != count:
            raise OSError(f"short read of a plane ({got} of {count} bytes)")
        position += count
    return pixels


def read_planes(path: Path) -> list[tuple[PlaneRecord, np.ndarray]]:
    """Every readable plane of one output file, finalised or not, in file order."""
    with open(path, "rb") as fh:
        scan = scan_file(fh, Path(path))
        return [(record, read_page(fh, page)) for page, record in scan.planes()]


def written_keys(directory: Path) -> set[PlaneKey]:
    """(time, z, channel, position) of every readable plane in an acquisition's directory."""
    keys: set[PlaneKey] = set()
    for path in output_files(directory):
        with open(path, "rb") as fh:
            try:
                scan = scan_file(fh, path)
            except ValueError:
                continue  # not one of ours: it holds no planes of ours either
        keys.update(record.key for _, record in scan.planes())
    return keys


# ---------------------------------------------------------------------------------------------
# Writing.


def _map_annotation(ident: str, namespace: str, values: dict[str, object]) -> MapAnnotation:
    pairs = [Map.M(k=key, value=str(item)) for key, item in values.items()]
    return MapAnnotation(id=ident, namespace=namespace, value=Map(ms=pairs))


def ome_xml(
    name: str,
    shape: tuple[int, int],
    dtype: np.dtype,
    records: Sequence[PlaneRecord | None],
    acquisition: AcquisitionRecord,
    time_origin_s: float | None,
) -> bytes:
    """OME-XML (built with ome-types, valid against the 2016-06 schema) for a file whose page
    i holds `records[i]`; a (time, z) written twice is the last page that holds it (the
    earlier ones stay in the file, unreferenced)."""
    latest: dict[tuple[int, int], int] = {}
    for ifd, record in enumerate(records):
        if record is not None:
            latest[(record.time, record.z)] = ifd
    plan = acquisition.plan
    size_z = max(z for _, z in latest) + 1
    if plan.mode == "3d" and acquisition.stack_depth:
        size_z = max(size_z, acquisition.stack_depth)
    first = next(r for r in records if r is not None)
    ordered = sorted(latest.items())
    models: dict[tuple[str, int], str] = {}
    planes = []
    for (t, z), ifd in ordered:
        record = records[ifd]
        assert record is not None
        delta = None
        if record.timestamp_s is not None and time_origin_s is not None:
            delta = record.timestamp_s - time_origin_s
        model = (record.bundle_id, record.weights_version)
        ident = models.setdefault(model, f"Annotation:model:{len(models)}")
        planes.append(
            Plane(
                the_t=t,
                the_z=z,
                the_c=0,
                delta_t=delta,
                annotation_refs=[AnnotationRef(id=ident)],
            )
        )
    pixels = Pixels(
        id="Pixels:0",
        dimension_order="XYZCT",
        type=_OME_TYPES[dtype.name],
        size_x=shape[1],
        size_y=shape[0],
        size_z=size_z,
        size_c=1,
        size_t=max(t for t, _ in latest) + 1,
        physical_size_x=acquisition.output_pixel_um,
        physical_size_y=acquisition.output_pixel_um,
        physical_size_z=acquisition.stack_z_step_um if plan.mode == "3d" else None,
        time_increment=plan.time_interval_s,
        big_endian=False,
        interleaved=False,
        channels=[Channel(id="Channel:0:0", name=str(first.channel), samples_per_pixel=1)],
        tiff_data_blocks=[
            TiffData(ifd=ifd, first_t=t, first_z=z, first_c=0, plane_count=1)
            for (t, z), ifd in ordered
        ],
        planes=planes,
    )
    image = Image(
        id="Image:0",
        name=name,
        acquisition_date=acquisition.started_at,
        pixels=pixels,
        annotation_refs=[AnnotationRef(id="Annotation:acquisition")],
    )
    about: dict[str, object] = {
        "acquisition_id": acquisition.acquisition_id,
        "position": first.position,
        "channel": first.channel,
        "units": acquisition.units,
        "mode": plan.mode,
        "input_pixel_um": acquisition.input_pixel_um,
    }
    if time_origin_s is not None:
        about["time_origin_s"] = repr(time_origin_s)
    notes = [_map_annotation("Annotation:acquisition", ACQUISITION_NAMESPACE, about)]
    notes += [
        _map_annotation(ident, MODEL_NAMESPACE, {"bundle_id": bundle, "weights_version": version})
        for (bundle, version), ident in models.items()
    ]
    # Every page's record, in IFD order: the first page's own JSON is what the OME-XML replaces.
    listed = [r.model_dump(mode="json") if r is not None else None for r in records]
    comment = CommentAnnotation(
        id="Annotation:planes",
        namespace=RECORDS_NAMESPACE,
        value=json.dumps(listed, separators=(",", ":")),
    )
    ome = OME(
        uuid=f"urn:uuid:{uuid.uuid4()}",
        creator="livedecon",
        images=[image],
        structured_annotations=StructuredAnnotations(
            map_annotations=notes, comment_annotations=[comment]
        ),
    )
    return to_xml(ome).encode("ascii", "xmlcharrefreplace")


def _set_first_description(fh: BinaryIO, path: Path, text: bytes) -> None:
    """Point the first page's ImageDescription at `text`, appended at the end of the file.
    The tag's count and offset change in one 16-byte write: a kill leaves the old or the new."""
    scan_first = _page(fh, os.fstat(fh.fileno()).st_size, 0, _first_ifd(fh, path))[0]
    if not scan_first.description_entry:
        raise ValueError(f"{path}: the first page has no ImageDescription to replace")
    size = os.fstat(fh.fileno()).st_size
    start = size + size % 2  # tag values begin on a word boundary
    _write_at(fh, b"\0" * (start - size) + text + b"\0", size)
    _write_at(fh, struct.pack("<QQ", len(text) + 1, start), scan_first.description_entry + 4)


def lock(fh: BinaryIO, path: Path) -> None:
    """Hold `fh` exclusively (until it is closed, or the process dies), or OutputBusyError."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputBusyError(
            f"{path}: another process is writing this file (a running daemon or reprocess)"
        ) from None


def check_plane(plane: np.ndarray) -> None:
    """Refuse a plane that is not 2D or not uint8, uint16 or float32."""
    if plane.ndim != 2:
        raise ValueError(f"a plane is (Y, X); got shape {plane.shape}")
    if plane.dtype not in DTYPES:
        raise ValueError(f"planes are written as uint8, uint16 or float32; got {plane.dtype}")


def _create_nofollow(path: str, flags: int) -> int:
    """An `open` opener: create the file if absent, never through a symbolic link."""
    return os.open(path, flags | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)


class PlaneFile:
    """One output file open for appending planes; locked against other writers until closed.

    An existing file is continued: a torn last page is cut off first, and its planes keep
    their records, so the OME-XML written at `close` covers old and new pages alike.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # Open without truncating, then lock, then look; never through a symbolic link.
        self._fh: BinaryIO = open(self.path, "r+b", opener=_create_nofollow)  # noqa: SIM115
        try:
            lock(self._fh, self.path)
            self.records: list[PlaneRecord | None] = []
            self.shape: tuple[int, int] | None = None
            self.dtype: np.dtype | None = None
            existing = self._continue()
            self._fh.seek(0)  # tifffile takes the handle's position as the start of the TIFF
            self._tiff = tifffile.TiffWriter(
                self._fh, bigtiff=True, append="force" if existing else False
            )
        except BaseException:
            self._fh.close()
            raise

    def _continue(self) -> bool:
        scan = scan_file(self._fh, self.path)
        if not scan.pages:
            if scan.size:  # a header and a torn first page. (Never truncate an empty file:
                self._fh.truncate(0)  # ext4 then flushes it to disk on close, ~0.5 s.)
            return False
        if any(record is None for record in scan.records):
            raise ValueError(
                f"{self.path}: exists but is not a livedecon output file; move it away"
            )
        if scan.end != scan.size:
            self._fh.truncate(scan.end)  # the torn remains of a killed writer
        assert scan.last_link is not None
        # The last whole page may still link to the torn one; new pages must follow it instead.
        _write_at(self._fh, struct.pack("<Q", 0), scan.last_link)
        self.records = list(scan.records)
        self.shape, self.dtype = scan.pages[0].shape, scan.pages[0].dtype
        return True

    def append(self, plane: np.ndarray, record: PlaneRecord) -> None:
        if self.shape is None:
            check_plane(plane)
        elif plane.shape != self.shape or plane.dtype != self.dtype:
            raise ValueError(
                f"{self.path.name}: a plane of shape {plane.shape} {plane.dtype} does not match"
                f" the file's planes of shape {self.shape} {self.dtype}; one file holds one"
                " shape and dtype"
            )
        description = json.dumps(record.model_dump(mode="json"), separators=(",", ":"))
        self._tiff.write(
            plane,
            contiguous=False,
            description=description.encode("ascii"),
            metadata=None,
            photometric="minisblack",
            software="livedecon",
        )
        self.records.append(record)
        self.shape, self.dtype = plane.shape, plane.dtype

    def release(self) -> None:
        """Close without finalising: the file stays as a kill would leave it, every whole page
        readable, and can be continued by a new PlaneFile (after an idle close or a failed
        write, whose torn page that one cuts off)."""
        if not self._fh.closed:
            self._fh.close()

    def timestamps(self) -> list[float]:
        return [r.timestamp_s for r in self.records if r is not None and r.timestamp_s is not None]

    def close(self, acquisition: AcquisitionRecord, time_origin_s: float | None) -> Path:
        """Finalise as OME-TIFF (when it holds any plane) and release the file."""
        if self._fh.closed:
            return self.path
        try:
            self._tiff.close()
            if (
                self.shape is not None
                and self.dtype is not None
                and any(r is not None for r in self.records)
            ):
                name = self.path.name.removesuffix(FILE_SUFFIX)
                text = ome_xml(
                    name, self.shape, self.dtype, self.records, acquisition, time_origin_s
                )
                self._fh.flush()
                _set_first_description(self._fh, self.path, text)
        finally:
            empty = not any(r is not None for r in self.records)
            self._fh.close()  # also releases the lock
        if empty and self.path.stat().st_size == 0:
            self.path.unlink()  # created for a plane that was then refused
        return self.path


def _origin(files: Sequence[PlaneFile]) -> float | None:
    stamps = [s for f in files for s in f.timestamps()]
    return min(stamps) if stamps else None


class Mirror(Protocol):
    """A second copy of the planes in another format (daemon/_zarr_output.py): each plane is
    handed over once its OME-TIFF holds it, and `close` gets the finalised files."""

    def write(self, tiff_path: Path, plane: np.ndarray, record: PlaneRecord) -> None: ...

    def close(self, tiff_paths: list[Path]) -> None: ...


class AcquisitionWriter:
    """The restored planes of one acquisition: a file per (position, channel), appended to as
    planes come, finalised as OME-TIFF by `close`. Safe to call from several threads.

    A failed append closes that file unfinalised (its whole pages stay readable); the next
    plane for it continues the file after cutting off the torn page. `suspend` closes every
    file the same way (an idle acquisition holds no descriptors); they reopen on demand."""

    def __init__(
        self, directory: Path, record: AcquisitionRecord, mirror: Mirror | None = None
    ) -> None:
        self.directory = Path(directory)
        self.record = record
        self.mirror = mirror
        self._files: dict[Path, PlaneFile] = {}
        self._known: list[Path] = []  # every file this writer made, open or not
        self._owners: dict[Path, tuple[int | str, int | str]] = {}
        self._lock = threading.Lock()
        self._closed: list[Path] | None = None

    def write(self, plane: np.ndarray, info: PlaneRecord) -> Path:
        """Append one restored (Y, X) plane; it is readable from disk when this returns."""
        path = output_path(self.directory, info.position, info.channel)
        plane, info = stored_plane(plane, info)  # outside the lock: other files go on meanwhile
        if info.clipped_px:
            log.warning(
                "%s: %d pixels of plane t=%d z=%d above the uint16 range were clipped",
                path.name,
                info.clipped_px,
                info.time,
                info.z,
            )
        with self._lock:
            if self._closed is not None:
                raise RuntimeError(f"{self.directory}: the writer is closed")
            owner = (info.position, info.channel)
            if self._owners.setdefault(path, owner) != owner:
                raise ValueError(
                    f"position {info.position!r} channel {info.channel!r} would share"
                    f" {path.name} with position {self._owners[path][0]!r} channel"
                    f" {self._owners[path][1]!r}"
                )
            target = self._files.get(path)
            if target is None:
                check_plane(plane)  # before a file exists for it
                self.directory.mkdir(parents=True, exist_ok=True)
                target = self._files[path] = PlaneFile(path)
                if path not in self._known:
                    self._known.append(path)
            try:
                target.append(plane, info)
            except ValueError:
                raise  # refused before a byte was written: the file is as it was
            except BaseException:  # it may hold a torn page: the next plane reopens it
                del self._files[path]
                target.release()
                raise
            if self.mirror is not None:
                self.mirror.write(path, plane, info)
        return path

    def suspend(self) -> None:
        """Close every file without finalising it; `write` and `close` reopen them."""
        with self._lock:
            for target in self._files.values():
                target.release()
            self._files.clear()

    def close(self) -> list[Path]:
        """Finalise every file (idempotent); the paths written."""
        with self._lock:
            if self._closed is None:
                errors = []
                for path in self._known:
                    if path not in self._files:
                        try:  # closed for idleness or after a failed write: continue it
                            self._files[path] = PlaneFile(path)
                        except Exception as exc:
                            errors.append(exc)
                files = list(self._files.values())
                origin = _origin(files)
                for target in files:
                    try:
                        target.close(self.record, origin)
                    except Exception as exc:  # finalise the others regardless
                        errors.append(exc)
                        target.release()
                self._closed = list(self._known)
                if self.mirror is not None:
                    try:
                        self.mirror.close(self._closed)
                    except Exception as exc:
                        errors.append(exc)
                if errors:
                    raise errors[0]
            return list(self._closed)
