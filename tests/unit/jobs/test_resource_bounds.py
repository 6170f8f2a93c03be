"""What the service's bounds did to a job, published (the ResourceBounds property, services/jobs/bounds.py), with real
jobs of a real job service on this host's cgroups (trial14 U7): a program that exits 0 after the memory bound killed
one of its processes is Done with exit code 0, and only its ResourceBounds says a process was killed, past which
bound ([jobs] memory_limit, or memory_total), how many; output dropped past max_output and a bound the service ran
without are there too; a job whose program has not ended has none (nothing known)."""
from __future__ import annotations

import json
import os

import pytest
from lxml import etree

from services.jobs import wire
from services.jobs.bounds import BoundEvent, bound_events
from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_job_isolation import MiB, needs_memory_cgroup
from tests.unit.jobs.test_manager import OWNER, PY, manager, shut, wait_final, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")

# a child allocates 512 MiB and is killed past the bound; the program itself (the shell) says so and exits 0
CHILD_KILLED = ("/bin/sh", "-c", f"{PY} -c 'b = bytearray(512 << 20)'; echo child rc=$?; exit 0")


def rendered(m, job) -> etree._Element | None:
    """The ResourceBounds element the service's wire renders for the job now, as the client reads it (None: absent)."""
    view = wire.JobView(m.store.get(job.key), bounds=m.resource_bounds(m.store.get(job.key)))
    (el,) = wire.ResourceBounds().elements(view) or (None,)
    return el


@needs_memory_cgroup
@pytest.mark.parametrize("setting", ["memory_limit", "memory_total"])
def test_a_done_job_whose_child_the_memory_bound_killed_says_so_naming_the_bound(tmp_path, setting):
    """Before: Done, exit code 0, and nothing the job's reader could see said that a process was killed (only
    root's control/<key>/exit.json). Now its ResourceBounds holds one memory event: 1 process killed, the bound in
    bytes, the key that set it."""
    bounds = {"memory_limit": 96 * MiB, "memory_total": 0} if setting == "memory_limit" else \
        {"memory_limit": 0, "memory_total": 96 * MiB}
    m = manager(tmp_path / "state", **bounds)
    try:
        job = wait_final(m, m.submit(OWNER, JobSpec(CHILD_KILLED[0], CHILD_KILLED[1:])).key)
        out = (m.jobs_dir / job.key / "stdout").read_text()
        assert (job.state, job.exit_code, job.failure) == (JobState.DONE, 0, None), out
        assert out == "child rc=137\n"
        past = f"the jobs' total of {96 * MiB}" if setting == "memory_total" else str(96 * MiB)
        expected = BoundEvent("memory", f"1 process killed past {past} bytes ([jobs] {setting})", setting, 96 * MiB,
                              processes_killed=1)
        assert m.resource_bounds(job) == (expected,)
        el = rendered(m, job)
        assert el is not None and wire.ResourceBounds.parse(el) == [expected]
        assert el.findtext(f"{{{wire.JOB}}}event/{{{wire.JOB}}}processesKilled") == "1"
    finally:
        shut(m)


def test_output_dropped_past_max_output_is_an_event_and_a_job_within_every_bound_has_none(tmp_path):
    """[jobs] max_output = 1000: a job printing 5000 bytes keeps 1000, and its ResourceBounds says 4000 were dropped
    (its stdout tail alone did not tell: it is the end of what was kept); a job within every bound has an empty
    ResourceBounds (known: nothing happened); a running job has none (nothing known yet)."""
    m = manager(tmp_path / "state", max_output=1000)
    try:
        loud = wait_final(m, m.submit(OWNER, JobSpec(PY, ("-c", "print('x' * 4999)"))).key)
        assert loud.state == JobState.DONE and (m.jobs_dir / loud.key / "stdout").stat().st_size == 1000
        assert m.resource_bounds(loud) == (BoundEvent("stdout", "4000 bytes dropped past the first 1000 bytes ([jobs] "
                                                      "max_output)", "max_output", 1000, bytes_dropped=4000),)
        quiet = wait_final(m, m.submit(OWNER, JobSpec("true")).key)
        assert quiet.state == JobState.DONE and m.resource_bounds(quiet) == ()
        el = rendered(m, quiet)
        assert el is not None and len(el) == 0 and wire.ResourceBounds.parse(el) == []
        running = m.submit(OWNER, JobSpec(PY, ("-c", "import time; print('up', flush=True); time.sleep(300)")))
        out = m.jobs_dir / running.key / "stdout"
        wait_until(lambda: out.exists() and "up" in out.read_text())
        assert m.resource_bounds(m.store.get(running.key)) is None and rendered(m, running) is None
        m.cancel(OWNER, running.key)
        wait_final(m, running.key)
    finally:
        shut(m)


def test_bounds_the_service_ran_without_and_an_older_supervisors_memory_line_are_events():
    """What a supervisor records of a bound it could not apply (no cgroup, no mount namespace), and the memory line of
    a supervisor from before memory_killed (a job that ran across an upgrade): each an event, with what is known."""
    status = {"exit": 0, "dropped": {"stdout": 0, "stderr": 0}, "memory": "2 processes killed past 100663296 bytes",
              "processes": "unbounded: no pids cgroup hierarchy at /x", "tmp": "shared with the host: /tmp: EPERM",
              "ipc": "the host's: EPERM"}
    assert bound_events(status, {"max_processes": 256, "tmp_size": 1 << 20}) == [
        BoundEvent("memory", "2 processes killed past 100663296 bytes", processes_killed=2),
        BoundEvent("processes", "unbounded: no pids cgroup hierarchy at /x", "max_processes", 256,
                   unbounded="no pids cgroup hierarchy at /x"),
        BoundEvent("tmp", "shared with the host: /tmp: EPERM", "tmp_size", 1 << 20, unbounded="/tmp: EPERM")]
    assert bound_events({"memory": "unbounded: no memory cgroup hierarchy"}, {}) == [
        BoundEvent("memory", "unbounded: no memory cgroup hierarchy", unbounded="no memory cgroup hierarchy")]
    assert not any(e.acted for e in bound_events({"processes": "unbounded: x"}, {}))
    assert bound_events(json.loads('{"exit": 0, "dropped": {"stderr": 7}}'), {})[0].description == \
        "7 bytes dropped past the bound ([jobs] max_output)"


@pytest.mark.parametrize("bound", ["\u00b2", "9" * 5000, "\u0665", "-5", " 12 "])
def test_a_services_odd_numbers_are_unknown_not_a_traceback(bound):
    """The property is a job service's words, and a service may be hostile (a VM owner's): `²` (a digit to
    str.isdigit, not to int) or 5,000 digits made ResourceBounds.parse raise ValueError, and `vmgrid job status` and
    `job wait` end in a traceback (attack16 G5). A number that is not a count of ASCII digits is unknown (None)."""
    el = etree.fromstring(f'<job:ResourceBounds xmlns:job="{wire.JOB}"><job:event><job:resource>memory</job:resource>'
                          f'<job:bound>{bound}</job:bound><job:processesKilled>{bound}</job:processesKilled>'
                          f'<job:description>d</job:description></job:event></job:ResourceBounds>')
    (event,) = wire.ResourceBounds.parse(el)
    expected = 12 if bound.strip() == "12" else None
    assert (event.bound, event.processes_killed, event.description) == (expected, expected, "d")
