"""A uid range is one job service's alone (attack12 G2): no other running job service's on the host, no account's.
Real jobs: a second service given the first's range is refused at start; with a range of its own, its submitter's
job cannot reach the first service's job through /proc/PID/cwd."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.jobs import runner, uids
from services.jobs.runner import proc_start_time
from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_manager import OWNER, PY, manager, shut, wait_final, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")


def _hold_state(state: Path):
    """What `vmgrid serve` does for the job service of ``state`` (services/container/cli.py hold_state): its lock."""
    fd = os.open(state.parent / "jobs.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


SERVICE = Path(__file__).with_name("job_service_process.py")      # the service's core in a process of its own
READ_THE_OTHERS = ("import os\n"
                   "for pid in os.listdir('/proc'):\n"
                   "    try:\n"
                   "        if 'secret' in os.listdir(f'/proc/{pid}/cwd'):\n"
                   "            print('read', open(f'/proc/{pid}/cwd/secret').read())\n"
                   "    except OSError:\n"
                   "        pass\n")


def test_two_job_services_on_one_host_never_share_a_uid_range(tmp_path):
    """alice's service runs a job (her secret in its directory); a second job service on the host with the same
    range is refused at start, in one line naming the overlap and the keys; with a range of its own its
    submitter's job gets another uid and cannot reach her job's directory through /proc/PID/cwd. Once alice's
    service is gone (its state lock free), its range may be taken over."""
    a_state, b_state = tmp_path / "a" / "jobs", tmp_path / "b" / "jobs"
    a_state.parent.mkdir()
    b_state.parent.mkdir()
    first = 3000000 + (os.getpid() % 1000) * 1000       # no account's; other test processes' registries differ
    held = _hold_state(a_state)
    a = manager(a_state, job_uid_first=first, job_uid_count=10)
    try:
        job = a.submit(OWNER, JobSpec(executable=PY, arguments=(
            "-c", "import time; open('secret', 'w').write('alice 42'); open('ready', 'w'); time.sleep(60)")))
        wait_until(lambda: (a.jobs_dir / job.key / "ready").exists())
        with pytest.raises(ValueError) as refused:
            manager(b_state, job_uid_first=first + 5, job_uid_count=10)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith("[jobs] job_uid_first, job_uid_count: the range ")
        assert f"overlaps {first}-{first + 9}, the range of the running job service of {a_state}" in message
        b = manager(b_state, job_uid_first=first + 10, job_uid_count=10)
        try:
            assert a.store.job_uid(job.key) == first                 # alice's running job holds a's first uid
            spy = b.submit(OWNER, JobSpec(executable=PY, arguments=("-c", READ_THE_OTHERS)))
            done = wait_final(b, spy.key)
            assert done.state == JobState.DONE, done.failure
            given = [u for (u,) in b.store.db.conn().execute("SELECT uid FROM uids WHERE dn = ?", (OWNER,))]
            assert given == [first + 10]                              # b's own range, not a's
            assert "alice 42" not in (b.jobs_dir / spy.key / "stdout").read_text()
        finally:
            shut(b)
    finally:
        shut(a)
        os.close(held)
    taken = manager(b_state, job_uid_first=first, job_uid_count=10)     # alice's service is gone: taken over
    shut(taken)


def test_a_stopped_job_services_range_stays_its_own_while_its_jobs_run_on(tmp_path):
    """attack13 H1: a job's supervisor outlives its service. alice's service stops while her job runs under the
    range's first uid: a second service given that range is refused (naming a process of her job), whatever the
    order they start in; alice's service, started again, re-attaches her job; refused still once her state directory
    is moved away, as long as her job runs; once nothing of hers runs, the range is taken over."""
    a_state, b_state = tmp_path / "a" / "jobs", tmp_path / "b" / "jobs"
    a_state.parent.mkdir()
    b_state.parent.mkdir()
    first = 3000000 + (os.getpid() % 1000) * 1000
    held = _hold_state(a_state)
    a = manager(a_state, job_uid_first=first, job_uid_count=10)
    job = a.submit(OWNER, JobSpec(executable=PY, arguments=("-c", "import time; open('ready', 'w'); time.sleep(300)")))
    wait_until(lambda: (a.jobs_dir / job.key / "ready").exists())
    pid = a.store.get(job.key).pid
    assert a.store.job_uid(job.key) == first
    cgroups = [a.pids_cgroup, a.memory.parent]    # left by the SIGKILL below, with her state directory moved away
    a.close()                                     # alice's service stops; her job runs on
    os.close(held)
    try:
        with pytest.raises(ValueError) as refused:
            manager(b_state, job_uid_first=first, job_uid_count=10)
        message = str(refused.value)
        assert "\n" not in message
        assert (f"overlaps {first}-{first + 9}, the range of the stopped job service whose jobs run on (process "
                in message)
        assert f" of uid {first}) of {a_state} (registered in " in message
        assert first in {u for _, u in uids.processes_in(first, 10, os.path.realpath(a_state))}
        held = _hold_state(a_state)               # alice's service comes back to her job
        a = manager(a_state, job_uid_first=first, job_uid_count=10)
        assert a.reconcile_report["reattached"] == 1 and a.store.get(job.key).state == JobState.ACTIVE
        a.close()
        os.close(held)
        a_state.parent.rename(tmp_path / "a-moved")     # her state directory moved away, her job still running
        with pytest.raises(ValueError) as refused:
            manager(b_state, job_uid_first=first, job_uid_count=10)
        assert "the range of the stopped job service whose jobs run on (process " in str(refused.value)
    finally:
        os.killpg(pid, signal.SIGKILL)           # the supervisor, and the job's PID namespace with it
        wait_until(lambda: proc_start_time(pid) is None)
    wait_until(lambda: not uids.processes_in(first, 10))
    runner.remove_left_cgroups(cgroups, set)
    runner.remove_service_cgroups(cgroups)
    taken = manager(b_state, job_uid_first=first, job_uid_count=10)     # nothing of alice's runs: taken over
    shut(taken)


# a daemon: leaves the job's session (setsid) and its parent (a second fork whose parent exits), writes its pid
# (the host's: no PID namespace here) and leaves the job's directory for /; the program waits for it, then sleeps
DAEMON = ("import os, time\n"
          "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
          "        open('daemon.tmp', 'w').write(str(os.getpid())); os.rename('daemon.tmp', 'daemon.pid')\n"
          "        os.chdir('/'); time.sleep(300)\n    os._exit(0)\n"
          "while not os.path.exists('daemon.pid'):\n    time.sleep(0.02)\n"
          "time.sleep(300)\n")


def test_a_job_process_that_left_its_session_and_lost_its_parent_still_holds_its_stopped_services_range(tmp_path):
    """H1 follow-up: without PID namespaces a job's daemon (setsid, a second fork, cd /) is a child of init, its
    command line and working directory name no state directory. alice's service is killed (SIGKILL), then her job's
    supervisor with its group; the daemon runs on under the job's uid: it is still told apart as her stopped
    service's job by its cgroup (/proc/PID/cgroup names the service's job cgroup), so the range stays hers (another
    service is refused it; before, nothing of hers was found and the range was taken over). alice's service, started
    again, fails the job Lost and removes its cgroups, and the daemon in them with them."""
    a_state, b_state = tmp_path / "a" / "jobs", tmp_path / "b" / "jobs"
    first = 3000000 + (os.getpid() % 1000) * 1000 + 100
    service = subprocess.Popen([sys.executable, str(SERVICE), str(a_state), json.dumps(
        {"job_uid_first": first, "job_uid_count": 10}), json.dumps(["-c", DAEMON]), "--hold", "daemon.pid",
        "--no-pid-namespace"], stdout=subprocess.PIPE, text=True)
    daemon = None
    try:
        started = json.loads(service.stdout.readline())
        daemon = int((a_state / "jobs" / started["key"] / "daemon.pid").read_text())
        service.kill()                            # alice's service is killed (SIGKILL); her job runs on
        service.wait()
        os.killpg(started["shim"], signal.SIGKILL)    # then its supervisor with its group: the daemon left it
        wait_until(lambda: proc_start_time(started["shim"]) is None)
        assert proc_start_time(daemon) is not None
        with open(f"/proc/{daemon}/status") as f:
            assert any(line.startswith("PPid:") and int(line.split()[1]) != started["shim"] for line in f)
        assert os.readlink(f"/proc/{daemon}/cwd") == "/"
        assert (daemon, first) in uids.processes_in(first, 10, os.path.realpath(a_state))
        with pytest.raises(ValueError) as refused:
            manager(b_state, job_uid_first=first, job_uid_count=10)
        assert f"the range of the stopped job service whose jobs run on (process {daemon} of uid {first}" in \
            str(refused.value)
        again = manager(a_state, job_uid_first=first, job_uid_count=10)
        try:
            assert again.store.get(started["key"]).state == JobState.FAILED
            assert again.store.get(started["key"]).failure.startswith("Lost: ")
            wait_until(lambda: proc_start_time(daemon) is None)
            assert not (again.pids_cgroup and (again.pids_cgroup / started["key"]).exists())
            assert not (again.memory.parent and (again.memory.parent / started["key"]).exists())
        finally:
            shut(again)
    finally:
        if service.poll() is None:
            service.kill()
        if daemon is not None and proc_start_time(daemon) is not None:
            os.kill(daemon, signal.SIGKILL)


def test_a_uid_range_holding_an_account_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^\[jobs\] job_uid_first, job_uid_count: the range 65000-65999 holds the "
                                         r"account nobody \(uid 65534\)"):
        manager(tmp_path / "state", job_uid_first=65000, job_uid_count=1000)


def test_vmgrid_serve_jobs_of_a_second_user_on_the_host_is_refused_the_first_ones_default_range(tmp_path):
    """Two `vmgrid serve jobs` of one host, as the README's recipe would run one per user: the second with the
    default range stops at start with the one line; with a range of its own it serves; once the first has stopped,
    its range is taken over."""
    from client.localgrid import LocalGrid

    with LocalGrid(tmp_path / "grid") as g:
        alice, bob = g.user("alice"), g.user("bob")
        g.start("alices", ["jobs"], {"jobs": {"owner": alice.dn, "gridftp_port": -1}})
        with pytest.raises(RuntimeError) as refused:
            g.start("bobs", ["jobs"], {"jobs": {"owner": bob.dn, "gridftp_port": -1}})
        lines = [line for line in str(refused.value).splitlines()
                 if line.startswith("vmgrid:") and not line.startswith("vmgrid: warning:")]
        assert lines == [f"vmgrid: {g.root / 'bobs.toml'}: [jobs] job_uid_first, job_uid_count: the range "
                         f"900000-909999 overlaps 900000-909999, the range of the running job service of "
                         f"{g.root / 'alices' / 'jobs'} (registered in {os.environ['VMGRID_JOB_UID_REGISTRY']}): "
                         f"give each job service on a host a range of its own"], str(refused.value)
        g.start("bobs2", ["jobs"], {"jobs": {"owner": bob.dn, "gridftp_port": -1, "job_uid_first": 910000}})
        g.stop("alices")
        g.start("carols", ["jobs"], {"jobs": {"owner": bob.dn, "gridftp_port": -1}})


def test_the_registry_leaves_the_directories_it_makes_passable(tmp_path):
    """/var/lib/vmgrid may be a container's state directory, which its jobs pass through to reach their own: the
    registry makes the directories above it 0755 under the container's umask 077, itself 0700 (root's)."""
    registry = tmp_path / "lib" / "vmgrid" / "job-uids"
    umask = os.umask(0o077)
    try:
        uids.claim(tmp_path / "state" / "jobs", 3000000, 10, registry)
    finally:
        os.umask(umask)
    assert [oct(p.stat().st_mode & 0o777) for p in (registry.parent.parent, registry.parent, registry)] == \
        ["0o755", "0o755", "0o700"]
