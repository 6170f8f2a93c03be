"""An ended job's directory is locked whole and counted once more at its end (attack14 H1, Observation a): a job
of the same submitter that opened a sub-directory of it earlier writes nothing there after its end, and a job whose
directory ended past its quota before a sweep saw it ends Failed, not Done. Real jobs under job uids."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from services.jobs import tree
from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_manager import OWNER, PY, manager, shut, wait_final, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")

# job A: a sub-directory any uid may write, its top passable; it ends when the test says so
JOB_A = ("import os, time\n"
         "os.mkdir('sub'); os.chmod('sub', 0o777); os.chmod('.', 0o711)\n"
         "open('sub/a.txt', 'w').write('from A')\n"
         "open('ready', 'w').close()\n"
         "while not os.path.exists('end'): time.sleep(0.05)\n")
# job B (the same submitter, a uid of its own): holds an fd of A's sub-directory, and tries to write through it
JOB_B = ("import os, sys, time\n"
         "d = os.open(f'../{sys.argv[1]}/sub', os.O_RDONLY | os.O_DIRECTORY)\n"
         "open('held', 'w').close()\n"
         "while not os.path.exists('try'): time.sleep(0.05)\n"
         "for what, do in (('create', lambda: os.close(os.open('x', os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=d))),\n"
         "                 ('mkdir', lambda: os.mkdir('y', dir_fd=d)),\n"
         "                 ('rename', lambda: os.rename('a.txt', 'b.txt', src_dir_fd=d, dst_dir_fd=d))):\n"
         "    try:\n"
         "        do(); print(what, 'done', flush=True)\n"
         "    except OSError as e:\n"
         "        print(what, 'refused', e.errno, flush=True)\n"
         "open('tried', 'w').close()\n"
         "time.sleep(120)\n")


def test_a_job_writes_nothing_into_an_ended_jobs_directory_through_a_directory_fd_it_held(tmp_path):
    """attack14 H1: job A makes a 0777 sub-directory; job B of the same submitter opens it while A runs; after A's
    end B's create, mkdir and rename through that fd are refused (EACCES), and A's count is what it was at its
    end. (Only A's top was locked: B wrote on, counted for nobody.)"""
    m = manager(tmp_path / "state", sweep_interval=0.2)
    try:
        a = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", JOB_A)))
        wait_until(lambda: (m.jobs_dir / a.key / "ready").exists())
        b = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", JOB_B, a.key)))
        wait_until(lambda: (m.jobs_dir / b.key / "held").exists())
        (m.jobs_dir / a.key / "end").touch()
        assert wait_final(m, a.key).state == JobState.DONE
        at_end = m.counts.get(a.key, m.jobs_dir / a.key, final=True)
        (m.jobs_dir / b.key / "try").touch()
        wait_until(lambda: (m.jobs_dir / b.key / "tried").exists())
        said = m.tail(OWNER, m.job(OWNER, b.key), "stdout").split("\n")
        assert said[:3] == [f"create refused {errno.EACCES}", f"mkdir refused {errno.EACCES}",
                            f"rename refused {errno.EACCES}"], said
        assert sorted(os.listdir(m.jobs_dir / a.key / "sub")) == ["a.txt"]
        assert tree.count_tree(m.jobs_dir / a.key, 1000) == at_end
        for d in (m.jobs_dir / a.key, m.jobs_dir / a.key / "sub"):
            st = os.stat(d)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)
        st = os.stat(m.jobs_dir / a.key / "sub" / "a.txt")           # an output stays the job's, as it left it
        assert st.st_uid == m.store.job_uid(a.key) or st.st_uid >= 1000
    finally:
        (m.jobs_dir / a.key / "end").touch()
        shut(m)


def test_a_job_whose_directory_ended_past_its_quota_before_a_sweep_saw_it_ends_failed(tmp_path):
    """attack14 Observation (a): a program that writes 3 MB past a 2 MB staging_quota (in two files under the
    per-file bound) and ends before any sweep counts it ends Failed naming the quota, not Done."""
    m = manager(tmp_path / "state", staging_quota=2000000, sweep_interval=3600)
    try:
        job = m.submit(OWNER, JobSpec(executable=PY, arguments=(
            "-c", "for i in range(2): open(f'f{i}', 'wb').write(b'x' * 1500000)")))
        done = wait_final(m, job.key)
        assert done.state == JobState.FAILED, done
        assert done.failure.startswith("the job's directory holds 30")
        assert done.failure.endswith("bytes, past its quota of 2000000 bytes ([jobs] staging_quota)")
        assert {o.name for o in done.outputs} >= {"stdout", "stderr"}        # what it wrote stays fetchable
    finally:
        shut(m)
