"""`vmgrid vm destroy NAME` of an instance that ended already says that nothing needs doing and why (trial14 M8: a
Failed one was "you have no live instance named 'm5' ...", which left open whether it still held something). A
Failed instance holds nothing on its node (VM, files, lease, image hold and slot were given back when it failed);
its record stays, as a destroyed one's, and the node takes no Destroy for it. A local grid's processes (the node on
libvirt's test driver), the real commands."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from tests.fixtures.repository import bio_site

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with bio_site(tmp_path_factory.mktemp("vmdestroy"), image={"name": "e.qcow2", "fill": b"vmdestroy"}) as g:
        node = g.start_node("node1", {})
        g.env_extra = {"VMGRID_REPOSITORY": f"{g.services_url}/VMRepositoryService",
                       "VMGRID_NODE": node.base_url + "/wsrf/services/VMManagerService"}
        g.node = node
        yield g


def vmgrid(grid, *args, check=True):
    r = subprocess.run([sys.executable, "-m", "client.cli", *args], env={**grid.env("alice"), **grid.env_extra},
                       capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"vmgrid {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def _deployed_failing(grid, identifier: str) -> str:
    """An instance of 8 MiB of RAM, deployed through the client library (`vmgrid vm deploy --memory 8` is refused
    before anything is sent): the VMM refuses to define it, after the node registered, leased and staged it: Failed.
    Its key, once Failed."""
    import time

    from client.soap import GridServiceClient
    from client.vmmanager import VMManagerClient
    from security.trust import TrustStore
    from services.descriptor import set_field

    descriptor = grid.admin_repo.show("bio/debian12-emboss")
    set_field(descriptor, "hardware", "memory", 8)
    vm = VMManagerClient(GridServiceClient(grid.env_extra["VMGRID_NODE"], grid.user("alice").credential,
                                           TrustStore(grid.cert_dir)))
    info = vm.deploy(descriptor, identifier, 3600)
    deadline = time.monotonic() + 120
    while info.state != "Failed" and time.monotonic() < deadline:
        time.sleep(0.2)
        info = vm.status(info.ref)
    return info.ref.key


def test_destroying_a_failed_instance_says_it_holds_nothing_and_its_record_stays(grid):
    key = _deployed_failing(grid, "m5")
    info = json.loads(vmgrid(grid, "vm", "status", key, "--json").stdout)
    assert info["state"] == "Failed" and "VMMFault" in info["failure"], info

    for named in ("m5", key):
        r = vmgrid(grid, "vm", "destroy", named)
        assert r.stderr == "", r.stderr
        assert r.stdout.startswith(f"{named}: nothing to destroy: it is Failed (VMMFault: "), r.stdout
        assert f"({key}), and a Failed instance holds nothing any more: the node gave back its VM, disk files, " \
               f"address lease, image hold and instance slot when it failed" in r.stdout, r.stdout
        assert r.stdout.rstrip().endswith(f"Its record stays, as every ended instance's: `vmgrid vm status {key}` "
                                          f"shows it"), r.stdout
    # what it says is so: the node holds no lease nor directory for it, and its record is there as said
    db = next((grid.root / "node1").rglob("node.sqlite"))
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT COUNT(*) FROM leases WHERE instance_key = ?", (key,)).fetchone() == (0,)
        assert conn.execute("SELECT state FROM instances WHERE key = ?", (key,)).fetchone() == ("Failed",)
    assert not (db.parent / "instances" / key).exists()
    status = json.loads(vmgrid(grid, "vm", "status", key, "--json").stdout)
    assert status["state"] == "Failed"


def test_destroying_a_destroyed_instance_again_says_it_was(grid):
    key = json.loads(vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "twice", "--json").stdout)["key"]
    assert vmgrid(grid, "vm", "destroy", "twice").stdout == "twice: destroyed\n"
    again = vmgrid(grid, "vm", "destroy", "twice")
    assert again.stdout == f"twice: nothing to destroy: it was destroyed already ({key}); `vmgrid vm list --all` " \
                           f"lists it\n", again.stdout
    # by its key as by its name (trial15 X9: the node answers ResourceUnknown for a destroyed key; its record stays)
    by_key = vmgrid(grid, "vm", "destroy", key)
    assert by_key.stdout == f"{key}: nothing to destroy: it was destroyed already ({key}); `vmgrid vm list --all` " \
                            f"lists it\n", by_key.stdout
    status = json.loads(vmgrid(grid, "vm", "status", key, "--json").stdout)
    assert status["key"] == key and status["state"] == "Destroyed" and status["identifier"] == "twice", status
    shown = vmgrid(grid, "vm", "status", key).stdout
    assert "state  Destroyed" in shown and f"twice ({key})" in shown, shown


def test_destroying_an_instance_never_deployed_is_still_an_error(grid):
    r = vmgrid(grid, "vm", "destroy", "nobody", check=False)
    assert r.returncode == 1 and "no live instance named 'nobody'" in r.stderr, r.stderr
