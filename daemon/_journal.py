"""What the daemon promised, on disk: the record of each acquisition and its acknowledged frames.

Layout of one acquisition's output directory:

    acquisition.json   the plan, the model that serves it, pixel sizes and units (at start)
    acked.jsonl        one line per acknowledged frame, appended before the ack is sent
    restored_*.ome.tif the restored planes (daemon/_writer.py)

After a crash, acknowledged minus written is exactly what `livedecon reprocess` must recreate.
A line is written whole before its frame is acknowledged (a short write is continued; a failed
one is cut off again and the frame refused), so a kill leaves at most a torn last line, which
is ignored (its frame was never acknowledged).

Durability (the fsync policy): once `append` returns, the line is in the operating system, so
a killed or crashed daemon cannot lose it. It reaches the disk itself within
`storage.journal_fsync_s` (a background fsync; default 1 s) and at the acquisition's end or
idle close; with `journal_fsync_s = 0` every line is fsynced before its frame is acknowledged
(safe against power loss, at the cost of a disk flush per frame). A power cut can therefore
forget at most the last second of acknowledgements, whose frames the raw data still holds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livedecon.daemon._daemon_config import Correction
from livedecon.daemon._protocol import Axes, Plan
from livedecon.engines._atomic_write import SAFE_OPEN_FLAGS, write_all, write_atomically

ACQUISITION_FILE = "acquisition.json"
JOURNAL_FILE = "acked.jsonl"


_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_INTEGER = re.compile(r"-?[0-9]+")
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10)]
)
MAX_NAME = 100  # characters of a name; longer ones end in '~' and a hash of the whole name


def safe_name(name: int | str) -> str:
    """`name` (an acquisition id, a position or channel) as one file-name component.

    Injective, and never a path: letters, digits, '-', '_' and '.' stay as they are (a leading
    or trailing '.' does not), every other character becomes '%XX' per UTF-8 byte, so the
    result is never empty, '.', '..', hidden, or holds a separator. An integer is its digits; a
    string that reads as an integer, or as a Windows device name (CON, NUL, COM1, ...), gets its
    first character escaped, so channel 0 and channel "0" differ; the empty string is '%'. A
    result longer than MAX_NAME is cut and ends in '~' plus a hash of the whole name ('~'
    appears nowhere else). Only case can make two names meet, on a case-insensitive file
    system; the daemon refuses such pairs within an acquisition.
    """
    if isinstance(name, bool) or not isinstance(name, int | str):
        raise TypeError(f"a name is an int or a str, not {type(name).__name__}")
    if isinstance(name, int):
        return str(name)
    if not name:
        return "%"
    parts = []
    for i, char in enumerate(name):
        if char in _PLAIN and not (i == 0 and char == "."):
            parts.append(char)
        else:
            parts.extend(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))
    text = "".join(parts)
    if _INTEGER.fullmatch(text) or text.split(".")[0].upper() in _WINDOWS_DEVICES:
        text = f"%{ord(text[0]):02X}{text[1:]}"
    if text.endswith("."):  # Windows drops a trailing dot: "a." would be "a"
        text = text[:-1] + "%2E"
    if len(text) > MAX_NAME:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:20]
        text = f"{text[: MAX_NAME - 21]}~{digest}"
    return text


def is_plain(name: str) -> bool:
    """`name` is a harmless file-name component as it stands (a directory a person named):
    letters, digits, '-', '_', '.', not hidden, not too long."""
    return (
        0 < len(name) <= MAX_NAME
        and name[0] != "."
        and name[-1] != "."
        and all(c in _PLAIN for c in name)
        and name.split(".")[0].upper() not in _WINDOWS_DEVICES
    )


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AcquisitionRecord(_Record):
    """acquisition.json: what produced an acquisition's output (plan, model, units, corrections)."""

    acquisition_id: str
    plan: Plan
    processor: Literal["model", "pass-through", "sim"]
    bundle_path: str | None = Field(description="bundle directory (None: pass-through)")
    bundle_id: str
    weights_version: int
    backend: str
    input_pixel_um: float
    output_pixel_um: float
    units: str = Field(description="what an output pixel value means")
    finishing: str | None = Field(
        None,
        description="what ran after the network, e.g. Richardson-Lucy steps ('': nothing;"
        " None: recorded before the daemon said)",
    )
    spill_dir: str | None = Field(None, description="where the daemon spilled this acquisition")
    correction: Correction | None = Field(None, description="input corrections applied")
    ome_zarr: bool = Field(False, description="an OME-Zarr image beside each OME-TIFF file")
    isotropic_bundle_path: str | None = Field(
        None, description="the Self-Net bundle chained after the 3D model (None: no chain)"
    )
    output_z_count: int | None = Field(None, description="planes per restored stack (3d)")
    output_z_step_um: float | None = Field(None, description="z step of the restored stacks")
    started_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def stack_depth(self) -> int | None:
        """Planes per restored stack as written (3d; a Self-Net chain writes more)."""
        return self.output_z_count or self.plan.z_count

    @property
    def stack_z_step_um(self) -> float | None:
        """The z step of the restored stacks as written."""
        return self.output_z_step_um or self.plan.z_step_um


