"""What bounds a job service's jobs together, with real jobs of a real job service (jobiso14): [jobs] memory_total
bounds the memory of all of them (one memory cgroup of the service's holding the jobs'; the job the kernel kills
there fails naming the key), the jobs' pids cgroups sit inside the service's own (a bound on the service covers
its jobs), and [jobs] network = "none" gives each job a network of its own with only loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.jobs import runner
from services.jobs.shim import remove_cgroup
from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_job_isolation import EAT, MiB, needs_memory_cgroup
from tests.unit.jobs.test_manager import OWNER, PY, manager, shut, wait_final, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")
SERVICE = Path(__file__).with_name("job_service_process.py")      # the service's core in a process of its own
# allocates (and touches) ``n`` MiB, says so, and holds it until the file "go" appears in its directory
HOLD = ("import os, sys, time\nheld = b'x' * (int(sys.argv[1]) << 20)\nprint('holding', flush=True)\n"
        "while not os.path.exists('go'):\n    time.sleep(0.05)\nprint('released')\n")


@needs_memory_cgroup
def test_the_jobs_together_stay_within_memory_total_and_the_job_killed_there_fails_naming_it(tmp_path):
    """[jobs] memory_limit = 256 MiB each, memory_total = 160 MiB: one job holds 32 MiB, a second allocates up to
    512 MiB, 32 MiB at a time. Each alone is within its own limit; together they reach the total, and the kernel
    kills the largest (the second) there, before it reaches its own limit: it fails naming memory_total, the first
    lives on and is Done. (Without the total the second grew to its own 256 MiB.)"""
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
        assert done.failure == ("the program was killed by the kernel, out of memory: this job service's jobs "
                                f"together used more than their memory total of {160 * MiB} bytes ([jobs] "
                                f"memory_total)"), eaten
        assert "survived" not in eaten and int(eaten.split()[-1]) <= 128, eaten
        status = json.loads((m.control_dir / eater.key / "exit.json").read_text())
        assert status["memory"] == f"1 process killed past the jobs' total of {160 * MiB} bytes", status
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
        assert m.memory.parent is not None and m.memory.for_job("k")["memory_limits"] == [], m.memory
        done = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", EAT, "512"))).key)
        assert done.state == JobState.FAILED and done.failure.endswith(
            f"more than their memory total of {96 * MiB} bytes ([jobs] memory_total)"), done.failure
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
