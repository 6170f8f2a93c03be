"""What a job shares with the host and other jobs, with real jobs of a real job service: a uid an account of the
system holds is given to no job (jobiso13)."""
from __future__ import annotations

import logging
import os
import subprocess

import pytest

from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_manager import OWNER, manager, shut, wait_final

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")

def test_a_uid_an_account_holds_is_given_to_no_job(tmp_path, caplog):
    """The range was checked against the accounts the name services enumerate at start; an account made since (or
    one LDAP or SSSD does not enumerate) holds a uid of it: the job gets the next uid an account holds neither as
    uid nor as gid, the service logs each it skipped, and none is given later either."""
    first = 8_000_000 + (os.getpid() % 1000) * 100
    m = manager(tmp_path / "state", job_uid_first=first, job_uid_count=10)
    user, group = f"vmgt{os.getpid() % 100000}", f"vmgtg{os.getpid() % 100000}"
    try:
        subprocess.run(["useradd", "--no-create-home", "--no-user-group", "--uid", str(first), "--gid", "65534",
                        "--shell", "/usr/sbin/nologin", user], check=True, capture_output=True)
        subprocess.run(["groupadd", "--gid", str(first + 1), group], check=True, capture_output=True)
        with caplog.at_level(logging.WARNING, logger="vmgrid.JobService"):
            job = wait_final(m, m.submit(OWNER, JobSpec(executable="id", arguments=("-u",))).key)
        assert job.state == JobState.DONE, job.failure
        assert (m.jobs_dir / job.key / "stdout").read_text() == f"{first + 2}\n"
        skipped = [r.getMessage() for r in caplog.records if "is given to no job" in r.getMessage()]
        assert skipped == [f"[jobs] job_uid_first, job_uid_count: uid {first} is held by the account {user} (uid "
                           f"{first}) (the system's name services know it): it is given to no job; give this job "
                           f"service a range of uids no account or group has",
                           f"[jobs] job_uid_first, job_uid_count: uid {first + 1} is held by the group {group} (gid "
                           f"{first + 1}) (the system's name services know it): it is given to no job; give this job "
                           f"service a range of uids no account or group has"], skipped
        again = wait_final(m, m.submit(OWNER, JobSpec(executable="id", arguments=("-u",))).key)
        assert (m.jobs_dir / again.key / "stdout").read_text() == f"{first + 2}\n"      # hers again, not first's
        assert m.store.uids_of(OWNER) == [first + 2]
        # an account made since with the uid her ended jobs gave back: that uid is hers no more, she gets the next
        subprocess.run(["useradd", "--no-create-home", "--no-user-group", "--uid", str(first + 2), "--gid", "65534",
                        "--shell", "/usr/sbin/nologin", user + "b"], check=True, capture_output=True)
        later = wait_final(m, m.submit(OWNER, JobSpec(executable="id", arguments=("-u",))).key)
        assert (m.jobs_dir / later.key / "stdout").read_text() == f"{first + 3}\n"
        assert m.store.uids_of(OWNER) == [first + 3]
    finally:
        shut(m)
        for name in (user, user + "b"):
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