class JournalEntry(_Record):
    """One line of the journal: an acknowledged frame's id, axes, dtype, shape and time."""

    frame_id: int
    axes: Axes
    dtype: str
    shape: tuple[int, ...]
    timestamp_s: float | None = None


def write_acquisition_record(directory: Path, record: AcquisitionRecord) -> Path:
    """Write acquisition.json atomically (a reader sees the old file or the whole new one);
    a symbolic link in the way is replaced, never followed."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_atomically(directory / ACQUISITION_FILE, record.model_dump_json(indent=2))


def read_acquisition_record(directory: Path) -> AcquisitionRecord:
    """The acquisition record of an output directory; refused when missing or invalid."""
    path = Path(directory) / ACQUISITION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {ACQUISITION_FILE}; not a livedecon output")
    try:
        return AcquisitionRecord.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise ValueError(
            f"{path}: not a valid acquisition record ({exc.errors()[0]['msg']})"
        ) from None


class Journal:
    """Appends one line per acknowledged frame (see the module doc for the fsync policy)."""

    def __init__(self, directory: Path, fsync_s: float = 1.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | SAFE_OPEN_FLAGS
        self._fd = os.open(directory / JOURNAL_FILE, flags, 0o644)
        self._size = os.fstat(self._fd).st_size
        self.fsync_s = fsync_s
        self.broken: str | None = None  # why no line can be appended any more
        self._last = 0  # length of the line appended last
        self._dirty = False
        self._lock = threading.Lock()  # `sync` (another thread) against `close`

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def append(self, entry: JournalEntry) -> None:
        """Write the whole line, or raise OSError having left the journal as it was."""
        if self.broken is not None:
            raise OSError(errno.EIO, self.broken)
        line = entry.model_dump_json(exclude_none=True).encode() + b"\n"
        try:
            write_all(self._fd, line)
            if self.fsync_s == 0:
                os.fsync(self._fd)
        except OSError as exc:
            try:  # a torn line must not glue itself to the next one
                os.ftruncate(self._fd, self._size)
            except OSError as again:
                self.broken = f"the journal could not be repaired after a failed write ({again})"
            raise exc from None
        self._last = len(line)
        self._size += len(line)
        self._dirty = True

    def retract(self) -> None:
        """Take back the line just appended (its frame was refused after all)."""
        if self._last:
            try:
                os.ftruncate(self._fd, self._size - self._last)
                self._size -= self._last
            except OSError as exc:
                self.broken = f"a refused frame's line could not be taken back ({exc})"
            self._last = 0

    def sync(self) -> None:
        """fsync what was appended since the last sync (from any thread)."""
        with self._lock:
            if self._fd < 0 or not self._dirty:
                return
            self._dirty = False
            fd = os.dup(self._fd)  # fsync outside the lock: appends never wait for the disk
        try:
            os.fsync(fd)
        except OSError:
            self._dirty = True
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):  # the lines are in the OS at least
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1


def read_journal(directory: Path) -> list[JournalEntry]:
    """The acknowledged frames of an acquisition, in order; a torn last line is skipped."""
    path = Path(directory) / JOURNAL_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_bytes().splitlines():
        try:
            entries.append(JournalEntry.model_validate(json.loads(line)))
        except (ValueError, ValidationError):
            continue  # only a kill mid-write makes one; that frame was not acknowledged
    return entries
