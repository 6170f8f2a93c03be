"""`vmgrid serve` started twice on one service's state (the same command run again, a restart before the old
process ended): the second is refused before it touches anything, so the live node's instances stay as they
are (it used to reconcile them as after a crash: Running instances became Failed). A port already taken is a
one-line message, not a traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.repository import bio_site

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with bio_site(tmp_path_factory.mktemp("lock"), image={"name": "e.qcow2", "fill": b"lock"}) as g:
        base = g.services_url
        g.node = g.start_node("node1", {})
        g.env_extra = {"VMGRID_REPOSITORY": f"{base}/VMRepositoryService",
                       "VMGRID_NODE": g.node.base_url + "/wsrf/services/VMManagerService"}
        yield g


def vmgrid(grid, *args, user="alice"):
    return subprocess.run([sys.executable, "-m", "client.cli", *args], env={**grid.env(user), **grid.env_extra},
                          capture_output=True, text=True, timeout=120)


def states(grid) -> dict:
    r = vmgrid(grid, "vm", "list", "--all", "--json")
    assert r.returncode == 0, r.stderr
    return {i["identifier"]: i["state"] for i in json.loads(r.stdout)}


def test_a_second_serve_on_a_live_nodes_state_is_refused_and_changes_nothing(grid):
    assert vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "kept").returncode == 0
    assert states(grid)["kept"] == "Running"
    for extra in ([], ["--port", "0"]):                   # the same command; another port, the same state
        r = vmgrid(grid, "serve", "vmmanager", "-c", str(grid.node.config), *extra)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert (f"vmgrid: the vmmanager state in {grid.root / 'node1'} is in use by another `vmgrid serve` "
                f"(pid {grid.node.process.pid}): stop it first") in r.stderr, r.stderr
    assert states(grid)["kept"] == "Running"               # not reconciled by the refused process
    lock = grid.root / "node1" / "vmmanager.lock"          # where docs/configuration.md says
    assert lock.read_text() == f"{grid.node.process.pid}\n"
    assert vmgrid(grid, "vm", "pause", "kept").returncode == 0   # the live node still owns it


def test_a_port_in_use_is_one_line(grid, tmp_path):
    r = vmgrid(grid, "serve", "vmmanager", "-c", str(grid.node.config), "--state-dir", str(tmp_path / "other"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"vmgrid: cannot listen on 127.0.0.1:{grid.node.port}: Address already in use" in r.stderr


def test_the_lock_goes_with_the_process_even_killed(grid):
    # its own instance: pytest-xdist may run this test on a worker where the one above did not run
    assert vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "crashed").returncode == 0
    assert states(grid)["crashed"] == "Running"
    grid.node.process.kill()
    grid.node.process.wait()
    grid.node = grid.restart(grid.node)                   # the restart after a crash is not refused
    assert states(grid)["crashed"] == "Failed"             # reconciled as after a crash (test driver: gone)
