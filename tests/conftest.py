"""Shared pytest configuration: fixtures every tier uses (a grid PKI, a running VMRepository)."""

import runpy
from pathlib import Path

pytest_plugins = ["tests.fixtures.pki", "tests.fixtures.repository", "tests.fixtures.grid"]

# One ast.parse at a time on CPython 3.11 before 3.11.8 (gh-106905), for the whole suite: a failing test's report
# crashed with INTERNALERROR while another thread logged an exception. The guard and its story are in
# tests/unit/jobs/conftest.py (standalone: its regression test copies it); running it twice changes nothing.
runpy.run_path(str(Path(__file__).parent / "unit" / "jobs" / "conftest.py"))

# Each test process (each xdist worker) has a registry of job services' uid ranges of its own (services/jobs/uids.py),
# inherited by the `vmgrid serve` it starts: the host's /var/lib/vmgrid/job-uids would make the job services of
# test runs side by side (other workers, other checkouts) refuse each other's default range.
def _uid_registry():
    import atexit
    import os
    import shutil
    import tempfile

    os.environ["VMGRID_JOB_UID_REGISTRY"] = path = tempfile.mkdtemp(prefix="vmgrid-job-uids-")
    atexit.register(shutil.rmtree, path, True)


_uid_registry()


# Job processes an earlier, killed test run left behind are killed first (tests/fixtures/leftovers.py says why).
def pytest_sessionstart(session):
    from tests.fixtures.leftovers import kill_leftover_job_processes

    kill_leftover_job_processes()


# The QEMU tier's guest images are built in the background while the other tiers run (tests/vm/prebuild.py):
# the debootstrap and the apt layers take minutes, mostly waiting on downloads and dpkg, and the tests in
# tests/vm come last. VMGRID_TEST_PREBUILD=0 turns it off.
_prebuild = {}


def pytest_collection_finish(session):
    import os
    import subprocess
    import sys
    from pathlib import Path

    if session.config.option.collectonly or os.environ.get("VMGRID_TEST_PREBUILD") == "0" or os.geteuid() != 0:
        return
    vm_dir = Path(__file__).parent / "vm"
    if not any(Path(str(item.fspath)).parent == vm_dir for item in session.items):
        return
    log_dir = Path(__file__).resolve().parents[1] / "var" / "guest-image"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / "prebuild.log", "w")
    _prebuild["proc"] = subprocess.Popen([sys.executable, str(vm_dir / "prebuild.py")], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _prebuild["log"] = log


def pytest_sessionfinish(session):
    import os
    import signal
    import subprocess

    proc = _prebuild.pop("proc", None)
    if proc is None:
        return
    if proc.poll() is None:             # the QEMU tests did not run (stopped early, -x): stop the builder
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _prebuild.pop("log").close()
