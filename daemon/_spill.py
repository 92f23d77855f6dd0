"""Frames that wait on disk instead of in memory when the engine falls behind.

One frame is two files under <spill_dir>/<acquisition_id>/: `<frame_id>.raw` (the pixels as
sent) then `<frame_id>.json` (its header), each renamed into place, the header last, so a
header on disk always has its whole payload. A spilled frame is removed only once its restored
plane is written; `livedecon reprocess` restores the ones a crash left behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from livedecon.daemon._journal import safe_name
from livedecon.daemon._protocol import DTYPES, Header
from livedecon.engines._atomic_write import write_atomically


class SpillStore:
    """Frames parked on disk under `root`, one folder per acquisition (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def directory(self, acquisition_id: str) -> Path:
        return self.root / safe_name(acquisition_id)

    def put(self, header: Header, pixels: np.ndarray) -> Path:
        """Write one frame; returns the path of its header (the handle for `load`/`remove`)."""
        folder = self.directory(header.acquisition_id or "")
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"{header.frame_id:012d}"
        for suffix, data in (
            (".raw", np.ascontiguousarray(pixels).data.cast("B")),
            (".json", header.model_dump_json(exclude={"shm"}).encode()),
        ):
            try:  # whole, never through a symbolic link; on disk by the journal's fsync policy
                write_atomically(stem.with_suffix(suffix), data, fsync=False)
            except OSError:
                stem.with_suffix(".raw").unlink(missing_ok=True)
                raise
        return stem.with_suffix(".json")

    @staticmethod
    def load(path: Path) -> tuple[Header, np.ndarray]:
        header = Header.model_validate_json(path.read_bytes())
        raw = path.with_suffix(".raw").read_bytes()
        pixels = np.frombuffer(raw, dtype=DTYPES[header.dtype or ""]).reshape(header.shape or ())
        return header, pixels

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_suffix(".raw").unlink(missing_ok=True)

    def frames(self, acquisition_id: str) -> Iterator[tuple[Path, Header, np.ndarray]]:
        """Every complete spilled frame of an acquisition, in frame order."""
        folder = self.directory(acquisition_id)
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            header, pixels = self.load(path)
            yield path, header, pixels
