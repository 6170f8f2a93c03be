"""What bounds a job service's jobs together, with real jobs of a real job service (jobiso14): [jobs] memory_total
bounds the memory of all of them (one memory cgroup of the service's holding the jobs'; the job the kernel kills
there fails naming the key), the jobs' pids cgroups sit inside the service's own (a bound on the service covers
its jobs), and [jobs] network = "none" gives each job a network of its own with only loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.jobs import runner
from services.jobs.shim import remove_cgroup
from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_job_isolation import EAT, MiB, needs_memory_cgroup
from tests.unit.jobs.test_manager import ADMIN, OWNER, PY, manager, shut, wait_final, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")
SERVICE = Path(__file__).with_name("job_service_process.py")      # the service's core in a process of its own
# allocates (and touches) ``n`` MiB, says so, and holds it until the file "go" appears in its directory
HOLD = ("import os, sys, time\nheld = b'x' * (int(sys.argv[1]) << 20)\nprint('holding', flush=True)\n"
        "while not os.path.exists('go'):\n    time.sleep(0.05)\nprint('released')\n")


def total_killed(total: int) -> str:
    """The start of the failure of a job the service killed at the jobs' ``total`` (MemoryWatch)."""
    return ("the program was killed by the job service, out of memory: this job service's jobs together reached "
            f"their memory total of {total} bytes ([jobs] memory_total), and this job held the most of it (")


@needs_memory_cgroup
def test_the_jobs_together_stay_within_memory_total_and_the_job_killed_there_fails_naming_it(tmp_path):
    """[jobs] memory_limit = 256 MiB each, memory_total = 160 MiB: one job holds 32 MiB, a second allocates up to
    512 MiB, 32 MiB at a time. Each alone is within its own limit; together they reach the total, and the service
    kills the one holding the most of it (the second) there, before it reaches its own limit: it fails naming
    memory_total, the first lives on and is Done. (Without the total the second grew to its own 256 MiB.) On
    cgroup v1 the kernel kills nobody at the total (MemoryWatch), so it is the service's choice; on v2 the kernel's
    kill at the total is the backstop, the same job either way."""
    m = manager(tmp_path / "state", memory_limit=256 * MiB, memory_total=160 * MiB)
    try:
        assert m.memory.why_not is None and (m.memory.limit, m.memory.total) == (256 * MiB, 160 * MiB), m.memory
        parent = m.memory.parent
        assert parent.name == runner.service_cgroup_name(m.state_dir)
        limit_file = "memory.limit_in_bytes" if (parent / "memory.limit_in_bytes").exists() else "memory.max"
        assert int((parent / limit_file).read_text()) == 160 * MiB
        holder = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", HOLD, "32")))
        out = m.jobs_dir / holder.key / "stdout"
        wait_until(lambda: (out.exists() and "holding" in out.read_text()) or m.store.get(holder.key).final)
        assert m.memory.cgroup(holder.key).is_dir()                 # in the service's memory cgroup
        assert int((m.memory.cgroup(holder.key) / limit_file).read_text()) == 256 * MiB
        eater = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", EAT, "512")))
        done = wait_final(m, eater.key)
        eaten = (m.jobs_dir / eater.key / "stdout").read_text()
        assert done.state == JobState.FAILED, (done.failure, eaten)
        kernel = ("the program was killed by the kernel, out of memory: this job service's jobs together used more "
                  f"than their memory total of {160 * MiB} bytes ([jobs] memory_total)")
        assert done.failure.startswith(total_killed(160 * MiB)) or (not m.memory_watch.v1 and done.failure == kernel), \
            (done.failure, eaten)
        assert "survived" not in eaten and int(eaten.split()[-1]) <= 128, eaten
        status = json.loads((m.control_dir / eater.key / "exit.json").read_text())
        assert status["memory"] in (f"{n} process{'es' if n > 1 else ''} killed past the jobs' total of {160 * MiB} "
                                    "bytes" for n in (1, 2)), status        # the kernel's: 1; the service's: all
        (m.jobs_dir / holder.key / "go").write_text("")
        held = wait_final(m, holder.key)
        assert held.state == JobState.DONE and out.read_text() == "holding\nreleased\n", held.failure
        assert not m.memory.cgroup(holder.key).exists() and not m.memory.cgroup(eater.key).exists()
    finally:
        shut(m)
    assert not parent.exists()                 # the service's own goes when it stops with no job left


