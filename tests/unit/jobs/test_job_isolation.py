"""What a job shares with the host and other jobs, with real jobs of a real job service: its memory is bounded
(a memory cgroup per job: past [jobs] memory_limit the kernel kills in the job, which fails "out of memory"), its
/proc shows its own processes only, /run/lock and its System V IPC are its own, and a uid an account of the system
holds is given to no job (jobiso13)."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import uuid

import pytest

from services.jobs import runner
from services.jobs.config import JobsConfig
from services.jobs.runner import MemoryBound, memory_limit_bytes
from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_manager import OWNER, PY, manager, shut, wait_final

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")

MiB = 1 << 20
# allocates (and touches) 32 MiB at a time, saying how far it got, up to ``n`` MiB
EAT = ("import sys\nheld = []\nfor i in range(1, int(sys.argv[1]) // 32 + 1):\n"
       "    held.append(b'x' * (32 << 20))\n    print(i * 32, flush=True)\nprint('survived')\n")


def _memory_hierarchy() -> bool:
    return (os.path.exists(f"{runner.MEMORY_V1}/cgroup.procs")
            or "memory" in open(f"{runner.CGROUP_V2}/cgroup.controllers").read().split()
            if os.path.exists(f"{runner.CGROUP_V2}/cgroup.controllers") else
            os.path.exists(f"{runner.MEMORY_V1}/cgroup.procs"))


needs_memory_cgroup = pytest.mark.skipif(not _memory_hierarchy(), reason="no memory cgroup hierarchy here")


@needs_memory_cgroup
def test_a_job_past_its_memory_limit_is_killed_and_fails_out_of_memory(tmp_path):
    """[jobs] memory_limit = 96 MiB: a job that allocates 512 MiB is killed by the kernel once past it and fails
    saying so (not a bare signal); one that stays within it is Done; each job's memory cgroup goes with it."""
    m = manager(tmp_path / "state", memory_limit=96 * MiB)
    try:
        assert m.memory.why_not is None and m.memory.limit == 96 * MiB, m.memory
        eater = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", EAT, "512")))
        done = wait_final(m, eater.key)
        out = (m.jobs_dir / eater.key / "stdout").read_text()
        assert done.state == JobState.FAILED, (done.failure, out)
        assert done.failure == ("the program was killed by the kernel, out of memory: the job used more than its "
                                f"memory limit of {96 * MiB} bytes ([jobs] memory_limit)"), out
        assert done.exit_code == -9 and "survived" not in out and int(out.split()[-1]) <= 96, out
        status = json.loads((m.control_dir / eater.key / "exit.json").read_text())
        assert status["memory"].startswith("1 process killed past ")
        assert not m.memory.cgroup(eater.key).exists()
        small = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", EAT, "32"))).key)
        assert small.state == JobState.DONE, small.failure
        assert (m.jobs_dir / small.key / "stdout").read_text().split()[-1] == "survived"
    finally:
        shut(m)


