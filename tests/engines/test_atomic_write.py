"""The one atomic-write helper: whole files or none, never through a symbolic link."""

from __future__ import annotations

import os

import pytest

from livedecon.engines import _atomic_write as atomic_write
from livedecon.engines._atomic_write import replace_atomically, write_atomically


def test_writes_whole_and_syncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic_write.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = write_atomically(tmp_path / "a.json", '{"v": 1}')
    assert path.read_text() == '{"v": 1}'
    assert len(synced) == 2  # the file's data, then the directory's entry
    write_atomically(path, b"2", fsync=False)
    assert path.read_bytes() == b"2"
    assert len(synced) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left


def test_a_symbolic_link_in_the_way_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "out").symlink_to(victim)
    write_atomically(tmp_path / "out", "new")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "out").is_symlink()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_atomically(tmp_path / "a", "old")

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_write, "write_all", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_replace_publishes_a_finished_file(tmp_path):
    temp = tmp_path / ".x.tmp"
    temp.write_text("done")
    replace_atomically(temp, tmp_path / "x")
    assert (tmp_path / "x").read_text() == "done"
    assert not temp.exists()


def test_fsync_tree_syncs_every_file_and_folder(tmp_path, monkeypatch):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a", "d/sub/b"):
        (tmp_path / name).write_text(name)
    synced = []
    monkeypatch.setattr(atomic_write, "fsync_path", synced.append)
    atomic_write.fsync_tree(tmp_path / "d")
    names = [str(p.relative_to(tmp_path)) for p in synced]
    assert sorted(names) == ["d", "d/a", "d/sub", "d/sub/b"]
    assert names[-1] == "d"  # the directory last, after everything in it