@needs_memory_cgroup
def test_without_a_limit_of_each_job_the_total_still_bounds_them(tmp_path):
    """memory_limit = 0 (no bound of each job's own) and memory_total = 96 MiB: a job past the total is killed
    there and fails naming memory_total."""
    m = manager(tmp_path / "state", memory_limit=0, memory_total=96 * MiB)
    try:
        assert m.memory.parent is not None and m.memory.for_job("k")["memory_limits"] in (
            [], [("memory.oom_control", "0")]), m.memory          # v1: the kernel's choice at a job's own limit
        done = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", EAT, "512"))).key)
        assert done.state == JobState.FAILED and (done.failure.startswith(total_killed(96 * MiB)) or done.failure.endswith(
            f"more than their memory total of {96 * MiB} bytes ([jobs] memory_total)")), done.failure
    finally:
        shut(m)


THREADS = ("import threading\nstop = threading.Event()\nn = 0\ntry:\n    for _ in range(80):\n"
           "        threading.Thread(target=stop.wait).start()\n        n += 1\nexcept RuntimeError as exc:\n"
           "    print('refused', exc)\nprint('threads', n)\nstop.set()\n"
           "print([l.split(':')[2] for l in open('/proc/self/cgroup').read().splitlines() if ':pids:' in l][0])\n")


@pytest.mark.skipif(not Path("/sys/fs/cgroup/pids/cgroup.procs").exists(), reason="no cgroup v1 pids hierarchy")
def test_on_cgroup_v1_the_jobs_pids_cgroups_are_inside_the_services_own(tmp_path):
    """A job service started in a pids cgroup of at most 50 processes (as an operator or systemd's TasksMax bounds
    it): its jobs' pids cgroups are made inside it (its vmgrid-jobs-…), so that bound covers them too. A job
    starting 80 threads (its own max_processes: 256) gets the ones past the service's bound refused. (Before, they
    were made at the hierarchy's root, out of the service's bound: all 80 started.)"""
    name = f"vmgrid-test-{uuid.uuid4().hex[:12]}"
    service = Path("/sys/fs/cgroup/pids") / runner.own_cgroup_v1("pids").lstrip("/") / name
    service.mkdir()
    try:
        (service / "pids.max").write_text("50")
        state = tmp_path / "state"
        proc = subprocess.run([sys.executable, str(SERVICE), str(state), "{}", json.dumps(["-c", THREADS])],
                              capture_output=True, text=True, timeout=120,
                              preexec_fn=lambda: (service / "cgroup.procs").write_text("0"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        ended = json.loads(proc.stdout.splitlines()[-1])
        out = ended["stdout"].splitlines()
        assert ended["state"] == "Done", ended
        assert out[0].startswith("refused") and int(out[1].split()[1]) < 50, out
        own = "/" + str(service.relative_to("/sys/fs/cgroup/pids")).lstrip("/")
        assert out[-1].startswith(f"{own}/{runner.service_cgroup_name(state)}/"), out
        assert ended["pids"] == str(service / runner.service_cgroup_name(state)), ended
        assert not list(p for p in service.iterdir() if p.is_dir())       # the job's and the service's are gone
    finally:
        remove_cgroup(str(service))


# serves an abstract Unix socket and a TCP port on 127.0.0.1, writes the port to "port", answers each connection
LISTEN = ("import os, socket, threading\n"
          "u = socket.socket(socket.AF_UNIX); u.bind('\\0' + os.environ['NAME']); u.listen(4)\n"
          "t = socket.socket(); t.bind(('127.0.0.1', 0)); t.listen(4)\n"
          "def serve(s):\n    while True:\n        c, _ = s.accept(); c.sendall(b'hello'); c.close()\n"
          "for s in (u, t):\n    threading.Thread(target=serve, args=(s,), daemon=True).start()\n"
          "open('port.tmp', 'w').write(str(t.getsockname()[1])); os.rename('port.tmp', 'port')\n"
          "import time\nwhile not os.path.exists('go'):\n    time.sleep(0.05)\n")
# tries the other job's abstract socket and port, then a listener of its own on its loopback
CONNECT = ("import os, socket, sys\n"
           "def ask(family, address):\n    s = socket.socket(family)\n    try:\n        s.connect(address)\n"
           "        return s.recv(5).decode()\n    except OSError as exc:\n        return exc.strerror\n"
           "print('unix', ask(socket.AF_UNIX, '\\0' + os.environ['NAME']))\n"
           "print('tcp', ask(socket.AF_INET, ('127.0.0.1', int(sys.argv[1]))))\n"
           "own = socket.socket(); own.bind(('127.0.0.1', 0)); own.listen(1)\n"
           "socket.create_connection(own.getsockname(), timeout=10); print('own connected')\n")


@pytest.mark.parametrize("network", ["host", "none"])
def test_a_job_in_a_network_of_its_own_reaches_no_other_jobs_abstract_socket_nor_localhost_port(tmp_path, network):
    """A job listens on an abstract Unix socket and a port of 127.0.0.1 (no permission guards either: any local
    account reaches them). [jobs] network = "host" (the default): another job (another uid) connects to both.
    "none": each job has a network namespace of its own with only loopback: the other job reaches neither, and its
    own loopback works."""
    m = manager(tmp_path / "state") if network == "host" else manager(tmp_path / "state", network=network)
    name = f"vmgrid-test-{uuid.uuid4().hex}"
    try:
        server = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", LISTEN), environment=(("NAME", name),)))
        port_file = m.jobs_dir / server.key / "port"
        wait_until(lambda: port_file.exists() or m.store.get(server.key).final)
        client = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", CONNECT, port_file.read_text()),
                                                       environment=(("NAME", name),))).key)
        out = (m.jobs_dir / client.key / "stdout").read_text()
        assert client.state == JobState.DONE, (client.failure, out, (m.jobs_dir / client.key / "stderr").read_text())
        if network == "host":
            assert out == "unix hello\ntcp hello\nown connected\n", out
        else:
            assert out == "unix Connection refused\ntcp Connection refused\nown connected\n", out
        (m.jobs_dir / server.key / "go").write_text("")
        assert wait_final(m, server.key).state == JobState.DONE
    finally:
        shut(m)


