"""Who may do what with a job, in a real container on loopback (HTTPS, WS-Security both ways): a submitter beyond the
uid pool is refused at SubmitJob (LimitExceededFault), not accepted and then Failed."""
from __future__ import annotations

import socket

import pytest

from services.faults import LimitExceeded
from services.jobs.store import JobSpec, StageIn
from tests.integration.test_jobs_service import PY, JobGrid

pytestmark = pytest.mark.timeout(300)
LONG = JobSpec(PY, ("-c", "import time; print('started', flush=True); time.sleep(600)"))


def started(jobs, key: str) -> None:
    """Wait until the job's program runs (it holds its uid then)."""
    info = jobs.status(key)
    while info.stdout_tail != "started\n":
        assert not info.final, info.failure
        info = jobs.status(key)


def test_a_submitter_beyond_the_uid_pool_is_refused_at_submit_not_failed_later(grid_pki, tmp_path):
    """[jobs] job_uid_count = 1: alice's running job holds the one uid. The admin's submit is refused at once with
    LimitExceededFault (limit job_uid_count) saying why, and nothing is recorded; so is a second job of alice's
    while her first runs. Once her job has ended, its uid comes back to her: her next job runs; the admin is still
    refused (a uid never passes to another submitter). Without the check both submits were accepted and the jobs
    Failed (`no uid left for this job`)."""
    grid = JobGrid(grid_pki, tmp_path, job_uid_count=1)
    try:
        alice, admin = grid.client(grid_pki.alice), grid.client(grid_pki.admin)
        first = alice.submit(LONG)
        started(alice, first)
        for who, given in ((admin, "0 given to you): ask the operator"),
                           (alice, "1 given to you): submit again once one of your jobs has ended")):
            with pytest.raises(LimitExceeded) as refused:
                who.submit(JobSpec(PY, ("-c", "print('ran')")))
            message = str(refused.value)
            assert "no uid left for your job: the 1 uids of [jobs] job_uid_first = 900000, job_uid_count = 1 are " \
                   "all given or promised (1 held by running jobs" in message and given in message
            assert "\n" not in message
            assert refused.value.limit == "job_uid_count" and refused.value.allowed == "1"
        assert [j.key for j in grid.service.jobs.store.list()] == [first]        # nothing else recorded
        alice.cancel(first)
        assert alice.wait(first, timeout=60).state == "Cancelled"
        again = alice.submit(JobSpec(PY, ("-c", "print('ran')")))
        info = alice.wait(again, timeout=120)
        assert (info.state, info.stdout_tail) == ("Done", "ran\n")
        with pytest.raises(LimitExceeded, match="no uid left for your job"):
            admin.submit(JobSpec("true"))
    finally:
        grid.close()


def test_a_job_waiting_to_start_keeps_its_uid_promised(grid_pki, tmp_path):
    """A job accepted but not started yet (staging in) has a uid promised: with two uids, alice's running job and
    her pending one take both, and the admin is refused at submit rather than his job failing later."""
    grid = JobGrid(grid_pki, tmp_path, job_uid_count=2)
    try:
        alice, admin = grid.client(grid_pki.alice), grid.client(grid_pki.admin)
        running = alice.submit(LONG)
        started(alice, running)
        # a second job of hers, held before its program starts: its stage-in from an ftp:// server that never answers
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        try:
            waiting = alice.submit(JobSpec("true", stage_in=(
                StageIn(f"ftp://127.0.0.1:{silent.getsockname()[1]}/x", "x"),)))
            assert alice.status(waiting).state in ("Pending", "StageIn")
            with pytest.raises(LimitExceeded, match=r"1 promised to jobs not started yet"):
                admin.submit(JobSpec("true"))
        finally:
            silent.close()
    finally:
        grid.close()
