"""The job service's core on the host, no SOAP: real processes (no shell), real SQLite, restarts that
find every job, Cancel that kills the whole process group, the owner-or-admin rule."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from gridftp.checksum import hash_file
from services.faults import AccessDenied, IllegalTransition, InvalidArgument, LimitExceeded, ResourceUnknown
from services.jobs.config import JobsConfig
from services.jobs.manager import JobManager
from services.jobs.runner import MemoryBound, proc_start_time, remove_service_cgroups
from services.jobs.staging import Stager, StagingError, staging_area
from services.jobs.store import JobSpec, JobState, StageIn, StageOut

OWNER = "/O=Grid/OU=vmgrid/CN=alice"
ADMIN = "/O=Grid/OU=vmgrid/CN=admin"
OTHER = "/O=Grid/OU=vmgrid/CN=bob"
PY = "/usr/bin/python3"      # a program a job may run: jobs run under a uid of their own (not root's /root/...)


def manager(state: Path, pki=None, **overrides) -> JobManager:
    """``pki``: the service's credential is its host's (it takes delegated proxies: ``delegated``)."""
    cfg = JobsConfig(owner=OWNER, admins=[ADMIN], **{"kill_grace": 2.0, **overrides})
    m = JobManager(state, cfg, lambda staging: Stager(pki and pki.host, pki and pki.trust(), staging))
    m.start()
    return m


# what a job's process writes of itself so that the test finds it on the host (``host_pid``): its PID namespace, its
# PID there and its start time (a job's /proc is its PID namespace's: it cannot know the host's number for it)
WHO_AM_I = ("(lambda s: f\"{os.readlink('/proc/self/ns/pid')} {os.getpid()} {s[s.rfind(')') + 2:].split()[19]}\")"
            "(open('/proc/self/stat').read())")
# a child that writes who it is (WHO_AM_I) and sleeps; with setsid first, it has left the job's process group
# child.pid appears whole (written under another name, then renamed): a job that waits for it to exist and ends
# must not leave it empty for the test to read (seen under load)
SLEEPER = (f"import os, time; open('child.tmp', 'w').write({WHO_AM_I}); os.rename('child.tmp', 'child.pid');"
           " time.sleep(300)")
SETSID_SLEEPER = "import os; os.setsid(); " + SLEEPER
needs_pid_namespaces = pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root (CAP_SYS_ADMIN); "
                                          "without them a job's setsid child is out of reach (documented)")


def host_pid(written: str) -> int | None:
    """The host's PID of the job's process that wrote ``written`` (WHO_AM_I), None once it is gone."""
    ns, pid, start = written.split()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != ns or proc_start_time(int(entry)) != start:
                continue
            with open(f"/proc/{entry}/status") as f:
                if any(line.startswith("NSpid:") and line.split()[-1] == pid for line in f):
                    return int(entry)
        except OSError:
            continue
    return None


def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def wait_final(m: JobManager, key: str):
    return wait_until(lambda: (j := m.store.get(key)) is not None and j.final and key not in m._threads and j)


def shut(m: JobManager) -> None:
    """End what a test left running (no job outlives its test), then close the manager."""
    for job in m.store.list(live_only=True):
        try:
            m.cancel(OWNER, job.key)
        except IllegalTransition:        # it ended meanwhile
            pass
    wait_until(lambda: not m._threads)
    m.close()


def delegated(pki, user=None, **kwargs) -> bytes:
    """A proxy of ``user`` (alice, the owner) delegated to the service (its host key), as `vmgrid job submit` makes it."""
    from security.delegation import delegate
    return delegate((user or pki.alice).proxy, pki.host.certificate, **kwargs)


@pytest.fixture
def jobs(tmp_path, grid_pki):
    m = manager(tmp_path / "state", grid_pki)
    yield m
    shut(m)


def test_a_job_runs_without_a_shell_and_ends_done_with_its_outputs_hashed(jobs):
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", "import sys; print('hello', sys.argv[1:]); open('out.txt','w').write('42')",
                                          "a b", "$HOME;echo"), stage_out=(StageOut("out.txt"),)))
    done = wait_final(jobs, job.key)
    assert done.state == JobState.DONE and done.exit_code == 0
    assert jobs.tail(OWNER, done, "stdout") == "hello ['a b', '$HOME;echo']\n"     # arguments reach it verbatim
    outputs = {o.name: o for o in done.outputs}
    assert set(outputs) == {"stdout", "stderr", "out.txt"} and outputs["stderr"].size == 0
    assert outputs["out.txt"].sha256 == hash_file(jobs.jobs_dir / job.key / "out.txt")
    assert done.started and done.ended and done.submitted <= done.started <= done.ended


def test_a_non_zero_exit_is_failed_with_the_exit_code(jobs):
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", "import sys; sys.stderr.write('bad input\\n'); sys.exit(3)")))
    done = wait_final(jobs, job.key)
    assert (done.state, done.exit_code) == (JobState.FAILED, 3)
    assert "exited with status 3" in done.failure
    assert jobs.tail(OWNER, done, "stderr") == "bad input\n"


def test_a_missing_program_and_a_missing_output_fail_with_the_reason(jobs):
    a = jobs.submit(OWNER, JobSpec("no-such-program-vmgrid"))
    b = jobs.submit(OWNER, JobSpec(PY, ("-c", "pass"), stage_out=(StageOut("result.png"),)))
    a, b = wait_final(jobs, a.key), wait_final(jobs, b.key)
    assert a.state == JobState.FAILED and "cannot start no-such-program-vmgrid" in a.failure
    assert "no shell" not in a.failure
    assert b.state == JobState.FAILED and b.exit_code == 0
    assert b.failure == "the program exited with status 0, but output result.png was not produced"


def test_a_command_line_given_as_the_programs_name_fails_with_the_hint_that_no_shell_runs_it(jobs):
    job = wait_final(jobs, jobs.submit(OWNER, JobSpec("sort  seqs.txt")).key)
    assert job.state == JobState.FAILED and job.failure == (
        "cannot start sort  seqs.txt: No such file or directory (no shell runs a job: 'sort  seqs.txt' is taken as "
        "one program's name; give the program and each argument as words of their own, sort seqs.txt, or run a "
        "shell yourself: sh -c '...')")


def test_the_environment_is_the_jobs_own_not_the_services(jobs, monkeypatch):
    monkeypatch.setenv("X509_USER_PROXY", "/secret/proxy")
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", "import os, json; print(json.dumps(sorted(os.environ)))"),
                                     environment=(("BLASTDB", "/data"),), directory="run/here"))
    done = wait_final(jobs, job.key)
    names = eval(jobs.tail(OWNER, done, "stdout"))
    assert "X509_USER_PROXY" not in names and "BLASTDB" in names
    assert (jobs.jobs_dir / job.key / "run" / "here").is_dir()


def test_cancel_kills_the_whole_process_group(jobs):
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', " + repr(SLEEPER) + "]);"
              "time.sleep(300)")
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", script)))
    pid_file = jobs.jobs_dir / job.key / "child.pid"
    child = host_pid(wait_until(lambda: pid_file.exists() and pid_file.read_text()))
    assert child is not None and jobs.store.get(job.key).state == JobState.ACTIVE
    jobs.cancel(OWNER, job.key)
    wait_until(lambda: proc_start_time(child) is None)        # the grandchild is gone too
    done = wait_final(jobs, job.key)
    assert done.state == JobState.CANCELLED and done.exit_code == -signal.SIGTERM
    with pytest.raises(IllegalTransition):
        jobs.cancel(OWNER, job.key)


def test_what_a_cancelled_job_wrote_is_recorded_hashed_before_it_is_cancelled_and_nothing_is_sent(jobs, grid_pki):
    """A Cancelled job recorded no outputs: `vmgrid job get` fetched nothing although StdoutTail showed output.
    Whoever sees the job Cancelled (a notification, a status) finds them all recorded: a listener reads the job
    at its move to Cancelled."""
    work = jobs.jobs_dir
    at_cancelled = []
    jobs.listeners.append(lambda job, old, new: new == JobState.CANCELLED and at_cancelled.append(job))
    # 40 more files of 1 MiB: hashing and recording them takes a while after the program has ended
    parts = [f"part{i}.bin" for i in range(40)]
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", "import time\nfor n in %r: open(n, 'wb').write(bytes(1 << 20))\n"
                                               "open('part.txt', 'w').write('half'); print('started', flush=True); "
                                               "time.sleep(300)" % parts,),
                                     stage_out=(StageOut("part.txt", "gsiftp://127.0.0.1:1/results/part.txt"),
                                                StageOut("never.txt"), *map(StageOut, parts))), delegated(grid_pki))
    wait_until(lambda: jobs.tail(OWNER, jobs.store.get(job.key), "stdout") == "started\n")
    jobs.cancel(OWNER, job.key, answer_wait=0)          # answers at once; the job's thread does the rest
    done = wait_final(jobs, job.key)
    assert done.state == JobState.CANCELLED and done.failure is None and done.exit_code == -signal.SIGTERM
    assert [j.state for j in at_cancelled] == [JobState.CANCELLED]
    outputs = {o.name: o for o in at_cancelled[0].outputs}       # all there when it became Cancelled
    assert set(outputs) == {"stdout", "stderr", "part.txt", *parts}
    for name, o in outputs.items():
        assert (o.size, o.sha256) == ((work / job.key / name).stat().st_size, hash_file(work / job.key / name))
        assert o.destination is None                     # a cancelled job's outputs go nowhere (port 1: never sent)
    assert outputs["stdout"].size == len("started\n")


IGNORES_SIGTERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('started', flush=True); "
                   "time.sleep(300)")


def test_cancel_answers_at_once_while_a_program_that_ignores_sigterm_runs_on_and_the_job_ends_cancelled(tmp_path):
    """Cancel held its request thread until the program had ended and its outputs were recorded: up to kill_grace
    + 30 s each, and a few Cancels starved a container's request threads. Now it answers the live state, its
    Cancel recorded (CancelRequested), while the program runs on (here it ignores SIGTERM, and the grace is 600 s);
    asked again it answers the same. When the program ends the job is Cancelled with what it wrote."""
    m = manager(tmp_path / "s", kill_grace=600.0)
    try:
        job = m.submit(OWNER, JobSpec(PY, ("-c", IGNORES_SIGTERM)))
        wait_until(lambda: m.tail(OWNER, m.store.get(job.key), "stdout") == "started\n")
        assert m.cancel(OWNER, job.key) == JobState.ACTIVE
        assert m.cancel(ADMIN, job.key) == JobState.ACTIVE                # a second Cancel: no fault, no change
        running = m.store.get(job.key)
        assert running.state == JobState.ACTIVE and running.cancel_requested and running.outputs == ()
        assert proc_start_time(running.pid) is not None                  # SIGTERM sent, ignored
        os.killpg(running.pid, signal.SIGKILL)                           # what kill_grace would do, 600 s later
        done = wait_final(m, job.key)
        # the SIGKILL to the group ends its supervisor too, which leaves no exit status
        assert (done.state, done.exit_code, done.failure) == (JobState.CANCELLED, None, None)
        assert {o.name: o.size for o in done.outputs} == {"stdout": len("started\n"), "stderr": 0}
    finally:
        shut(m)


def test_the_sigkill_after_the_grace_comes_from_a_thread_of_its_own(jobs):
    """kill_grace is 2 s here: the program that ignores SIGTERM is killed with no request waiting for it."""
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", IGNORES_SIGTERM)))
    wait_until(lambda: jobs.tail(OWNER, jobs.store.get(job.key), "stdout") == "started\n")
    assert jobs.cancel(OWNER, job.key, answer_wait=0) == JobState.ACTIVE
    done = wait_final(jobs, job.key)
    assert (done.state, done.exit_code, done.failure) == (JobState.CANCELLED, None, None)   # SIGKILLed with its shim
    assert {o.name for o in done.outputs} == {"stdout", "stderr"}


class HeldStager(Stager):
    """A Stager whose first send waits until the test lets it go (a stage-out under way when Cancel comes); it
    records what it was asked to send and sends nothing (the destinations are not real servers)."""

    def __init__(self, staging, pki):
        super().__init__(pki.host, pki.trust(), staging)
        self.sending, self.go, self.sent = threading.Event(), threading.Event(), []

    def send(self, path, destination, sha256, progress, *, credential=None):
        assert credential.identity == OWNER          # as the submitter (her delegated proxy), never as the service
        self.sent.append(destination)
        self.sending.set()
        assert self.go.wait(60)


def test_a_cancel_during_the_stage_out_sends_no_further_file_and_ends_it_cancelled_with_every_output(tmp_path,
                                                                                                        grid_pki):
    stagers = []
    cfg = JobsConfig(owner=OWNER, admins=[ADMIN], kill_grace=2.0)
    m = JobManager(tmp_path / "s", cfg, lambda staging: stagers.append(HeldStager(staging, grid_pki)) or stagers[-1])
    m.start()
    try:
        script = "for n in ('a.txt', 'b.txt', 'c.txt'): open(n, 'w').write(n)"
        job = m.submit(OWNER, JobSpec(PY, ("-c", script), stage_out=tuple(
            StageOut(n, f"gsiftp://results.example.org/{n}") for n in ("a.txt", "b.txt", "c.txt"))), delegated(grid_pki))
        stager = stagers[0]
        assert stager.sending.wait(60)                       # a.txt is being sent
        assert m.store.get(job.key).state == JobState.STAGE_OUT
        assert m.cancel(OWNER, job.key, answer_wait=0) == JobState.STAGE_OUT
        stager.go.set()
        done = wait_final(m, job.key)
        assert (done.state, done.exit_code, done.failure) == (JobState.CANCELLED, 0, None)
        assert stager.sent == ["gsiftp://results.example.org/a.txt"]     # b.txt and c.txt were not sent
        assert {o.name: o.destination for o in done.outputs} == {
            "stdout": None, "stderr": None, "a.txt": "gsiftp://results.example.org/a.txt", "b.txt": None,
            "c.txt": None}
    finally:
        shut(m)


def test_what_a_job_leaves_running_ends_with_it(jobs):
    """A program that started a child in the background and exited: the child outlived the job (Done), its
    Destroy and its lifetime; one that kept the output pipes kept the job Active until its lifetime ended."""
    start = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', " + repr(SLEEPER) + "]"
             "PIPES)\nwhile not __import__('os').path.exists('child.pid'): pass")
    for keeps_pipes in (False, True):
        job = jobs.submit(OWNER, JobSpec(PY, ("-c", start.replace(
            "PIPES", "" if keeps_pipes else ", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL"))))
        done = wait_final(jobs, job.key)
        assert done.state == JobState.DONE
        child = (jobs.jobs_dir / job.key / "child.pid").read_text()
        wait_until(lambda: host_pid(child) is None)        # the child is gone with the job


@needs_pid_namespaces
def test_a_process_that_leaves_the_jobs_group_ends_with_the_job_all_the_same(jobs):
    """A daemon (setsid: a session and process group of its own) started by the program: it ends when the
    program ends, on Cancel (and the program's exit is still its SIGTERM), on Destroy and at lifetime expiry."""
    assert jobs.pid_namespace
    daemon = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', " + repr(SETSID_SLEEPER) + \
             "], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)\n"
    wait_file = "import os, time\nwhile not os.path.exists('child.pid'): time.sleep(0.02)\n"

    def daemon_pid(key):
        pid_file = jobs.jobs_dir / key / "child.pid"
        return host_pid(wait_until(lambda: pid_file.exists() and pid_file.read_text()))

    ends = jobs.submit(OWNER, JobSpec(PY, ("-c", daemon + wait_file + "print('bye')")))
    done = wait_final(jobs, ends.key)
    assert (done.state, done.exit_code, jobs.tail(OWNER, done, "stdout")) == (JobState.DONE, 0, "bye\n")
    child = (jobs.jobs_dir / ends.key / "child.pid").read_text()
    wait_until(lambda: host_pid(child) is None)

    cancelled = jobs.submit(OWNER, JobSpec(PY, ("-c", daemon + "import time; time.sleep(300)")))
    child = daemon_pid(cancelled.key)
    jobs.cancel(OWNER, cancelled.key)
    wait_until(lambda: proc_start_time(child) is None)
    assert wait_final(jobs, cancelled.key).exit_code == -signal.SIGTERM

    for end in ("destroy", "expiry"):
        job = jobs.submit(OWNER, JobSpec(PY, ("-c", daemon + "import time; time.sleep(300)")))
        child = daemon_pid(job.key)
        if end == "destroy":
            jobs.destroy(OWNER, job.key)
        else:
            assert job.key in jobs.sweep(now=time.time() + 10 ** 6)
        wait_until(lambda: proc_start_time(child) is None)


@needs_pid_namespaces
def test_a_program_that_leaves_the_group_itself_still_gets_cancels_sigterm(jobs):
    """The program calls setsid itself: Cancel's SIGTERM to the group misses it, the namespace's init forwards it
    (it ends by its own handler, exit 7, before the SIGKILL would come)."""
    script = ("import os, signal, sys, time; os.setsid()\n"
              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\nopen('ready', 'w').close(); time.sleep(300)")
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", script)))
    wait_until(lambda: (jobs.jobs_dir / job.key / "ready").exists())
    jobs.cancel(OWNER, job.key)
    done = wait_final(jobs, job.key)
    assert (done.state, done.exit_code) == (JobState.CANCELLED, 7)


def test_an_admins_job_neither_reads_nor_rewrites_the_owners_files_nor_the_services(jobs):
    """Each submitter's jobs run under a uid of its own (not root), in a 0700 directory of that uid: an admin's
    job finds neither the owner's staged input (her job's copy, her staging area) nor the service's database,
    and cannot overwrite her recorded standard output (attack report F14)."""
    area = jobs.staging_dir / staging_area(OWNER)
    area.mkdir()
    (area / "secret.txt").write_text("alice secret\n")
    hers = wait_final(jobs, jobs.submit(OWNER, JobSpec("cat", ("secret.txt",),
                                                       stage_in=(StageIn("staged:secret.txt", "secret.txt"),))).key)
    assert hers.state == JobState.DONE and jobs.tail(OWNER, hers, "stdout") == "alice secret\n"
    before = {o.name: o for o in hers.outputs}["stdout"]
    probe = (f"id -u; cat ../*/secret.txt ../{hers.key}/secret.txt ../../staging/*/secret.txt; ls ../../staging; "
             f"head -c 16 ../../jobs.sqlite; echo forged > ../{hers.key}/stdout; true")
    his = wait_final(jobs, jobs.submit(ADMIN, JobSpec("sh", ("-c", probe))).key)
    out = jobs.tail(ADMIN, his, "stdout")
    err = (jobs.jobs_dir / his.key / "stderr").read_text()
    assert "alice secret" not in out and "SQLite" not in out, out
    assert err.count("Permission denied") >= 4, err
    assert (jobs.jobs_dir / hers.key / "stdout").read_text() == "alice secret\n"
    assert hash_file(jobs.jobs_dir / hers.key / "stdout") == before.sha256
    her_uids, his_uids = jobs.store.uids_of(OWNER), jobs.store.uids_of(ADMIN)
    assert not set(her_uids) & set(his_uids) and min(her_uids + his_uids) >= 900000
    assert int(out.split()[0]) in his_uids
    assert (jobs.jobs_dir / hers.key).stat().st_mode & 0o077 == 0


# a job that writes a secret and its pid as the host sees it (written whole: another name, then renamed), and waits
KEEPER = ("import os, time; open('secret.txt', 'w').write('first secret');"
          f" open('pid.tmp', 'w').write({WHO_AM_I}); os.rename('pid.tmp', 'pid'); time.sleep(300)")
# a job that tries to read and rewrite that secret, by the first job's key, and to kill it
PROBE = """import os, signal, sys
key, pid = sys.argv[1], int(sys.argv[2])
for what, act in (("read", lambda: print(open(f"../{key}/secret.txt").read())),
                  ("write", lambda: open(f"../{key}/secret.txt", "w").write("forged")),
                  ("kill", lambda: os.kill(pid, signal.SIGKILL))):
    try:
        act()
        print(what, "done")
    except OSError as exc:
        print(what, exc.errno)
print(os.getuid())
"""


def test_two_running_jobs_of_one_submitter_neither_read_nor_rewrite_nor_kill_each_other(jobs):
    """All jobs of a submitter ran under her one uid: a job of hers read and rewrote another of hers running beside
    it (by its key), and without PID namespaces could kill it. Each running job now holds a uid of its own (the
    same pool), so the second job gets EACCES and EPERM (or ESRCH); the uids go back when the jobs end, her next
    job takes one of them again, and an admin's job never one of hers."""
    first = jobs.submit(OWNER, JobSpec(PY, ("-c", KEEPER)))
    pid_file = jobs.jobs_dir / first.key / "pid"
    pid = host_pid(wait_until(lambda: pid_file.exists() and pid_file.read_text()))
    second = wait_final(jobs, jobs.submit(OWNER, JobSpec(PY, ("-c", PROBE, first.key, str(pid)))).key)
    out = jobs.tail(OWNER, second, "stdout").split("\n")
    # the kill: EPERM for another uid, or ESRCH from a PID namespace of its own, where the first job is not seen
    assert out[:2] == [f"read {errno.EACCES}", f"write {errno.EACCES}"], out
    assert out[2] in (f"kill {errno.EPERM}", f"kill {errno.ESRCH}"), out
    assert jobs.store.get(first.key).state == JobState.ACTIVE and proc_start_time(pid) is not None
    assert (jobs.jobs_dir / first.key / "secret.txt").read_text() == "first secret"
    held = jobs.store.held_uids()
    assert list(held) == [first.key] and int(out[3]) != held[first.key]          # the second's is back already
    assert jobs.cancel(OWNER, first.key) in (JobState.CANCELLED, JobState.ACTIVE)
    wait_final(jobs, first.key)
    assert jobs.store.held_uids() == {}
    hers = set(jobs.store.uids_of(OWNER))
    assert len(hers) == 2 and int(out[3]) in hers
    third = wait_final(jobs, jobs.submit(OWNER, JobSpec("id", ("-u",))).key)
    his = wait_final(jobs, jobs.submit(ADMIN, JobSpec("id", ("-u",))).key)
    assert int(jobs.tail(OWNER, third, "stdout")) in hers and set(jobs.store.uids_of(OWNER)) == hers
    assert int(jobs.tail(ADMIN, his, "stdout")) not in hers


def test_without_pid_namespaces_what_a_job_left_is_killed_before_its_uid_serves_another_job(tmp_path):
    """Without PID namespaces (and without a pids cgroup, whose removal kills what is in it) a daemon (setsid) a job
    started outlives it (documented): before the job's uid goes back to the pool every process of that uid is
    killed, so the daemon cannot reach her next job. (A range of uids of this test's own: every process of the uid
    is killed.)"""
    first = 9_000_000 + (os.getpid() % 1000) * 100
    m = manager(tmp_path / "s", job_uid_first=first, job_uid_count=100)
    cgroups = [m.pids_cgroup, m.memory.parent]            # the service's own, removed at the end
    m.pid_namespace, m.pids_cgroup, m.processes_unbounded = False, None, "not in this test"
    m.memory = MemoryBound(m.memory.limit, why_not="not in this test")     # whose removal would kill it too
    child = None
    try:
        daemon = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', " + repr(SETSID_SLEEPER) + \
                 "], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)\n" + \
                 "import os, time\nwhile not os.path.exists('child.pid'): time.sleep(0.02)\n"
        job = wait_final(m, m.submit(OWNER, JobSpec(PY, ("-c", daemon))).key)
        assert job.state == JobState.DONE
        child = (m.jobs_dir / job.key / "child.pid").read_text()
        wait_until(lambda: host_pid(child) is None)
        assert m.store.held_uids() == {} and m.store.uids_of(OWNER) == [first]
    finally:
        if child is not None and host_pid(child) is not None:
            os.kill(host_pid(child), signal.SIGKILL)          # without the fix: it outlived its job
        shut(m)
        remove_service_cgroups(cgroups)


def test_a_link_the_job_puts_in_an_outputs_place_records_nothing_of_the_file_it_names(jobs, tmp_path):
    """The service (root) hashes and shows only plain files the job's uid owns, reached through no link: a job that
    puts a symbolic link to a file of the service's in place of its output and standard output gets it neither
    recorded, nor shown in StdoutTail."""
    key = tmp_path / "hostkey.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o600)
    link = f"import os; os.symlink({str(key)!r}, 'out.txt'); os.unlink('stdout'); os.symlink({str(key)!r}, 'stdout')"
    job = wait_final(jobs, jobs.submit(OWNER, JobSpec(PY, ("-c", link), stage_out=(StageOut("out.txt"),))).key)
    assert job.state == JobState.FAILED and "output out.txt cannot be read" in job.failure, job.failure
    assert "PRIVATE KEY" not in jobs.tail(OWNER, job, "stdout")
    assert hash_file(key) not in {o.sha256 for o in job.outputs}


def test_the_service_refuses_to_start_as_another_user_than_root(tmp_path, monkeypatch):
    """Only root may give each submitter's jobs a uid of their own: a job service of another user would run its
    jobs as itself, beside its credential and state, and refuses to start, saying so."""
    monkeypatch.setattr("services.jobs.manager.os.geteuid", lambda: 1000)
    with pytest.raises(ValueError, match="start it as root"):
        JobManager(tmp_path / "state", JobsConfig(owner=OWNER), None)


def test_only_the_owner_and_admins_may_do_anything_and_others_learn_nothing(jobs):
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", "pass")))
    wait_final(jobs, job.key)
    for key in (job.key, "job-" + "0" * 32):     # an unknown job answers the same: nothing revealed
        for call in (lambda: jobs.job(OTHER, key), lambda: jobs.cancel(OTHER, key), lambda: jobs.destroy(OTHER, key),
                     lambda: jobs.set_termination(OTHER, key, time.time() + 60),
                     lambda: jobs.subscribe(OTHER, key, "http://127.0.0.1:1/", None)):
            with pytest.raises(AccessDenied):
                call()
    for call in (lambda: jobs.submit(OTHER, JobSpec("true")), lambda: jobs.list(OTHER),
                 lambda: jobs.read_log(OTHER, "container")):
        with pytest.raises(AccessDenied):
            call()
    assert jobs.job(ADMIN, job.key).state == JobState.DONE
    with pytest.raises(ResourceUnknown):
        jobs.job(OWNER, "job-" + "0" * 32)


def test_a_jobs_output_tail_is_read_by_its_submitter_and_the_admins_only(jobs):
    """tail() read any job's output for whoever asked (it took no caller): the owner read an admin's job's."""
    his = wait_final(jobs, jobs.submit(ADMIN, JobSpec(PY, ("-c", "print('admin secret')"))).key)
    hers = wait_final(jobs, jobs.submit(OWNER, JobSpec(PY, ("-c", "print('alice out')"))).key)
    for dn in (OWNER, OTHER):
        for which in ("stdout", "stderr"):
            with pytest.raises(AccessDenied) as denied:
                jobs.tail(dn, his, which)
            assert "admin secret" not in str(denied.value)
    assert jobs.tail(ADMIN, his, "stdout") == "admin secret\n"
    assert jobs.tail(OWNER, hers, "stdout") == jobs.tail(ADMIN, hers, "stdout") == "alice out\n"


@pytest.mark.parametrize("spec", [
    JobSpec("true", stdout="../escape"), JobSpec("true", directory="/etc"),
    JobSpec("true", stage_in=(StageIn("http://example.org/x", "x"),)),
    JobSpec("true", environment=(("BAD-NAME", "x"),)), JobSpec(""),
    # 0 is not "the default" (a client meaning the default names no lifetime), nor is a negative one
    JobSpec("true", lifetime=0), JobSpec("true", lifetime=-5),
    # a job's directory holds only what is staged in when the program starts: any other stdin is never there
    JobSpec("true", stdin="seqs.txt"), JobSpec("true", stdin="seqs.txt", stage_in=(StageIn("staged:x", "x"),)),
])
def test_bad_requests_are_invalid_arguments_and_leave_nothing(jobs, spec):
    with pytest.raises(InvalidArgument):
        jobs.submit(OWNER, spec)
    assert jobs.store.list() == [] and list(jobs.jobs_dir.iterdir()) == []


def test_output_capture_is_bounded(tmp_path):
    m = manager(tmp_path / "s", max_output=1000)
    try:
        job = m.submit(OWNER, JobSpec(PY, ("-c", "import sys; sys.stdout.write('x' * 100000)")))
        done = wait_final(m, job.key)
        assert done.state == JobState.DONE
        assert (m.jobs_dir / job.key / "stdout").stat().st_size == 1000
    finally:
        shut(m)


def test_a_job_that_leaves_a_fifo_for_its_standard_output_blocks_nothing(jobs):
    """The job replaces its stdout file with a FIFO: reading the StdoutTail property (every status query)
    opened it and waited for a writer for ever, one container thread per query."""
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", "import os; print('x'); os.unlink('stdout'); os.mkfifo('stdout')")))
    done = wait_final(jobs, job.key)
    assert stat.S_ISFIFO((jobs.jobs_dir / job.key / "stdout").lstat().st_mode)
    answer = []
    reader = threading.Thread(target=lambda: answer.append(jobs.tail(OWNER, done, "stdout")), daemon=True)
    reader.start()
    reader.join(60)
    if reader.is_alive():                   # release it before failing
        os.close(os.open(jobs.jobs_dir / job.key / "stdout", os.O_WRONLY | os.O_NONBLOCK))
    assert answer == [""]
    assert jobs.tail(OWNER, done, "stderr") == ""


def test_stage_in_from_the_staging_area_is_verified(jobs):
    area = jobs.staging_dir / staging_area(OWNER)
    area.mkdir()
    (area / "seq.fasta").write_text(">s\nACGT\n")
    good = hash_file(area / "seq.fasta")
    ok = jobs.submit(OWNER, JobSpec(PY, ("-c", "print(open('in/seq.fasta').read().count('A'))"),
                                    stage_in=(StageIn("staged:seq.fasta", "in/seq.fasta", good),)))
    bad = jobs.submit(OWNER, JobSpec("true", stage_in=(StageIn("staged:seq.fasta", "x", "0" * 64),)))
    missing = jobs.submit(OWNER, JobSpec("true", stage_in=(StageIn("staged:nothing", "x"),)))
    ok, bad, missing = (wait_final(jobs, j.key) for j in (ok, bad, missing))
    assert ok.state == JobState.DONE and jobs.tail(OWNER, ok, "stdout") == "1\n"
    assert bad.state == JobState.FAILED and "is not the expected" in bad.failure
    assert missing.state == JobState.FAILED and "no such file in your staging area" in missing.failure


def test_a_staged_in_file_of_someone_who_never_uploaded_fails_with_the_reason_not_an_internal_error(jobs):
    """No staging area yet (the first upload makes it): the job Failed with 'internal error of the job service:
    [Errno 2] No such file or directory: …/staging/<area>' and the job's thread logged a traceback."""
    assert not (jobs.staging_dir / staging_area(ADMIN)).exists()
    job = wait_final(jobs, jobs.submit(ADMIN, JobSpec("true", stage_in=(StageIn("staged:seq.fasta", "x"),))).key)
    assert job.state == JobState.FAILED and job.failure == (
        "stage-in failed: staged:seq.fasta: no such file in your staging area (upload it first)")


def test_a_staged_in_file_is_the_jobs_standard_input(jobs):
    area = jobs.staging_dir / staging_area(OWNER)
    area.mkdir()
    (area / "seqs.txt").write_text("tata\nacgt\n")
    job = jobs.submit(OWNER, JobSpec("sort", stdin="./in/seqs.txt",
                                     stage_in=(StageIn("staged:seqs.txt", "in/seqs.txt"),)))
    done = wait_final(jobs, job.key)
    assert done.state == JobState.DONE and jobs.tail(OWNER, done, "stdout") == "acgt\ntata\n"


def test_limits_on_lifetime_and_live_jobs(tmp_path):
    m = manager(tmp_path / "s", max_live_jobs=1, max_lifetime=100)
    try:
        with pytest.raises(LimitExceeded):
            m.submit(OWNER, JobSpec("true", lifetime=101))
        m.submit(OWNER, JobSpec(PY, ("-c", "import time; time.sleep(300)")))
        with pytest.raises(LimitExceeded):
            m.submit(OWNER, JobSpec("true"))
    finally:
        shut(m)


def test_an_expired_job_is_killed_and_destroyed(jobs):
    job = jobs.submit(OWNER, JobSpec(PY, ("-c", "import time; time.sleep(300)")))
    wait_until(lambda: jobs.store.get(job.key).state == JobState.ACTIVE)
    assert jobs.sweep(now=time.time() + 10 ** 6) == [job.key]
    assert jobs.store.get(job.key) is None and not (jobs.jobs_dir / job.key).exists()
    with pytest.raises(ResourceUnknown):
        jobs.job(OWNER, job.key)


def test_a_restarted_service_reattaches_running_jobs_and_fails_the_lost_ones_with_a_reason(tmp_path):
    state = tmp_path / "s"
    m = manager(state)
    # each waiting job waits for "go" in its own directory (its /tmp is its own: no gate the test could open there)
    waiter = m.submit(OWNER, JobSpec(PY, ("-c", "import os, time\nwhile not os.path.exists('go'): "
                                              "time.sleep(0.05)\nprint('released')")))
    lost = m.submit(OWNER, JobSpec(PY, ("-c", "import time; time.sleep(300)")))
    finished = m.submit(OWNER, JobSpec(PY, ("-c", "print('early')")))
    unrecorded = m.submit(OWNER, JobSpec(PY, ("-c", "import os, time\nwhile not os.path.exists('go'): "
                                                  "time.sleep(0.05)")))

    def release():
        for job in (waiter, unrecorded):
            (m.jobs_dir / job.key / "go").touch()
    wait_until(lambda: all(m.store.get(j.key).state == JobState.ACTIVE for j in (waiter, lost, unrecorded)))
    wait_final(m, finished.key)
    staging = m.submit(OWNER, JobSpec("true", stage_in=(StageIn("staged:absent", "x"),)))   # never runs a program
    wait_final(m, staging.key)
    m.close()                                          # the service goes away; its jobs' supervisors do not
    from services.jobs.store import JobStore
    store = JobStore(state / "jobs.sqlite")            # as if it died while staging this one in
    store.db.conn().execute("UPDATE jobs SET state = 'StageIn', ended = NULL WHERE key = ?", (staging.key,))
    # as if it died after starting this one's program but before recording it
    store.db.conn().execute("UPDATE jobs SET state = 'StageIn', pid = NULL, started = NULL WHERE key = ?",
                            (unrecorded.key,))
    pid = store.get(lost.key).pid
    store.close()
    os.killpg(pid, signal.SIGKILL)                     # this one's supervisor dies with it: no exit status
    wait_until(lambda: proc_start_time(pid) is None)

    m2 = manager(state)
    try:
        assert m2.reconcile_report == {"reattached": 2, "finished": 0, "failed_interrupted": 1, "failed_lost": 1}
        assert m2.job(OWNER, waiter.key).state == JobState.ACTIVE
        assert m2.job(OWNER, unrecorded.key).state == JobState.ACTIVE      # found by its supervisor's record
        assert m2.job(OWNER, finished.key).state == JobState.DONE
        l, s = m2.job(OWNER, lost.key), m2.job(OWNER, staging.key)
        assert l.state == JobState.FAILED and l.failure.startswith("Lost:")
        assert {o.name for o in l.outputs} == {"stdout", "stderr"}     # what it wrote stays fetchable, verified
        assert s.state == JobState.FAILED and s.failure.startswith("Interrupted:")
        release()
        done = wait_final(m2, waiter.key)
        assert done.state == JobState.DONE and done.exit_code == 0 and m2.tail(OWNER, done, "stdout") == "released\n"
        assert wait_final(m2, unrecorded.key).state == JobState.DONE
    finally:
        release()
        shut(m2)


def test_without_the_privilege_for_a_pid_namespace_the_shim_falls_back_to_the_group_and_says_so():
    """The shim asked for a PID namespace but run as an unprivileged user (nobody), who may not make one: the
    program still runs and ends Done, what it left in its group still ends with it, and the exit status says
    the job ran in its process group only, with the host's /tmp and /dev/shm (no mount namespace either)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the shim as another user")
    work = Path(tempfile.mkdtemp(prefix="vmgrid-shim-nobody-", dir="/tmp"))     # pytest's tmp_path is root's only
    os.chmod(work, 0o777)
    try:
        _run_the_shim_as_nobody(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_the_shim_as_nobody(work: Path) -> None:
    import json
    import subprocess

    from services.jobs.runner import SHIM
    py = shutil.which("python3", path="/usr/bin:/bin")        # one nobody may run (the shim needs only the stdlib)
    if py is None:
        pytest.skip("no system python3")
    shim = work / "shim.py"
    shutil.copy(SHIM, shim)                                    # where nobody may read it
    program = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
               "while not __import__('os').path.exists('child.pid'): pass")
    spec = {"argv": [py, "-c", program], "cwd": str(work), "env": {"PATH": "/usr/bin:/bin"}, "stdin": None,
            "stdout": str(work / "out"), "stderr": str(work / "err"), "status": str(work / "exit.json"),
            "max_output": 1000, "pid_namespace": True, "tmp_size": 1048576, "keep": str(work)}
    (work / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([py, "-I", str(shim), str(work / "spec.json")], cwd=work, start_new_session=True,
                          user=65534, group=65534, timeout=120)
    assert done.returncode == 0
    status = json.loads((work / "exit.json").read_text())
    assert status["exit"] == 0, (work / "err").read_text()
    assert status["isolation"].startswith("process group only: ")
    assert status["tmp"] == "shared with the host: Operation not permitted"       # no mount namespace either
    child = (work / "child.pid").read_text()
    wait_until(lambda: host_pid(child) is None)              # the group kill still ended the child


needs_pids_cgroup = pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys/fs/cgroup").is_dir(),
                                       reason="a pids cgroup per job needs root and a cgroup hierarchy")

# forks children that wait on a pipe until a fork is refused, says how many it got, then holds them until the
# file 'go' appears in its directory (the test's signal), so that another job runs while the bomb holds its share
FORK_BOMB = """
import os, time
r, w = os.pipe()
n = 0
while True:
    try:
        pid = os.fork()
    except OSError as exc:
        print('refused after', n, exc.strerror, flush=True)
        break
    if pid == 0:
        os.read(r, 1)
        os._exit(0)
    n += 1
    if n > 1000:
        print('never refused', flush=True)
        break
while not os.path.exists('go'):
    time.sleep(0.05)
os.close(w)
"""


@needs_pids_cgroup
def test_a_fork_bomb_has_its_forks_refused_while_another_job_and_the_service_keep_working(tmp_path):
    m = manager(tmp_path / "s", max_processes=32)
    try:
        assert m.pids_cgroup is not None, m.processes_unbounded
        bomb = m.submit(OWNER, JobSpec(PY, ("-c", FORK_BOMB)))
        out = m.jobs_dir / bomb.key / "stdout"
        said = wait_until(lambda: out.is_file() and out.read_text())
        assert said.startswith("refused after "), said
        forks = int(said.split()[2])
        assert 0 < forks < 32                        # the bound counts the init and the program too
        cgroup = m.pids_cgroup / bomb.key
        assert int((cgroup / "pids.current").read_text()) <= 32
        # the parent waits for its child: a job's leftovers end with it, and a child that had not printed yet when
        # the parent exited was ended unheard (seen under load: ['parent'])
        other = m.submit(OWNER, JobSpec(PY, ("-c", "import os; pid = os.fork(); print(pid and 'parent' or 'child', "
                                                  "flush=True); pid and os.waitpid(pid, 0)")))
        done = wait_final(m, other.key)
        assert done.state == JobState.DONE
        assert sorted((m.jobs_dir / other.key / "stdout").read_text().split()) == ["child", "parent"]
        (m.jobs_dir / bomb.key / "go").write_text("")
        assert wait_final(m, bomb.key).state == JobState.DONE
        assert not cgroup.exists()                   # removed when the job ended
    finally:
        shut(m)


def test_without_a_pids_cgroup_hierarchy_the_jobs_processes_are_unbounded_and_the_status_says_so(tmp_path):
    m = manager(tmp_path / "s", pids_cgroup=str(tmp_path / "no-cgroups"))
    try:
        assert m.pids_cgroup is None and "no pids cgroup hierarchy" in m.processes_unbounded
        job = m.submit(OWNER, JobSpec(PY, ("-c", "print('ran')")))
        assert wait_final(m, job.key).state == JobState.DONE
        import json
        status = json.loads((m.control_dir / job.key / "exit.json").read_text())
        assert status["processes"].startswith("unbounded: ") and "no pids cgroup hierarchy" in status["processes"]
    finally:
        shut(m)


def test_a_job_writing_one_file_past_the_quota_is_stopped_by_the_kernel_with_the_reason(tmp_path):
    m = manager(tmp_path / "s", staging_quota=1 << 20)
    try:
        job = m.submit(OWNER, JobSpec("/bin/sh", ("-c", "echo before; exec head -c 3000000 /dev/zero > big")))
        done = wait_final(m, job.key)
        assert done.state == JobState.FAILED
        assert "wrote a file past 1048576 bytes" in done.failure and "staging_quota" in done.failure
        assert (m.jobs_dir / job.key / "big").stat().st_size == 1 << 20
        assert (m.jobs_dir / job.key / "stdout").read_text() == "before\n"
        assert {o.name: o.size for o in done.outputs} == {"stdout": 7, "stderr": 0}     # fetchable, verified
    finally:
        shut(m)


@pytest.mark.parametrize("program", [
    ("/bin/sh", ("-c", "head -c 3000000 /dev/zero > big")),                  # the shell exits 128+SIGXFSZ
    (PY, ("-c", "open('big', 'wb').write(bytes(3000000))")),                # Python: "File too large", status 1
], ids=["shell", "python"])
def test_a_program_whose_child_hit_the_per_file_bound_is_told_so(tmp_path, program):
    """Trial U2: only a top program killed by SIGXFSZ was told of the quota; a shell running the writer ended
    "with status 153", a Python program "with status 1", neither naming the bound."""
    m = manager(tmp_path / "s", staging_quota=1 << 20)
    try:
        job = m.submit(OWNER, JobSpec(program[0], program[1]))
        done = wait_final(m, job.key)
        assert done.state == JobState.FAILED
        assert "exited with status" in done.failure
        assert "reached the job's per-file bound of 1048576 bytes, [jobs] staging_quota" in done.failure
    finally:
        shut(m)


def test_a_program_failing_otherwise_is_not_told_of_the_file_bound(tmp_path):
    m = manager(tmp_path / "s", staging_quota=1 << 20)
    try:
        job = m.submit(OWNER, JobSpec("/bin/sh", ("-c", "echo nothing wrong with files >&2; exit 3")))
        done = wait_final(m, job.key)
        assert done.failure == "the program exited with status 3"
    finally:
        shut(m)


# writes 256 KiB files (each under the per-file bound) up to 64 MiB, 16 times the quota: only the check of the
# whole directory stops it before
FILLER = """
import os
print('filling', flush=True)
for i in range(256):
    with open(f'part{i}', 'wb') as f:
        f.write(os.urandom(1 << 18))
        f.flush()
        os.fsync(f.fileno())
"""


def test_a_job_whose_directory_outgrows_the_quota_is_killed_with_the_reason_and_nothing_else_is_lost(tmp_path):
    m = manager(tmp_path / "s", staging_quota=4 << 20, sweep_interval=0.2)
    try:
        kept = m.submit(OWNER, JobSpec(PY, ("-c", "open('result', 'w').write('42')")))
        assert wait_final(m, kept.key).state == JobState.DONE
        job = m.submit(OWNER, JobSpec(PY, ("-c", FILLER)))
        done = wait_final(m, job.key)
        assert done.state == JobState.FAILED, done
        assert "past its quota of 4194304 bytes ([jobs] staging_quota)" in done.failure
        assert (m.jobs_dir / job.key / "stdout").read_text() == "filling\n"          # the job's own files stay
        assert (m.jobs_dir / kept.key / "result").read_text() == "42"                  # another job's too
        again = m.submit(OWNER, JobSpec(PY, ("-c", "print('still working')")))
        assert wait_final(m, again.key).state == JobState.DONE
    finally:
        shut(m)


# The init's first moments (shim.start_init): a SIGTERM arriving after the fork but before the init's handler is
# installed. The forked init sends it to itself at that very point (so no timing luck is involved), then runs as
# usual; the program must get it (exit -15), not run on to its end (exit 0) as when the signal was lost.
SIGTERM_IN_THE_WINDOW = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import shim
signal.signal(signal.SIGTERM, lambda signum, frame: None)      # the shim's own handler, as in shim.main
r, w = os.pipe()
def body():
    os.close(r)
    os.kill(os.getpid(), signal.SIGTERM)                          # in the window
    shim.run_init([sys.executable, '-c', 'import time; time.sleep(60)'], '.', {}, None, 1, 2, w)
pid = shim.start_init(body)
os.close(w)
os.waitpid(pid, 0)
print(os.read(r, 1000).decode())
"""


def test_a_sigterm_between_the_inits_fork_and_its_handler_reaches_the_program():
    from services.jobs.runner import SHIM
    import json
    import subprocess
    done = subprocess.run([PY, "-c", SIGTERM_IN_THE_WINDOW, str(SHIM.parent)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"exit": -signal.SIGTERM}


def test_gsiftp_staging_needs_the_submitters_own_delegated_proxy_and_is_moved_with_it(jobs, grid_pki):
    """attack12 G7: a job's gsiftp:// files were moved with the service's host credential, a node to the site's
    policy (alice's job fetched bob's image). They are moved as the submitter: a submit without her delegated proxy
    (an older client), with someone else's, or with one for another key is refused, typed, and nothing is recorded;
    a limited one is taken for stage-ins and stage-outs alike. The proxy kept is hers, for this service's key."""
    spec = JobSpec(PY, ("-c", "pass"), stage_in=(StageIn("gsiftp://127.0.0.1:1/images/x", "x"),))
    out = JobSpec(PY, ("-c", "pass"), stage_out=(StageOut("x", "gsiftp://127.0.0.1:1/results/x"),))
    with pytest.raises(InvalidArgument, match="update your vmgrid client") as exc:
        jobs.submit(OWNER, spec)
    assert exc.value.argument == "delegatedProxy"
    with pytest.raises(InvalidArgument, match="update your vmgrid client"):
        jobs.submit(OWNER, out)
    with pytest.raises(InvalidArgument, match=f"of {grid_pki.bob.dn}, not of the caller {OWNER}"):
        jobs.submit(OWNER, spec, delegated(grid_pki, grid_pki.bob))
    from security.delegation import delegate
    other = grid_pki.issue_host("elsewhere.example.org")
    with pytest.raises(InvalidArgument, match="not issued for this node's key"):
        jobs.submit(OWNER, spec, delegate(grid_pki.alice.proxy, other.certificate))
    from security.pki import make_proxy
    limited = make_proxy(grid_pki.alice.credential, limited=True, key=grid_pki.keys.take())
    assert jobs.store.list() == [] and list(jobs.jobs_dir.iterdir()) == []
    # ftp:// (anonymous) and staged: files need none; a limited proxy may fetch, and send
    assert jobs.submit(OWNER, JobSpec(PY, ("-c", "pass"))).state == JobState.PENDING
    sends = jobs.submit(OWNER, out, delegate(limited, grid_pki.host.certificate))
    assert wait_final(jobs, sends.key).failure == "the program exited with status 0, but output x was not produced"
    job = jobs.submit(OWNER, spec, delegate(limited, grid_pki.host.certificate))
    done = wait_final(jobs, job.key)        # port 1: nothing listens; it was tried as alice
    assert done.state == JobState.FAILED and "stage-in failed: gsiftp://127.0.0.1:1/images/x" in done.failure
    # an ended job moves no more files: the proxy is not kept past it (what is kept while it lives:
    # tests/integration/test_jobs_delegation.py, kept_proxy)
    assert not (jobs.control_dir / job.key / "delegated-proxy.pem").exists()


def test_a_stager_never_moves_a_gsiftp_file_with_its_own_credential(tmp_path, grid_pki):
    stager = Stager(grid_pki.host, grid_pki.trust(), tmp_path / "staging")
    with pytest.raises(StagingError, match="no delegated proxy"):
        stager.fetch("gsiftp://127.0.0.1:1/x", tmp_path / "x", OWNER, None, lambda n: None)
    with pytest.raises(StagingError, match="no delegated proxy"):
        stager.send(tmp_path / "x", "gsiftp://127.0.0.1:1/x", "0" * 64, lambda n: None)
