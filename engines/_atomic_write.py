"""Atomic file writes, the one way livedecon publishes a file or a directory.

A reader sees the old file or the whole new one, never a part: the data go to a temporary
file in the same directory (same file system, so the rename is atomic), reach the disk
(fsync), are renamed over the target, and the rename itself reaches the disk (fsync of the
directory). Temporary files are created afresh and never through a symbolic link; one in the
way of the target is replaced, not followed.

It lives in engines, the lowest layer that writes files this way (bundles, the artifact cache,
TensorRT plans); the daemon (journal, spill, reprocess, batch records) uses it from here.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

# open() flags of every file livedecon creates: never through a symbolic link, not inherited
SAFE_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """`os.write` until every byte is written; OSError when the system takes none."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, "the file system took no more bytes")
        view = view[written:]


def write_file(path: Path, data: bytes | memoryview, fsync: bool = False) -> None:
    """Create or truncate `path` (never through a symbolic link) and write all of `data`;
    with `fsync`, the data are on disk when it returns."""
    if os.path.islink(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | SAFE_OPEN_FLAGS, 0o644)
    try:
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory, best effort: Windows cannot open or sync a directory, and
    a rename stays atomic without it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under `directory`, then the directory itself: a staged
    directory reaches the disk whole before it is renamed into place."""
    for folder, _, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def temporary_path(path: Path) -> Path:
    """A fresh name beside `path` for its temporary file (hidden, unique per writer)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def replace_atomically(temp: Path, path: Path, fsync: bool = True) -> Path:
    """Publish the finished file (or directory) `temp` as `path`: `temp` reaches the disk
    before the rename, and the rename reaches it after (`fsync`)."""
    if fsync:
        fsync_path(temp)  # the rename must not reach the disk before the data
    os.replace(temp, path)
    if fsync:
        fsync_path(path.parent)  # and the rename itself reaches the disk
    return path


def write_atomically(path: Path, data: bytes | memoryview | str, fsync: bool = True) -> Path:
    """Write `data` to `path` atomically (see the module doc); returns `path`.

    `fsync=False` keeps the atomicity but leaves the timing of the disk to the caller's own
    durability policy (the spill follows the journal's)."""
    path = Path(path)
    temp = temporary_path(path)
    try:
        write_file(temp, data.encode() if isinstance(data, str) else data, fsync=fsync)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_path(path.parent)  # the rename itself reaches the disk
    return path
