"""A job's directory as the job service's GridFTP face and its quota walk see it: every path walked from the job
directory's fd through no symbolic link, and the file found then is the one used, whatever takes its name."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from gridftp.errors import PathError
from services.jobs.tree import BLOCK, count_tree
from services.jobs.staging import JobFileSpace, PinnedPath

KEY = "job-" + "ab" * 16


@pytest.fixture
def space(tmp_path):
    jobs, outside = tmp_path / "jobs", tmp_path / "outside"
    (jobs / KEY / "d").mkdir(parents=True)
    (jobs / KEY / "d" / "out.txt").write_text("inside\n")
    outside.mkdir()
    (outside / "out.txt").write_text("SECRET\n")
    return JobFileSpace(jobs, tmp_path / "staging"), jobs / KEY, outside


def test_the_file_found_is_the_file_read_whatever_the_job_swaps_in_afterwards(space):
    files, work, outside = space
    real = files.real_path(f"/jobs/{KEY}/d/out.txt")
    listed = files.real_path(f"/jobs/{KEY}/d")
    assert isinstance(real, PinnedPath)
    os.rename(work / "d", work / "d.old")            # what a job does between the face's look and its open
    os.symlink(outside, work / "d")
    assert Path(real).read_text() == "inside\n" and os.stat(real).st_size == 7
    assert os.listdir(listed) == ["out.txt"] and os.stat(listed / "out.txt").st_size == 7
    for vpath in (f"/jobs/{KEY}/d/out.txt", f"/jobs/{KEY}/d"):        # looked up now: the link is refused
        with pytest.raises(PathError, match="not served"):
            files.real_path(vpath)


def test_a_link_is_never_served_nor_listed_and_a_missing_file_is_missing(space):
    files, work, outside = space
    os.symlink(outside / "out.txt", work / "d" / "link.txt")
    with pytest.raises(PathError, match="not served"):
        files.real_path(f"/jobs/{KEY}/d/link.txt")
    with pytest.raises(OSError):
        files.real_path(f"/jobs/{KEY}/d") / "link.txt"             # the listing leaves it out
    with pytest.raises(PathError, match="no such file or directory"):
        files.real_path(f"/jobs/{KEY}/d/none.txt")
    with pytest.raises(PathError, match="no such file or directory"):
        files.real_path("/jobs/job-" + "00" * 16 + "/x")


def test_a_pinned_file_is_closed_with_its_last_reference(space):
    files, _, _ = space
    real = files.real_path(f"/jobs/{KEY}/d/out.txt")
    fd = real.fd
    assert os.readlink(f"/proc/self/fd/{fd}").endswith("/d/out.txt")
    del real
    with pytest.raises(OSError):
        os.fstat(fd)


def test_the_quota_walk_counts_the_jobs_files_only_and_follows_no_link(tmp_path):
    work = tmp_path / "work"
    (work / "a" / "b").mkdir(parents=True)
    (work / "a" / "b" / "f").write_bytes(b"x" * 65536)
    os.symlink("/usr", work / "usr")                 # a link to a large tree: counted as one entry, one block
    count = count_tree(work, 100)
    assert count.bytes == (work / "a" / "b" / "f").stat().st_blocks * 512 + 3 * BLOCK    # a, b and the link
    assert (count.entries, count.problem) == (4, None)
    gone = count_tree(tmp_path / "gone", 100)
    assert (gone.bytes, gone.entries, gone.problem) == (0, 0, None)
