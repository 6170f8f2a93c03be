"""`vmgrid job …` against a real `vmgrid serve jobs` process (trial15 X2, N1): the instance's owner follows an admin's
job without its output tails; a `--stage-in F` upload that failed leaves no restart marker behind."""
from __future__ import annotations

import json
import re
import socket
import subprocess

import pytest

from client.localgrid import LocalGrid
from tests.integration.test_jobs_cli import PY, start_jobs, vmgrid

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


def test_a_failed_stage_in_upload_leaves_no_restart_marker(tmp_path):
    """The job service's GridFTP face has one data port, held: `job submit --stage-in F`'s upload is refused 425
    (transient) until it gives up. Its file's once-name is never asked for again, so no restart marker of it stays in
    ~/.cache/vmgrid/gridftp (before: one stayed for good, trial15 N1)."""
    held = socket.socket()
    held.bind(("0.0.0.0", 0))
    held.listen(1)
    port = held.getsockname()[1]
    with LocalGrid(tmp_path / "grid") as g, held:
        alice, admin = g.user("alice"), g.user("admin")
        sp = g.start("jobs", ["jobs"], {"jobs": {"owner": alice.dn, "admins": [admin.dn], "gridftp_port": 0},
                                        "gridftp": {"data_ports": f"{port},{port}"}})
        url = f"{sp.base_url}/wsrf/services/JobService"
        (tmp_path / "seqs.txt").write_text("acgt\n" * 1000)
        cache = tmp_path / "cache"
        env = {**g.env("alice"), "XDG_CACHE_HOME": str(cache)}
        r = subprocess.run([PY, "-m", "client.cli", "job", "submit", url, "--stage-in", str(tmp_path / "seqs.txt"),
                            "--", "true"], env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 1 and "425" in r.stderr and r.stdout == "", r.stdout + r.stderr
        markers = cache / "vmgrid" / "gridftp"
        assert not markers.exists() or list(markers.iterdir()) == []
