"""Where the daemon may write, and whether there is room: the output root's containment and the
free-space reserve that an acknowledgement promises to respect."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from livedecon.daemon._journal import is_plain
from livedecon.daemon._protocol import ErrorCode, ProtocolError

REFRESH_BYTES = 64 * 2**20  # measure again once this much was promised since the last look


def sub_path(output_dir: str | None) -> list[str]:
    """The components of a client's `Plan.output_dir`: a relative path of plain names, or
    ProtocolError(outside_root). The daemon, not the client, decides where its root is."""
    if output_dir is None or output_dir in ("", "."):
        return []
    text = output_dir.removesuffix("/")
    parts = text.split("/")
    if (
        text.startswith(("/", "\\", "~"))
        or PureWindowsPath(text).drive
        or "\\" in text
        or any(part in ("", ".", "..") or not is_plain(part) for part in parts)
    ):
        raise ProtocolError(
            ErrorCode.OUTSIDE_ROOT,
            f"output_dir {output_dir[:80]!r} must be a relative path inside the daemon's output"
            " directory, of names made of letters, digits, '-', '_' and '.' (no '..', no"
            " absolute path); omit it to write in the output directory itself",
        )
    return parts


def contained(root: Path, path: Path) -> Path:
    """`path` (under `root`, a resolved directory) as it resolves on disk, or
    ProtocolError(outside_root) when a symbolic link on the way leads out of `root`. Parts that
    do not exist yet are fine: they will be created inside."""
    real = path.resolve()
    if real != root and not real.is_relative_to(root):
        raise ProtocolError(
            ErrorCode.OUTSIDE_ROOT,
            f"{path.relative_to(root) if path.is_relative_to(root) else path} leads outside"
            " the daemon's output directory through a symbolic link; it is not followed",
        )
    return real


@dataclass
class _Look:
    at: float  # monotonic time of the statvfs
    free: int  # bytes available to us then
    promised: int = 0  # bytes acknowledged since


class FreeSpace:
    """Free bytes above a reserve on the file systems the daemon writes to, cheaply: statvfs at
    most every `interval_s` (or every REFRESH_BYTES promised) per directory; in between, the
    bytes promised since are subtracted from what it said. `pending()` is what was promised
    and is not on disk yet (acknowledged planes still queued for the writer): statvfs cannot
    see those, so each look subtracts them too."""

    def __init__(
        self, reserve_bytes: int, interval_s: float, pending: Callable[[], int] = lambda: 0
    ) -> None:
        self.reserve, self.interval_s, self.pending = reserve_bytes, interval_s, pending
        self._looks: dict[Path, _Look] = {}

    def _look(self, directory: Path) -> _Look:
        probe = directory
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent  # not created yet: its file system is its parent's
        free = shutil.disk_usage(probe).free  # statvfs f_bavail (what we may use) on POSIX
        look = _Look(time.monotonic(), free - self.pending())
        self._looks[directory] = look
        return look

    def available(self, directory: Path) -> int:
        """Bytes that may still be promised on `directory`'s file system (may be negative)."""
        look = self._looks.get(directory)
        if (
            look is None
            or time.monotonic() - look.at >= self.interval_s
            or look.promised >= REFRESH_BYTES
        ):
            look = self._look(directory)
        return look.free - look.promised - self.reserve

    def promise(self, directory: Path, nbytes: int, what: str) -> None:
        """Reserve `nbytes` on `directory`'s file system, or ProtocolError(disk_full)."""
        if self.available(directory) < nbytes:
            look = self._look(directory)  # a fresh look before refusing: space may be back
            if look.free - self.reserve < nbytes:
                raise ProtocolError(
                    ErrorCode.DISK_FULL,
                    f"{what} refused: {max(look.free, 0) / 2**20:.0f} MB free where the daemon"
                    f" writes ({directory}; queued planes counted), and"
                    f" {self.reserve / 2**20:.0f} MB are kept in reserve."
                    " Free some space: the daemon accepts frames again by itself (the raw data"
                    " is not affected)",
                )
        self._looks[directory].promised += nbytes
