"""The test suite's own hygiene: a killed run's job processes are killed when the next run starts
(tests/fixtures/leftovers.py), and a run alive beside it keeps its jobs."""

import os
import subprocess

import pytest

from tests.fixtures.leftovers import kill_leftover_job_processes, leftover_job_processes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a process under another uid needs root")


def _job_like(cwd, uid):
    # chdir happens before the uid changes (subprocess), so the basetemp's 0700 directories do not matter
    return subprocess.Popen(["sleep", "300"], cwd=cwd, user=uid, group=uid)


def test_a_dead_runs_job_is_killed_and_a_living_runs_job_is_kept(tmp_path, monkeypatch):
    root = tmp_path / "pytest-of-root"
    dead = root / "pytest-7" / "test_x0" / "jobs" / "work"
    alive = root / "pytest-8" / "test_y0" / "jobs" / "work"
    dead.mkdir(parents=True)
    alive.mkdir(parents=True)
    (root / "pytest-8" / ".lock").write_text(str(os.getpid()))      # this process stands for the living run
    procs = {name: _job_like(cwd, uid) for name, cwd, uid in
             [("dead", dead, 65001), ("alive", alive, 65002), ("not-a-job-uid", dead, 1)]}
    try:
        found = leftover_job_processes(str(root))
        assert procs["dead"].pid in found
        assert procs["alive"].pid not in found
        assert procs["not-a-job-uid"].pid not in found
        (root / "pytest-8" / ".lock").write_text("999999999")            # that run has ended now
        assert procs["alive"].pid in leftover_job_processes(str(root))
        monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
        killed = kill_leftover_job_processes(str(root))
        assert set(killed) == {procs["dead"].pid, procs["alive"].pid}
        assert procs["dead"].wait(timeout=60) == -9
        assert procs["alive"].wait(timeout=60) == -9
        assert procs["not-a-job-uid"].poll() is None
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