def test_a_network_setting_that_means_nothing_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match=r'^\[jobs\] network = \'private\': "host" \(.*\) or "none" \('):
        manager(tmp_path / "state", network="private")
    assert not (tmp_path / "state").exists()


# writes up to ``n`` MiB into its private /tmp (tmpfs: charged to the job's cgroup, in no process's RSS; a write the
# total refuses ends it), says how much, and waits for the file "go" in its directory
FILL_TMP = ("import os, sys, time\nn = 0\ntry:\n    with open('/tmp/fill', 'wb') as f:\n"
            "        for _ in range(int(sys.argv[1])):\n            f.write(b'\\1' * (1 << 20))\n            f.flush()\n"
            "            n += 1\nexcept OSError as exc:\n    print('refused', exc.strerror, flush=True)\n"
            "print('filled', n, flush=True)\nwhile not os.path.exists('go'):\n    time.sleep(0.05)\nprint('released')\n")
# ``n`` MiB held by 8 processes (each less than the other job's 60 MiB), then as FILL_TMP; each lowers its own
# oom_score_adj as far as it may (refused below what root set: 0)
FILL_MANY = ("import os, sys, time\nn = int(sys.argv[1]) // 8\nfor _ in range(7):\n    if os.fork() == 0:\n"
             "        break\ntry:\n    open('/proc/self/oom_score_adj', 'w').write('-1000')\nexcept OSError:\n"
             "    pass\nheld = b'x' * (n << 20)\ntime.sleep(1)\nprint('filled', flush=True)\n"
             "while not os.path.exists('go'):\n    time.sleep(0.05)\nprint('released')\n")


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@needs_memory_cgroup
@pytest.mark.parametrize("fill", [FILL_TMP, FILL_MANY], ids=["tmpfs", "many-processes"])
def test_at_the_total_the_job_holding_the_most_goes_not_the_largest_process(tmp_path, fill):
    """attack15 H2: memory_total = 128 MiB, no limit of each job's own. The owner's job writes 88 MiB into its /tmp
    (tmpfs: in its cgroup, in no process's RSS) and waits; then the admin's allocates 60 MiB, which reaches the
    total. The kernel alone killed the admin's (the largest process), blamed for the total, and the filler was Done;
    the service kills the job holding the most of the total, the filler, naming memory_total, its /tmp's pages are
    given back, and the admin's gets its 60 MiB and is Done. The same with the filler's memory in 8 processes of 11
    MiB, each trying to lower its oom_score_adj. Deterministic on cgroup v1: at the total the kernel kills nobody
    (oom_kill_disable), the admin's process waits there until the service has chosen."""
    m = manager(tmp_path / "state", memory_limit=0, memory_total=128 * MiB, tmp_size=256 * MiB)
    try:
        assert m.memory.parent is not None and m.memory.total == 128 * MiB and m.memory_watch is not None, m.memory
        filler = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", fill, "88")))
        fout = m.jobs_dir / filler.key / "stdout"
        wait_until(lambda: "filled" in read(fout) or m.store.get(filler.key).final)
        assert "filled" in read(fout) and "refused" not in read(fout), (read(fout), m.store.get(filler.key).failure)
        holder = m.submit(ADMIN, JobSpec(executable=PY, arguments=("-c", HOLD, "60")))
        out = m.jobs_dir / holder.key / "stdout"
        wait_until(lambda: "holding" in read(out) or m.store.get(holder.key).final)
        assert read(out) == "holding\n" and m.store.get(holder.key).state == JobState.ACTIVE, (
            read(out), m.store.get(holder.key).failure)         # the admin's job got its memory and lives on
        done = wait_final(m, filler.key)
        assert done.state == JobState.FAILED and done.exit_code == -9, (done.state, done.failure, read(fout))
        assert done.failure.startswith(total_killed(128 * MiB)), done.failure
        assert "released" not in read(fout)
        events = m.resource_bounds(m.store.get(filler.key))
        assert [(e.resource, e.setting, e.bound) for e in events if e.acted] == [
            ("memory", "memory_total", 128 * MiB)], events
        assert m.store.get(holder.key).state == JobState.ACTIVE
        (m.jobs_dir / holder.key / "go").write_text("")
        held = wait_final(m, holder.key)
        assert held.state == JobState.DONE and read(out) == "holding\nreleased\n", held.failure
    finally:
        shut(m)
    assert m.memory_watch.guard is None       # stopped with the service: its guard ended too


