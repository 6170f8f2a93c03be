"""What a job service's jobs may take of the host beyond their directories, with real jobs: a private /tmp, /var/tmp and
/dev/shm of bounded size that go with the job, a bound on all of one submitter's job directories, and outputs
counted at their apparent size before they are hashed (attack12 G3, G6)."""
from __future__ import annotations

import os
import uuid

import pytest

from services.faults import LimitExceeded
from services.jobs.store import JobSpec, JobState, StageOut
from tests.unit.jobs.test_manager import OWNER, PY, manager, shut, wait_final, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")


def test_a_jobs_tmp_and_dev_shm_are_its_own_bounded_and_gone_with_it(tmp_path):
    """A job writes /tmp, /var/tmp and /dev/shm: the host's stay untouched (during the job and after), a file past
    [jobs] tmp_size is refused (ENOSPC), and the job still has its own directory (the state directory lies under
    /tmp here)."""
    name = f"vmgrid-test-{uuid.uuid4().hex}"
    m = manager(tmp_path / "state", tmp_size=1048576)
    try:
        script = (f"import os, subprocess\n"
                  f"for d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
                  f"    open(os.path.join(d, '{name}'), 'w').write('x')\n"
                  f"os.mkfifo('/tmp/{name}.fifo')\n"
                  f"open('/tmp/{name}', 'w').write('x' * 500000)\n"
                  f"try:\n"
                  f"    open('/dev/shm/{name}.big', 'wb').write(b'x' * 2000000)\n"
                  f"    print('shm unbounded')\n"
                  f"except OSError as exc:\n"
                  f"    print('shm', exc.strerror)\n"
                  f"print('listed', sorted(os.listdir('/tmp')))\n"
                  f"open('ran', 'w').write('')\n"
                  f"import time; time.sleep(1)\n")
        job = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", script), stage_out=(StageOut("ran"),)))
        wait_until(lambda: (m.jobs_dir / job.key / "ran").exists() or m.store.get(job.key).final)
        for d in ("/tmp", "/var/tmp", "/dev/shm"):          # while it runs
            assert not os.path.exists(os.path.join(d, name)), d
        done = wait_final(m, job.key)
        out = (m.jobs_dir / job.key / "stdout").read_text()
        assert done.state == JobState.DONE, (done.failure, out, (m.jobs_dir / job.key / "stderr").read_text())
        assert "shm No space left on device" in out
        for d in ("/tmp", "/var/tmp", "/dev/shm"):          # and after
            assert not [f for f in os.listdir(d) if f.startswith(name)], d
    finally:
        shut(m)


def test_a_submitters_job_directories_are_bounded_ended_jobs_included(tmp_path):
    """[jobs] submitter_quota: an ended job keeps its directory (its outputs) for its lifetime; once a submitter's
    directories hold the quota, SubmitJob is refused (LimitExceeded naming the key) until she destroys some, and a
    running job that takes her past it is killed with the reason."""
    m = manager(tmp_path / "state", submitter_quota=200000, sweep_interval=0.2)
    try:
        write = "open('out', 'wb').write(b'x' * {n}); import time; time.sleep({t})"
        first = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", write.format(n=150000, t=0))))
        assert wait_final(m, first.key).state == JobState.DONE
        second = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", write.format(n=100000, t=60))))
        done = wait_final(m, second.key)
        assert done.state == JobState.FAILED
        assert done.failure.startswith("the submitter's job directories grew to ")
        assert done.failure.endswith("past the submitter's quota of 200000 bytes ([jobs] submitter_quota): the job "
                                     "was killed")
        with pytest.raises(LimitExceeded) as refused:
            m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", "pass")))
        assert refused.value.limit == "submitter_quota" and refused.value.allowed == "200000"
        assert "ended jobs' included" in str(refused.value)
        assert len(m.store.list()) == 2                      # nothing of the refused one
        m.destroy(OWNER, first.key)
        m.destroy(OWNER, second.key)
        assert wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", "pass"))).key).state == \
            JobState.DONE
    finally:
        shut(m)


def test_sparse_outputs_count_at_their_size_and_are_not_hashed_past_the_jobs_quota(tmp_path):
    """Two sparse outputs of (almost) the quota each cost no disk, but would be hashed (and served) at their
    size: they count at their size, the second is not hashed, and the job says why."""
    quota = 1048576
    m = manager(tmp_path / "state", staging_quota=quota, sweep_interval=60.0)
    try:
        script = f"for n in ('s1', 's2'):\n    with open(n, 'wb') as f:\n        f.truncate({quota - 1})\n"
        job = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", script),
                                      stage_out=(StageOut("s1"), StageOut("s2"))))
        done = wait_final(m, job.key)
        assert done.state == JobState.FAILED, [(o.name, o.size) for o in done.outputs]
        assert "s2 was not produced" not in done.failure, (m.jobs_dir / job.key / "stderr").read_text()
        assert [o.name for o in done.outputs] == ["stdout", "stderr", "s1"]
        assert (f"output s2 was not hashed: the outputs come to {2 * (quota - 1)} bytes, past the job's quota of "
                f"{quota} bytes ([jobs] staging_quota)") in done.failure
    finally:
        shut(m)
