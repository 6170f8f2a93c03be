"""Who may do what with a job, in a real container on loopback (HTTPS, WS-Security both ways): a submitter beyond the
uid pool is refused at SubmitJob (LimitExceededFault), not accepted and then Failed; Cancel, Destroy and
SetTerminationTime of a job are its submitter's and the VO's admins' (the rule the output tails follow), not the
instance owner's on an admin's job; the service's GridFTP face turns a guest container's certificate away at login."""
from __future__ import annotations

import socket

import pytest

from gridftp.errors import GridFTPError
from services.faults import AccessDenied, LimitExceeded
from services.jobs.store import JobSpec, StageIn, StageOut
from services.jobs.wire import JOB
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


@pytest.mark.parametrize("operation", ["cancel", "destroy", "set_lifetime"])
def test_a_jobs_cancel_destroy_and_lifetime_are_its_submitters_and_the_admins(grid_pki, tmp_path, operation):
    """The instance's owner may not cancel, destroy or set the lifetime of an admin's job (AccessDeniedFault, rule
    job-submitter-or-vo-admin), as she reads none of its output; the admin who submitted it may, and so may another
    admin on the owner's job and on the admin's. Without the rule alice cancelled, destroyed or cut short the
    admin's job."""
    grid = JobGrid(grid_pki, tmp_path)
    try:
        alice, admin = grid.client(grid_pki.alice), grid.client(grid_pki.admin)
        act = {"cancel": lambda jobs, key: jobs.cancel(key), "destroy": lambda jobs, key: jobs.destroy(key),
               "set_lifetime": lambda jobs, key: jobs.set_lifetime(key, 3600)}[operation]
        his = admin.submit(LONG)
        started(admin, his)
        before = grid.service.jobs.store.get(his)
        with pytest.raises(AccessDenied) as refused:
            act(alice, his)
        assert refused.value.rule == "job-submitter-or-vo-admin" and (
            "only the job's submitter and this job service's admins may ([jobs] admins; in a guest, the [vmmanager] "
            "job_admins of the node that deployed it)") in str(refused.value)
        after = grid.service.jobs.store.get(his)
        assert (after.state.value, after.termination, after.cancel_requested) == \
            (before.state.value, before.termination, False)                    # nothing changed
        assert [el.text for el in alice.property(his, f"{{{JOB}}}State")] == ["Active"]   # she still sees it
        act(admin, his)                                      # the submitter may
        hers = alice.submit(LONG)
        started(alice, hers)
        act(alice, hers)                                     # and the owner on her own job
        hers2 = alice.submit(LONG)
        started(alice, hers2)
        act(admin, hers2)                                    # an admin on the owner's job
        if operation == "destroy":
            assert grid.service.jobs.store.get(his) is None and grid.service.jobs.store.get(hers2) is None
        elif operation == "cancel":
            assert alice.wait(hers2, timeout=60).state == "Cancelled"
            assert admin.wait(his, timeout=60).state == "Cancelled"
        else:
            assert grid.service.jobs.store.get(his).termination != before.termination
        for key in (his, hers, hers2):
            if grid.service.jobs.store.get(key) is not None:
                admin.destroy(key)
    finally:
        grid.close()


def test_the_job_services_gridftp_face_refuses_a_guests_login(grid_pki, tmp_path):
    """A guest container's certificate (as a node issues it) has no rights on the job service's face (no submitter
    is a guest: the owner and the admins are people), yet it logged in and took a user's session: now it is turned
    away at login with 530. The owner still logs in and fetches her job's output."""
    from gridftp import download

    grid = JobGrid(grid_pki, tmp_path)
    try:
        alice = grid.client(grid_pki.alice)
        key = alice.submit(JobSpec(PY, ("-c", "print('hers')")))
        info = alice.wait(key, timeout=120)
        guest = grid_pki.issue_guest("10.99.0.17")
        with pytest.raises(GridFTPError, match="530 /O=Grid/OU=vmgrid-guests/CN=host/10.99.0.17 is a guest "
                                               "container's certificate: guests have no rights on this server."):
            download(f"{info.directory_url}stdout", tmp_path / "taken", 1, credential=guest, trust=grid_pki.trust(),
                     retries=0)
        assert not (tmp_path / "taken").exists()
        download(f"{info.directory_url}stdout", tmp_path / "stdout", 1, credential=grid_pki.alice.proxy,
                 trust=grid_pki.trust())
        assert (tmp_path / "stdout").read_text() == "hers\n"
    finally:
        grid.close()


def test_the_vo_admins_fetch_a_jobs_files_over_the_face_read_only_and_nobody_else(grid_pki, tmp_path):
    """A VO admin read a job's output tails (StdoutTail) but was refused its files on the job service's GridFTP face
    (550: the face let the job's submitter alone read /jobs/<key>/). Now the face follows the rule of the tails,
    Cancel and Destroy (job-submitter-or-vo-admin): the admin fetches alice's job's outputs, verified against the
    sha256 the service recorded, but writes nothing into the job's directory; bob (no user of the service) reads
    nothing, nor does the instance's owner read an admin's job. Fails without the fix: the admin's fetch was 550."""
    from gridftp import download, upload

    grid = JobGrid(grid_pki, tmp_path)
    try:
        alice, admin = grid.client(grid_pki.alice), grid.client(grid_pki.admin)
        hers = alice.submit(JobSpec(PY, ("-c", "open('result.txt', 'w').write('hers\\n'); print('out')"),
                                    stage_out=(StageOut("result.txt"),)))
        info = admin.wait(hers, timeout=120)
        assert (info.state, info.stdout_tail) == ("Done", "out\n")
        fetched = admin.fetch_outputs(info, tmp_path / "admin")
        assert {p.name: p.read_text() for p in fetched} == {"stdout": "out\n", "stderr": "", "result.txt": "hers\n"}
        planted = tmp_path / "planted"
        planted.write_text("not hers\n")
        with pytest.raises(GridFTPError, match="550"):
            upload(planted, f"{info.directory_url}planted", 1, credential=grid_pki.admin.proxy,
                   trust=grid_pki.trust(), retries=0)
        assert not (grid.service.jobs.jobs_dir / hers / "planted").exists()
        with pytest.raises(GridFTPError):
            download(f"{info.directory_url}result.txt", tmp_path / "bob", 1, credential=grid_pki.bob.proxy,
                     trust=grid_pki.trust(), retries=0)
        assert not (tmp_path / "bob").exists()
        his = admin.submit(JobSpec(PY, ("-c", "print('his')")))
        his_info = admin.wait(his, timeout=120)
        with pytest.raises(GridFTPError, match="550"):
            download(f"{his_info.directory_url}stdout", tmp_path / "hers", 1, credential=grid_pki.alice.proxy,
                     trust=grid_pki.trust(), retries=0)
        assert [p.read_text() for p in admin.fetch_outputs(his_info, tmp_path / "his", names=["stdout"])] == ["his\n"]
    finally:
        grid.close()
