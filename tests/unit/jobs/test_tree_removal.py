"""Locking and removing a job's tree (services/jobs/files.py seal_walk, services/jobs/tree.py remove_tree): every
directory made root's 0700 before it is listed, whatever the depth (past the levels whose fds are kept too), no
link followed; a wide tree removed in one listing per directory (attack14 H3: 20,000 empty directories took the
old remover over a minute, re-listing the directory after each)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from services.jobs import tree
from services.jobs.files import DIR_FLAGS, lock, seal_walk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root (it chowns to root)")
UID = 65534      # nobody: a job's uid stands for it


def _chain(top: Path, depth: int, wide: int) -> list[Path]:
    """``depth`` levels of d/ under ``top``, each level with ``wide`` empty sub-directories, a file and a link to
    ``outside`` beside; everything owned by UID, 0777. The directories."""
    top.mkdir()
    made, here = [top], top
    for level in range(depth):
        for i in range(wide):
            (here / f"w{i}").mkdir()
            made.append(here / f"w{i}")
        (here / "f").write_text(str(level))
        os.chown(here / "f", UID, UID)
        (here / "link").symlink_to(top.parent / "outside")
        here = here / "d"
        here.mkdir()
        made.append(here)
    for d in made:
        os.chown(d, UID, UID)
        os.chmod(d, 0o777)
    return made


@pytest.mark.parametrize("max_depth", [3, 256])
def test_the_lock_makes_every_directory_roots_0700_past_the_kept_fds_and_follows_no_link(tmp_path, max_depth):
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    os.chown(outside, UID, UID)
    made = _chain(tmp_path / "job", 12, 3)
    fd = os.open(tmp_path / "job", DIR_FLAGS)
    try:
        seal_walk(fd, max_depth=max_depth)
    finally:
        os.close(fd)
    for d in made:
        st = os.stat(d)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700), d
    st = os.stat(made[0] / "f")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (UID, 0o644)          # files keep their owner and mode
    st = os.stat(outside)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (UID, 0o755)          # a link's target untouched
    assert os.listdir(outside) == []
    lock(tmp_path / "missing")                                           # nothing to lock: nothing done


@pytest.mark.parametrize("max_depth", [3, 256])
def test_remove_tree_removes_a_deep_and_wide_tree_and_nothing_a_link_names(tmp_path, monkeypatch, max_depth):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    _chain(tmp_path / "job", 12, 5)
    real = tree.seal_walk
    monkeypatch.setattr(tree, "seal_walk", lambda fd, remove: real(fd, remove=remove, max_depth=max_depth))
    tree.remove_tree(tmp_path / "job")
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert (outside / "keep").read_text() == "kept"
    tree.remove_tree(tmp_path / "job")                                   # missing: nothing to do


def test_a_directory_of_10000_empty_directories_is_removed_whole(tmp_path):
    """attack14 H3 (1): each directory is listed once (the old remover listed it again after each sub-directory)."""
    top = tmp_path / "job"
    top.mkdir()
    fd = os.open(top, DIR_FLAGS)
    try:
        for i in range(10000):
            os.mkdir(f"d{i}", dir_fd=fd)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    tree.remove_tree(top)
    assert os.listdir(tmp_path) == []
