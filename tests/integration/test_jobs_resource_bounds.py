"""What the memory bound did to a job, through the job service's contract (trial14 U7): the real service in a real
container on loopback (HTTPS, WS-Security both ways), a real job on this host's memory cgroups whose child the kernel
kills past [jobs] memory_limit while the program exits 0. The job is Done with exit code 0, and its ResourceBounds
property (valid against the published jobs.xsd) says 1 process was killed, past which bound, set by which key;
`vmgrid job status` shows it on a `memory` line and `vmgrid job wait`'s final line after the exit code. A job service
from before the property (an older guest image) answers as before, and the client says nothing it does not know; a
client from before it never asks for it."""
from __future__ import annotations

import json
import os

import pytest
from lxml import etree

from client.cli import main
from services.jobs import wire
from services.jobs.store import JobSpec
from tests.integration.test_jobs_service import CONTRACT, PY, JobGrid, OlderWire, Validating
from tests.unit.jobs.test_job_isolation import MiB, needs_memory_cgroup
from tests.unit.jobs.test_resource_bounds import CHILD_KILLED

pytestmark = [pytest.mark.timeout(300), needs_memory_cgroup,
              pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")]
LIMIT = 96 * MiB
MEMORY_LINE = f"1 process killed past {LIMIT} bytes ([jobs] memory_limit)"


@pytest.fixture
def grid(grid_pki, tmp_path):
    g = JobGrid(grid_pki, tmp_path, memory_limit=LIMIT, memory_total=0)
    yield g
    g.close()


def cli(grid, command: str, *args: str) -> int:
    return main(["job", command, grid.url, "--proxy", str(grid.pki.alice.proxy_path), "--cert-dir",
                 str(grid.pki.cert_dir), *args])


def test_a_done_job_whose_child_the_memory_limit_killed_says_so_in_status_and_wait(grid, grid_pki, capsys):
    """Before: `job status` showed state Done, exitCode 0 and the tails, `job wait` `Done (exit code 0)`: the kill
    was only in root's control/<key>/exit.json. Now the property, the status line and wait's line say it."""
    alice = grid.client(grid_pki.alice)
    check = Validating(alice)                       # every answer valid against the published schema
    key = alice.submit(JobSpec(CHILD_KILLED[0], CHILD_KILLED[1:]))
    info = alice.wait(key, timeout=120)
    assert (info.state, info.exit_code, info.failure, info.stdout_tail) == ("Done", 0, None, "child rc=137\n")
    assert [(e.resource, e.setting, e.bound, e.processes_killed, e.description) for e in info.resource_bounds] == \
        [("memory", "memory_limit", LIMIT, 1, MEMORY_LINE)]
    assert "GetMultipleResourceProperties" in check.seen
    (el,) = alice.property(key, wire.ResourceBounds.qname)          # asked alone, too
    CONTRACT.validator.assertValid(etree.fromstring(
        f'<rp:GetResourcePropertyResponse xmlns:rp="http://docs.oasis-open.org/wsrf/rp-2">'
        f'{etree.tostring(el).decode()}</rp:GetResourcePropertyResponse>'))
    assert el.findtext(f"{{{wire.JOB}}}event/{{{wire.JOB}}}setting") == "memory_limit"

    capsys.readouterr()
    assert cli(grid, "status", key) == 0
    out = capsys.readouterr().out
    assert f"\nmemory           {MEMORY_LINE}\n" in out, out
    assert cli(grid, "status", key, "--json") == 0
    bounds = json.loads(capsys.readouterr().out)["resourceBounds"]
    assert bounds == [{"resource": "memory", "setting": "memory_limit", "bound": LIMIT, "processesKilled": 1,
                       "bytesDropped": None, "unbounded": None, "description": MEMORY_LINE}]
    assert cli(grid, "wait", key) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"Done (exit code 0); memory: {MEMORY_LINE}", out
    assert "vmgrid:" not in err                    # said once, on wait's line
    assert cli(grid, "submit", "--wait", "--", *CHILD_KILLED) == 0           # submit --wait: on standard error
    out, err = capsys.readouterr()
    assert f"vmgrid: job {out.strip()} Done, but memory: {MEMORY_LINE}\n" in err, err


def test_a_job_no_bound_acted_on_reads_as_before(grid, grid_pki, capsys):
    alice = grid.client(grid_pki.alice)
    key = alice.submit(JobSpec(PY, ("-c", "print('fine')")))
    info = alice.wait(key, timeout=120)
    assert (info.state, info.exit_code, info.resource_bounds) == ("Done", 0, [])
    assert cli(grid, "wait", key) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "Done (exit code 0)"


def test_a_new_client_and_a_service_from_before_resource_bounds(grid, grid_pki, monkeypatch, capsys):
    """A job service with CancelRequested and without ResourceBounds (between the two): the client's first status is
    refused naming ResourceBounds and asked again without that one only (CancelRequested still read); the job reads
    as nothing known (None), status prints no bound line, wait's line is the exit code alone."""
    older = OlderWire(lacks=("ResourceBounds",))
    monkeypatch.setattr("services.jobs.service.wire", older)
    alice = grid.client(grid_pki.alice)
    key = alice.submit(JobSpec(CHILD_KILLED[0], CHILD_KILLED[1:]))
    info = alice.wait(key, timeout=120)
    assert (info.state, info.exit_code, info.resource_bounds) == ("Done", 0, None)
    assert older.refused == [wire.ResourceBounds.qname]
    assert alice._unknown == {wire.ResourceBounds.qname}           # CancelRequested is still asked of it
    capsys.readouterr()
    assert cli(grid, "status", key) == 0 and "memory" not in capsys.readouterr().out
    assert cli(grid, "wait", key) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "Done (exit code 0)"
    assert cli(grid, "status", key, "--json") == 0
    assert json.loads(capsys.readouterr().out)["resourceBounds"] is None


def test_a_client_from_before_resource_bounds_is_answered_as_before(grid, grid_pki):
    """An older client asks for the properties it knows: the answer holds no ResourceBounds and is valid as before."""
    alice = grid.client(grid_pki.alice)
    key = alice.submit(JobSpec(CHILD_KILLED[0], CHILD_KILLED[1:]))
    alice.wait(key, timeout=120)
    names = [n for n in wire.JOB_PROPERTIES.names if n not in (wire.ResourceBounds.qname, wire.CurrentTime.qname)]
    props = alice._on(key, "GetMultipleResourceProperties", ResourceProperty=[etree.QName(n) for n in names])
    CONTRACT.validator.assertValid(props)
    assert props.find(wire.ResourceBounds.qname) is None and wire.State.read(props) == "Done"