@needs_memory_cgroup
def test_a_job_alone_past_its_own_limit_just_below_the_total_is_told_its_limit(tmp_path):
    """With memory_limit 16 MiB below memory_total (as both "auto" are) a job alone that takes all it can is killed
    by the kernel at its own limit and told so: on cgroup v1 its own cgroup has oom_kill_disable 0 (it would
    inherit the service's 1 and wait there for ever); on v2 the service's point of choice lies above its limit."""
    m = manager(tmp_path / "state", memory_limit=96 * MiB, memory_total=112 * MiB)
    try:
        assert m.memory_watch is not None and 96 * MiB < m.memory_watch.threshold <= 112 * MiB, m.memory_watch
        done = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", EAT, "512"))).key)
        assert done.state == JobState.FAILED and done.failure == (
            "the program was killed by the kernel, out of memory: the job used more than its memory limit of "
            f"{96 * MiB} bytes ([jobs] memory_limit)"), done.failure
    finally:
        shut(m)


def armed(parent: Path) -> bool:
    """Whether the service chooses at the total: v1 oom_kill_disable 1, v2 a memory.high."""
    if (parent / "memory.oom_control").exists():
        return "oom_kill_disable 1" in (parent / "memory.oom_control").read_text()
    return (parent / "memory.high").read_text().strip() != "max"


