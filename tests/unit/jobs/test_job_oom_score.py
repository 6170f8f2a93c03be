"""A job's program is the kernel's first choice when memory runs out, whatever the job service's own score: in a
guest guestd gives itself and the job service -900 (guestd/init.py), which children inherit; the shim sets the
program back to 0 as root, so the job cannot lower it again (trial14 U1: the guest's OOM killer killed the job
service, not a job)."""
from __future__ import annotations

import os

import pytest

from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_manager import OWNER, manager, shut, wait_final

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")

SCORE = "cat /proc/self/oom_score_adj; echo -500 > /proc/self/oom_score_adj || echo refused"


def _may_lower_scores() -> bool:
    """CAP_SYS_RESOURCE (bit 24), which a negative oom_score_adj needs: root in a guest has it; some sandboxes'
    root has not."""
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff & (1 << 24))


@pytest.mark.parametrize("service_score", ["-900", "300"])
def test_a_job_runs_at_score_0_whatever_the_services_score(tmp_path, service_score):
    """-900: a protected service (as in a guest; needs CAP_SYS_RESOURCE); 300: any other score it was given."""
    if service_score.startswith("-") and not _may_lower_scores():
        pytest.skip("this machine's root lacks CAP_SYS_RESOURCE: no negative score can be set here (the QEMU "
                    "guest test has the service protected)")
    with open("/proc/self/oom_score_adj") as f:
        before = f.read().strip()
    with open("/proc/self/oom_score_adj", "w") as f:      # this process stands for the job service
        f.write(service_score)
    try:
        m = manager(tmp_path / "state")
        try:
            job = wait_final(m, m.submit(OWNER, JobSpec(executable="sh", arguments=("-c", SCORE))).key)
            out = (m.jobs_dir / job.key / "stdout").read_text().split()
            assert job.state == JobState.DONE, job.failure
            assert out[0] == "0", out
            assert out[-1] == "refused", out           # it may not make itself a later choice than others
        finally:
            shut(m)
    finally:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(before)           # back down from 300: allowed, the lowest a process set itself is 0


@pytest.mark.skipif(not _may_lower_scores(), reason="this machine's root lacks CAP_SYS_RESOURCE: no negative score "
                                                  "can be set here (the QEMU guest test runs it in a guest)")
def test_guestd_protects_itself_and_what_it_starts(tmp_path):
    from guestd.init import protect_from_oom_killer

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            protect_from_oom_killer()
            child = os.popen("cat /proc/self/oom_score_adj").read().strip()
            code = 0 if child == "-900" else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
