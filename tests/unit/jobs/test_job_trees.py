"""What a job's directory counts and how it goes, with real jobs (attack13 H2, H4): a chain of directories deeper
than the walk goes, or more entries than [jobs] max_files, kills the job with the reason; empty files count a block
each; Destroy of a directory thousands of levels deep answers, removes it all and forgets the job; what a Destroy
moved aside counts for its submitter until it is gone; orphaned directories are removed by the sweep."""
from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from services.faults import LimitExceeded
from services.jobs import tree
from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_manager import OWNER, PY, manager, shut, wait_final, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")

# DEPTH levels of d/ made with relative mkdir+chdir (no PATH_MAX met), FILES files of SIZE bytes at the bottom,
# then 'ready' in the job's directory and a sleep
DEEP = ("import os, sys, time\n"
        "depth, files, size, nap = map(int, sys.argv[1:])\n"
        "top = os.open('.', os.O_RDONLY)\n"
        "for _ in range(depth):\n"
        "    os.mkdir('d'); os.chdir('d')\n"
        "for i in range(files):\n"
        "    open(f'f{i}', 'wb').write(b'x' * size)\n"
        "open('ready', 'w', opener=lambda p, f: os.open(p, f, dir_fd=top)).close()\n"
        "time.sleep(nap)\n")


def _deep(depth: int, files: int, size: int, nap: int) -> JobSpec:
    return JobSpec(executable=PY, arguments=("-c", DEEP, str(depth), str(files), str(size), str(nap)))


def test_a_directory_chain_deeper_than_the_walk_goes_kills_the_job_with_the_reason(tmp_path):
    """attack13 H2: 300 levels of directories, 3 MB at the bottom past a 2 MB quota: the job is killed, the reason
    says the depth (the walk's fds no longer grow with it: nothing below is left uncounted)."""
    m = manager(tmp_path / "state", staging_quota=2000000, sweep_interval=0.2)
    try:
        job = m.submit(OWNER, _deep(300, 3, 1000000, 60))
        done = wait_final(m, job.key)
        assert done.state == JobState.FAILED
        assert done.failure == (f"the job's directory has directories nested deeper than {tree.MAX_DEPTH} levels: the "
                                f"job was killed")
    finally:
        shut(m)


def test_a_walk_out_of_fds_is_a_problem_never_a_vanished_directory(tmp_path):
    """EMFILE in the middle of the walk (a process at its RLIMIT_NOFILE) makes the count a problem, whatever was
    counted above it: the job service kills the job for it instead of taking the rest for gone."""
    work = tmp_path / "work"
    deep = work
    for _ in range(40):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x" * 100000)
    script = ("import resource, sys; from services.jobs.tree import count_tree\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (30, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
              "c = count_tree(sys.argv[1], 1000)\n"
              "print(c.problem)\n")
    out = subprocess.run([sys.executable, "-c", script, str(work)], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert out.stdout.strip() == "could not be counted (Too many open files)", out
    assert tree.count_tree(work, 1000).problem is None and tree.count_tree(work, 1000).bytes >= 100000
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 30


def test_empty_files_count_a_block_each_and_max_files_bounds_a_jobs_entries(tmp_path):
    """attack13 H4: 100 empty files count 100 blocks against [jobs] staging_quota (they counted nothing); 300
    entries past [jobs] max_files = 200 kill the job with the reason."""
    m = manager(tmp_path / "state", staging_quota=300000, sweep_interval=0.2)
    try:
        job = m.submit(OWNER, _deep(0, 100, 0, 60))
        done = wait_final(m, job.key)
        assert done.state == JobState.FAILED
        assert done.failure.startswith("the job's directory grew to ")
        assert done.failure.endswith("past its quota of 300000 bytes ([jobs] staging_quota): the job was killed")
    finally:
        shut(m)
    m = manager(tmp_path / "state2", max_files=200, sweep_interval=0.2)
    try:
        job = m.submit(OWNER, _deep(0, 300, 0, 60))
        done = wait_final(m, job.key)
        assert done.state == JobState.FAILED
        assert done.failure == ("the job's directory holds more than 200 files and directories ([jobs] max_files): "
                                "the job was killed")
    finally:
        shut(m)


def test_destroy_of_a_job_thousands_of_levels_deep_removes_it_all_and_forgets_the_job(tmp_path):
    """attack13 H2: Destroy of a job whose directory is 3000 levels deep (shutil.rmtree's recursion failed there,
    InternalFault, after the record was dropped: the files stayed for good) answers, and the directory, its
    control directory and the trash are emptied; the job is gone."""
    m = manager(tmp_path / "state", sweep_interval=30)        # no sweep kills it for its depth first
    try:
        job = m.submit(OWNER, _deep(3000, 2, 1000, 0))
        done = wait_final(m, job.key)         # its final count finds it too deep (attack14: it ended Done)
        assert (done.state, done.failure) == (JobState.FAILED, f"the job's directory has directories nested deeper "
                                                               f"than {tree.MAX_DEPTH} levels")
        assert (m.jobs_dir / job.key / "ready").exists()
        m.destroy(OWNER, job.key)
        assert m.store.get(job.key) is None
        assert not (m.jobs_dir / job.key).exists()
        wait_until(lambda: not os.listdir(m.trash.path))
        assert not (m.control_dir / job.key).exists()
        assert m.submitter_bytes(OWNER) == 0
    finally:
        shut(m)


def test_a_destroyed_jobs_directory_counts_for_its_submitter_until_it_is_removed(tmp_path, held_removal):
    """attack13 H4: Destroy answers before the directory is removed (it is moved aside), and what it still holds
    counts against [jobs] submitter_quota until it is gone: a submit meanwhile is refused, one after is taken."""
    release = held_removal
    m = manager(tmp_path / "state", submitter_quota=200000, sweep_interval=30)
    try:
        job = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", "open('out', 'wb').write(b'x' * 210000)")))
        assert wait_final(m, job.key).state == JobState.DONE
        assert m.submitter_bytes(OWNER) >= 210000
        m.destroy(OWNER, job.key)                   # answered while the removal waits
        assert m.store.get(job.key) is None and not (m.jobs_dir / job.key).exists()
        assert os.listdir(m.trash.path)
        assert m.submitter_bytes(OWNER) >= 210000
        with pytest.raises(LimitExceeded):
            m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", "pass")))
        release.set()
        wait_until(lambda: not os.listdir(m.trash.path))
        assert m.submitter_bytes(OWNER) == 0
        again = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", "pass")))
        assert wait_final(m, again.key).state == JobState.DONE
    finally:
        release.set()
        shut(m)


def test_the_sweep_removes_orphaned_job_directories(tmp_path):
    """A job directory (and a control directory) of no job, deep (left by a Destroy of an earlier version that
    failed after dropping the record), is removed by the sweeps; the jobs' own are left alone."""
    m = manager(tmp_path / "state", sweep_interval=0.1)
    try:
        job = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", "print('kept')")))
        assert wait_final(m, job.key).state == JobState.DONE
        orphan, made = m.jobs_dir / "job-orphan", tmp_path / "job-orphan"
        made.mkdir()
        fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(5000):                   # deeper than PATH_MAX lets a path name
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
        os.close(fd)
        made.rename(orphan)                     # whole, then in place
        (m.control_dir / "job-orphan").mkdir()
        wait_until(lambda: not orphan.exists() and not (m.control_dir / "job-orphan").exists()
                   and not os.listdir(m.trash.path))
        assert m.tail(OWNER, m.job(OWNER, job.key), "stdout") == "kept\n"
    finally:
        shut(m)