def test_without_a_memory_cgroup_hierarchy_the_service_warns_at_start_and_each_job_says_so(tmp_path, monkeypatch,
                                                                                           caplog):
    monkeypatch.setattr(runner, "MEMORY_V1", str(tmp_path / "no-v1"))
    monkeypatch.setattr(runner, "CGROUP_V2", str(tmp_path / "no-v2"))
    with caplog.at_level(logging.WARNING, logger="vmgrid.JobService"):
        m = manager(tmp_path / "state", memory_limit=64 * MiB)
    try:
        assert m.memory.parent is None and "no memory cgroup hierarchy" in m.memory.why_not
        assert any(r.getMessage().startswith(f"jobs' memory is unbounded, not at most [jobs] memory_limit = "
                                             f"{64 * MiB} ({64 * MiB} bytes) each (no memory cgroup hierarchy")
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        job = wait_final(m, m.submit(OWNER, JobSpec(executable="true")).key)
        assert job.state == JobState.DONE
        status = json.loads((m.control_dir / job.key / "exit.json").read_text())
        assert status["memory"].startswith("unbounded: no memory cgroup hierarchy")
    finally:
        shut(m)


def test_memory_limit_is_bytes_or_a_share_of_the_machines_memory_and_anything_else_is_refused(tmp_path):
    assert memory_limit_bytes(0) == 0 and memory_limit_bytes(5000 * 4096) == 5000 * 4096
    assert memory_limit_bytes("75%", total=4 << 30) == 3 << 30
    assert memory_limit_bytes("100%", total=(16 << 20) + 100) == 16 << 20
    for key, share in (("memory_limit", "0.001%"), ("memory_total", "0.0000001%"), ("memory_limit", "3%")):
        # H3/X1: the floor holds for the bytes a share comes to too ("3%" of a 384 MiB guest is 11.5 MiB)
        with pytest.raises(ValueError, match=rf"^\[jobs\] {key} = '{re.escape(share)}' is \d+ bytes of this "
                                             rf"machine's 402653184: at least 16777216 \(16 MiB.*, or \"auto\" "
                                             r"\(the default\)$"):
            memory_limit_bytes(share, total=384 << 20, key=key)
    for bad in (-1, "0%", "101%", "2G", 0.5, True):
        with pytest.raises(ValueError, match=r"^\[jobs\] memory_limit = .*: bytes \(0: no bound\), a share of the "
                                             r"machine's memory such as \"80%\", or \"auto\" \(the default\)"):
            memory_limit_bytes(bad)
    for few in (1000, (16 << 20) - 1):            # trial14 U9: a unit mistake started, then killed every job
        with pytest.raises(ValueError, match=rf"^\[jobs\] memory_total = {few}: bytes, at least 16777216 \(16 MiB.*, "
                                             r"or \"auto\" \(the default\)$"):
            memory_limit_bytes(few, key="memory_total")
    assert memory_limit_bytes(16 << 20) == 16 << 20
    with pytest.raises(ValueError, match=r"^\[jobs\] memory_limit = '2G': "):
        manager(tmp_path / "state", memory_limit="2G")
    with pytest.raises(ValueError, match=r"^\[jobs\] memory_total = 'half': "):
        manager(tmp_path / "state", memory_total="half")
    assert not (tmp_path / "state").exists()            # refused before anything was made
    m = manager(tmp_path / "zero", memory_limit=0, memory_total=0)
    try:
        assert m.memory == MemoryBound(0) and m.memory.for_job("job-x") == {}
    finally:
        shut(m)


def test_the_default_memory_bounds_keep_192_mib_for_the_system_in_a_small_machine():
    """trial14 U1 (mem15): [jobs] memory_total defaults to "auto", the smaller of 75% of the machine's memory and all
    of it but 192 MiB, at least 25%: in the 384 MiB QEMU guest (MemTotal 344 MiB) 75% kept 86 MiB for the kernel,
    guestd and the job service, less than they hold at rest, and jobs filling their tmpfs made the service
    unreachable; "auto" keeps 192 MiB there. A large machine keeps a quarter, a tiny one three quarters.
    memory_limit's "auto" (its default) is 16 MiB less: a job alone is stopped at its own limit."""
    assert JobsConfig().memory_limit == JobsConfig().memory_total == "auto"
    guest = 352252 * 1024                                        # the 384 MiB guest's MemTotal
    assert memory_limit_bytes("auto", total=guest, key="memory_total") == guest - (192 << 20)
    assert memory_limit_bytes("auto", total=guest) == guest - (192 << 20) - (16 << 20)
    assert memory_limit_bytes("auto", total=4 << 30, key="memory_total") == 3 << 30    # 75% from 768 MiB on
    assert memory_limit_bytes("auto", total=768 << 20, key="memory_total") == 576 << 20
    assert memory_limit_bytes("auto", total=200 << 20, key="memory_total") == 50 << 20  # at least 25% below 256 MiB
    assert memory_limit_bytes("auto", total=(200 << 20) + 100, key="memory_total") == 50 << 20   # whole pages
    assert memory_limit_bytes("auto", total=4 << 30) == (3 << 30) - (16 << 20)
    assert memory_limit_bytes("auto", total=64 << 20) == 16 << 20                  # never below the floor
    assert memory_limit_bytes("auto") == memory_limit_bytes("auto", total=runner.machine_memory())
    with pytest.raises(ValueError, match=r"^\[jobs\] memory_total = 'Auto': bytes \(0: no bound\)"):
        memory_limit_bytes("Auto", key="memory_total")


LIST_PROC = ("import os\n"
             "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
             "print(' '.join(map(str, pids)))\n"
             "print(os.readlink('/proc/self'), os.getpid())\n"
             "print(open('/proc/self/status').read().count('Pid:'))\n")


def test_a_job_sees_only_its_own_processes_in_proc(tmp_path):
    """The job lists /proc: its init (1) and itself, none of the host's (not this test's own PID, nor the
    service's); /proc/self is the job's own process."""
    m = manager(tmp_path / "state")
    try:
        assert m.pid_namespace
        job = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", LIST_PROC))).key)
        out = (m.jobs_dir / job.key / "stdout").read_text().splitlines()
        assert job.state == JobState.DONE, (job.failure, out)
        pids = [int(p) for p in out[0].split()]
        assert os.getpid() not in pids and pids == [1, 2], out
        self_link, own = out[1].split()
        assert self_link == own == "2", out
    finally:
        shut(m)


def test_run_lock_is_the_jobs_own(tmp_path):
    """/run/lock (and /var/lock, a link to it here) is writable by every account: a job's lock file there stayed
    for the next job of any submitter to read or take. Each job has its own now: the host's is untouched, during
    the job and after, and the next job does not see the first's."""
    if not os.path.isdir("/run/lock") or os.path.islink("/run/lock") or not os.stat("/run/lock").st_mode & 0o002:
        pytest.skip("no world-writable /run/lock here")
    name = f"vmgrid-test-{uuid.uuid4().hex}"
    m = manager(tmp_path / "state")
    try:
        write = (f"import os\nopen('/run/lock/{name}', 'w').write('mine')\n"
                 f"print(sorted(os.listdir('/run/lock')), os.path.exists('/var/lock/{name}'))\n")
        first = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", write))).key)
        out = (m.jobs_dir / first.key / "stdout").read_text()
        assert first.state == JobState.DONE, (first.failure, out, (m.jobs_dir / first.key / "stderr").read_text())
        assert out == f"['{name}'] True\n"
        assert not os.path.exists(f"/run/lock/{name}")
        read = f"import os; print(os.path.exists('/run/lock/{name}'))"
        second = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", read))).key)
        assert (m.jobs_dir / second.key / "stdout").read_text() == "False\n"
    finally:
        shut(m)
        if os.path.exists(f"/run/lock/{name}"):
            os.unlink(f"/run/lock/{name}")          # without the fix: the job left it in the host's


# makes a System V shared memory segment (key 0x766d6731 + argv[1], mode 0666) and leaves it; or, with "find", says
# whether it finds the segment
SYSV_SHM = ("import ctypes, errno, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "key = 0x766d6731 + int(sys.argv[1])\n"
            "if sys.argv[2:] == ['find']:\n"
            "    print('found' if libc.shmget(key, 0, 0) >= 0 else errno.errorcode[ctypes.get_errno()])\n"
            "else:\n"
            "    print('made' if libc.shmget(key, 1 << 20, 0o1000 | 0o666) >= 0 else ctypes.get_errno())\n")


def test_a_jobs_system_v_ipc_is_its_own_and_goes_with_it(tmp_path):
    """A job's System V shared memory segment (mode 0666) stayed after the job, in memory, for any job (or account)
    to attach and read or write. Each job has an IPC namespace of its own now: the host does not see the segment,
    the next job does not find it, and it goes with the job."""
    slot = os.getpid() % 100000
    key = 0x766d6731 + slot
    m = manager(tmp_path / "state")
    try:
        made = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", SYSV_SHM, str(slot)))).key)
        assert (m.jobs_dir / made.key / "stdout").read_text() == "made\n", made.failure
        host = subprocess.run(["ipcs", "-m"], capture_output=True, text=True, check=True).stdout
        assert f"{key:#010x}" not in host, host
        found = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", SYSV_SHM, str(slot),
                                                                                   "find"))).key)
        assert (m.jobs_dir / found.key / "stdout").read_text() == "ENOENT\n"
        status = json.loads((m.control_dir / made.key / "exit.json").read_text())
        assert "ipc" not in status, status
    finally:
        shut(m)
        subprocess.run(["ipcrm", "-M", str(key)], capture_output=True)     # without the fix: the job left it


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