@needs_memory_cgroup
def test_a_watch_that_fails_gives_the_choice_back_to_the_kernel(tmp_path, monkeypatch):
    """The watch's choice raises (a bug, a file it cannot read): nothing waits at the total for ever, the kernel
    kills there as without the watch (on v1 the job would otherwise wait for ever: oom_kill_disable 1)."""
    def broken(self):
        raise RuntimeError("broken")
    monkeypatch.setattr(runner.MemoryWatch, "check", broken)
    m = manager(tmp_path / "state", memory_limit=0, memory_total=64 * MiB)
    try:
        assert armed(m.memory.parent)
        done = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", EAT, "512"))).key)
        assert done.state == JobState.FAILED and done.failure == (
            "the program was killed by the kernel, out of memory: this job service's jobs together used more than "
            f"their memory total of {64 * MiB} bytes ([jobs] memory_total)"), done.failure
        assert not armed(m.memory.parent) and not m.memory_watch._thread.is_alive()
    finally:
        shut(m)


@needs_memory_cgroup
def test_a_guard_killed_is_replaced_and_the_watch_armed_again(tmp_path):
    m = manager(tmp_path / "state", memory_limit=0, memory_total=64 * MiB)
    try:
        first = m.memory_watch.guard
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: m.memory_watch.guard is not first and m.memory_watch.guard.poll() is None)
        assert first.poll() == -signal.SIGKILL and armed(m.memory.parent)
        assert m.memory_watch._thread.is_alive()
        done = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", EAT, "512"))).key)
        assert done.failure.startswith(total_killed(64 * MiB)) or not m.memory_watch.v1, done.failure
    finally:
        shut(m)
    assert first.poll() is not None and m.memory_watch.guard is None


# waits for the file "go" in its directory (having made "ready"), then allocates 32 MiB at a time as EAT
EAT_ON_GO = ("import os, time\nopen('ready', 'w').close()\nwhile not os.path.exists('go'):\n    time.sleep(0.05)\n"
             + EAT)


@pytest.mark.skipif(not Path(runner.MEMORY_V1, "cgroup.procs").exists(), reason="no cgroup v1 memory hierarchy")
def test_on_cgroup_v1_a_job_waiting_at_the_total_is_not_left_waiting_when_the_service_dies(tmp_path):
    """The service (its own process) is stopped (SIGSTOP: its watch cannot choose) and its job allocates past the
    total: on cgroup v1 the kernel kills nobody there (oom_kill_disable), the job waits. The service is then
    killed (SIGKILL): its guard reads the end of its pipe and gives the choice back to the kernel, which kills the
    job's process; its supervisor records it, failed naming memory_total."""
    state = tmp_path / "state"
    config = {"memory_limit": 0, "memory_total": 64 * MiB}
    service = subprocess.Popen([sys.executable, str(SERVICE), str(state), json.dumps(config),
                                json.dumps(["-c", EAT_ON_GO, "512"]), "--hold", "ready"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    parent = Path(runner.MEMORY_V1) / runner.own_cgroup_v1("memory").lstrip("/") / runner.service_cgroup_name(state)
    try:
        held = json.loads(service.stdout.readline())
        assert armed(parent)
        os.kill(service.pid, signal.SIGSTOP)
        (state / "jobs" / held["key"] / "go").write_text("")
        oom = parent / "memory.oom_control"
        assert wait_until(lambda: "under_oom 1" in oom.read_text()), oom.read_text()     # it waits at the total
        assert not (state / "control" / held["key"] / "exit.json").exists()
        service.kill()
        service.wait()
        status_path = state / "control" / held["key"] / "exit.json"
        assert wait_until(lambda: status_path.exists()), oom.read_text()
        status = json.loads(status_path.read_text())
        assert status["exit"] == -signal.SIGKILL and status["memory_killed"]["setting"] == "memory_total", status
        assert "oom_kill_disable 0" in oom.read_text()
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        if parent.exists():
            for child in parent.iterdir():
                if child.is_dir():
                    remove_cgroup(str(child))
            remove_cgroup(str(parent))
