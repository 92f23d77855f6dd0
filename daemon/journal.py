"""What the daemon promised, on disk: the record of each acquisition and its acknowledged frames.

Layout of one acquisition's output directory:

    acquisition.json   the plan, the model that serves it, pixel sizes and units (at start)
    acked.jsonl        one line per acknowledged frame, appended before the ack is sent
    restored_*.ome.tif the restored planes (daemon/writer.py)

After a crash, acknowledged minus written is exactly what `livedecon reprocess` must recreate.
A line is written with one `write` call, so a kill leaves at most a torn last line, which is
ignored (its frame was never acknowledged).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livedecon.daemon.config import Correction
from livedecon.daemon.protocol import Axes, Plan

ACQUISITION_FILE = "acquisition.json"
JOURNAL_FILE = "acked.jsonl"


def safe_name(name: int | str) -> str:
    """`name` (an acquisition id, a position or channel) as a file or directory name."""
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in str(name))


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AcquisitionRecord(_Record):
    acquisition_id: str
    plan: Plan
    processor: Literal["model", "pass-through"]
    bundle_path: str | None = Field(description="bundle directory (None: pass-through)")
    bundle_id: str
    weights_version: int
    backend: str
    input_pixel_um: float
    output_pixel_um: float
    units: str = Field(description="what an output pixel value means")
    spill_dir: str | None = Field(None, description="where the daemon spilled this acquisition")
    correction: Correction | None = Field(None, description="input corrections applied")
    started_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


class JournalEntry(_Record):
    frame_id: int
    axes: Axes
    dtype: str
    shape: tuple[int, ...]
    timestamp_s: float | None = None


def write_acquisition_record(directory: Path, record: AcquisitionRecord) -> Path:
    """Write acquisition.json atomically (a reader sees the old file or the whole new one)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ACQUISITION_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(record.model_dump_json(indent=2))
    os.replace(tmp, path)
    return path


def read_acquisition_record(directory: Path) -> AcquisitionRecord:
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
    """Appends one line per acknowledged frame; the OS holds it once `append` returns, so a
    killed daemon does not lose it (power loss is what the raw data on disk is for)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(directory / JOURNAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, entry: JournalEntry) -> None:
        os.write(self._fd, entry.model_dump_json(exclude_none=True).encode() + b"\n")

    def close(self) -> None:
        if self._fd >= 0:
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