def test_the_start_logs_what_the_memory_bounds_came_to_in_bytes_and_whence(tmp_path, caplog):
    """trial15 X7: an operator (and a scientist told "more than its memory limit of N bytes") can see what a share
    or "auto" is on this machine before a job dies."""
    machine = runner.machine_memory()
    caplog.set_level(logging.INFO, logger="vmgrid.JobService")
    m = manager(tmp_path / "state", memory_limit="50%", memory_total="auto")
    try:
        half = machine // 2 // 4096 * 4096
        total = runner.memory_auto(machine)
        assert (f"jobs' memory: at most {half} bytes ({half / (1 << 20):.1f} MiB) each ([jobs] memory_limit = '50%'), "
                f"at most {total} bytes ({total / (1 << 20):.1f} MiB) together (memory_total = 'auto') of this "
                f"machine's {machine} bytes") in caplog.messages
    finally:
        shut(m)
    m = manager(tmp_path / "zero", memory_limit=0, memory_total=64 << 20)
    try:
        assert (f"jobs' memory: no bound each ([jobs] memory_limit = 0), at most {64 << 20} bytes (64.0 MiB) together "
                f"(memory_total = {64 << 20}) of this machine's {machine} bytes") in caplog.messages
    finally:
        shut(m)


def test_in_a_small_guest_memory_limit_auto_is_the_16_mib_floor_as_docs_jobs_md_says(tmp_path, caplog, monkeypatch):
    """trial16 T8: in a 160 MiB guest (MemTotal 128303104 bytes, the guest's own) the service started with both
    bounds "auto" logged each job at most 16 MiB and the jobs 30.6 MiB together: memory_limit's "auto" is the total
    less 16 MiB only down to the 16 MiB floor. docs/jobs.md said "16 MiB less" and nothing of the floor; it gives this
    guest's figures now, and they are what the service logs for that MemTotal."""
    from pathlib import Path

    guest = 128303104
    monkeypatch.setattr(runner, "machine_memory", lambda: guest)
    caplog.set_level(logging.INFO, logger="vmgrid.JobService")
    m = manager(tmp_path / "state")
    try:
        assert ("jobs' memory: at most 16777216 bytes (16.0 MiB) each ([jobs] memory_limit = 'auto'), at most "
                "32075776 bytes (30.6 MiB) together (memory_total = 'auto') of this machine's 128303104 bytes") \
            in caplog.messages
    finally:
        shut(m)
    doc = " ".join((Path(__file__).resolve().parents[3] / "docs" / "jobs.md").read_text().split())
    assert ("memory_limit's `\"auto\"` is 16 MiB less, but never below 16 MiB (a 160 MiB guest, MemTotal "
            f"{guest >> 20} MiB, gives its jobs a total of {32075776 / (1 << 20):.1f} MiB and each job 16 MiB, not "
            f"{(32075776 - (16 << 20)) / (1 << 20):.1f})") in doc
