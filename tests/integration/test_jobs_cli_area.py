"""`vmgrid job …` against a real `vmgrid serve jobs` process (trial15 X2): the instance's owner follows an admin's job
without its output tails."""
from __future__ import annotations

import json
import re

import pytest

from client.localgrid import LocalGrid

from tests.integration.test_jobs_cli import start_jobs, vmgrid

pytestmark = pytest.mark.timeout(300)
WITHHELD = "(output tails: the submitter's and the admins' only)"


@pytest.fixture
def grid(tmp_path):
    """alice owns the instance, admin is a VO admin (as test_jobs_cli's grid)."""
    with LocalGrid(tmp_path / "grid") as g:
        sp = start_jobs(g)
        g.jobs_url = f"{sp.base_url}/wsrf/services/JobService"
        yield g


def test_the_instance_owner_follows_an_admins_job_without_its_output_tails(grid):
    """alice owns the instance, admin is a VO admin. His job's output tails are his and the admins' only, the rest is
    hers to see: `job status` (and --json) and `job wait` show its state, owner, times and outputs, with a line saying
    the tails are withheld, and never the tails. Before: AccessDenied and nothing else, rc 1."""
    url = grid.jobs_url
    key = vmgrid(grid, "job", "submit", url, "--wait", "--stage-out", "secret.txt", "--", "/bin/sh", "-c",
                 "echo s3cret > secret.txt; echo s3cret", user="admin").stdout.strip()
    admin_dn = grid.user("admin").dn
    r = vmgrid(grid, "job", "status", url, key)
    assert "s3cret" not in r.stdout + r.stderr
    assert re.search(r"^state +Done$", r.stdout, re.M), r.stdout
    assert re.search(rf"^owner +{re.escape(admin_dn)}$", r.stdout, re.M), r.stdout
    assert re.search(r"^ended +\d{4}-", r.stdout, re.M), r.stdout
    assert re.search(r"^output +secret\.txt 7 bytes sha256 [0-9a-f]{64}$", r.stdout, re.M), r.stdout
    assert WITHHELD in r.stdout.splitlines()
    shown = json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)
    assert (shown["state"], shown["owner"], shown["outputTailsWithheld"]) == ("Done", admin_dn, True)
    assert shown["stdoutTail"] == "" and "secret.txt" in [o["name"] for o in shown["outputs"]]
    r = vmgrid(grid, "job", "wait", url, key)
    assert r.stdout == "Done (exit code 0)\n" and WITHHELD in r.stderr and "s3cret" not in r.stderr
    # the submitter still reads them, and nothing says they are withheld
    r = vmgrid(grid, "job", "status", url, key, user="admin")
    assert "--- stdout (tail) ---\ns3cret\n" in r.stdout and WITHHELD not in r.stdout

