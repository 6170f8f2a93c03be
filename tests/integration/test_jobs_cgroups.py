"""`vmgrid serve jobs` as a process, killed with SIGKILL together with its jobs' supervisors (as a process manager
that kills everything of the service does): the job cgroups they could not remove (pids, memory) are removed when
the service starts again, and any other left in the service's cgroups by its sweep; a service stopped with no job
left removes its own cgroups (jobiso14)."""
from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest

from client.localgrid import LocalGrid
from services.jobs import runner
from services.jobs.runner import proc_start_time
from tests.integration.test_jobs_cli import JOB_PY, start_jobs, vmgrid
from tests.integration.test_jobs_service import wait_until

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root"),
              pytest.mark.skipif(not Path("/sys/fs/cgroup/pids/cgroup.procs").exists()
                                 or not Path(f"{runner.MEMORY_V1}/cgroup.procs").exists(),
                                 reason="cgroup v1 pids and memory hierarchies (this machine's)")]


def job_cgroups(shim: int) -> list[Path]:
    """The pids and memory cgroups of the job whose supervisor is ``shim``: those of its init (the supervisor's
    child, which joined them before starting the program), from /proc/PID/cgroup."""
    with open(f"/proc/{shim}/task/{shim}/children") as f:
        init = int(f.read().split()[0])
    with open(f"/proc/{init}/cgroup") as f:
        paths = {c: line.rstrip("\n").split(":", 2)[2] for line in f for c in line.split(":")[1].split(",")}
    return [Path("/sys/fs/cgroup/pids") / paths["pids"].lstrip("/"),
            Path(runner.MEMORY_V1) / paths["memory"].lstrip("/")]


def test_a_job_services_cgroups_left_by_a_sigkill_are_removed_at_its_next_start_and_by_its_sweep(tmp_path):
    with LocalGrid(tmp_path / "grid") as grid:
        sp = start_jobs(grid)
        url = f"{sp.base_url}/wsrf/services/JobService"
        state = grid.root / "jobs" / "jobs"
        key = vmgrid(grid, "job", "submit", url, "--", JOB_PY, "-c",
                     "import os, time\nopen('ready', 'w').close()\nwhile True: time.sleep(1)").stdout.strip()
        wait_until(lambda: (state / "jobs" / key / "ready").exists())
        shim = json.loads((state / "control" / key / "shim.json").read_text())["pid"]
        cgroups = job_cgroups(shim)
        assert all(c.name.endswith(key) for c in cgroups), cgroups
        grid.stop("jobs", signal.SIGKILL)
        os.killpg(shim, signal.SIGKILL)          # the job's supervisor with it, before it could remove its cgroups
        wait_until(lambda: proc_start_time(shim) is None)
        assert all(c.is_dir() for c in cgroups)                   # left behind: before, for good

        start_jobs(grid, port=sp.port)
        status = json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)
        assert status["state"] == "Failed" and status["failure"].startswith("Lost: "), status
        assert not any(c.exists() for c in cgroups)               # removed at start
        parents = [c.parent for c in cgroups]                     # the service's own (vmgrid-jobs-…)
        assert all(p.name == runner.service_cgroup_name(state) for p in parents), parents
        stray = [p / f"job-{uuid.uuid4().hex}" for p in parents]  # a cgroup of no job (a crash at another moment)
        for p in stray:
            p.mkdir()
        wait_until(lambda: not any(p.exists() for p in stray))    # removed by the sweep
        grid.stop("jobs")                                         # no job left: the service's own cgroups go
        assert not any(p.exists() for p in parents)
