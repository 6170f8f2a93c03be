"""A migration's source or target node SIGKILLed at each step (services.common.crash), then restarted on the
same address: the nodes settle it between them and exactly one live instance remains, on one node, with its
lease and files there only. The nodes run libvirt's test driver in their own processes: a killed node's domains
die with it, but the source's saved state file survives, so a rolled-back instance is restored from it.
The client (`vmgrid vm migrate`) SIGKILLed at each step: the migration is the source node's work, it ends on
the target."""
from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest

from client.localgrid import LocalGrid, free_port
from client.soap import ClientError, GridServiceClient
from client.vmmanager import VMManagerClient
from security.trust import TrustStore
from services.faults import InstanceMoved, MigrationFault
from tests.fixtures.faults import kill_client_at
from tests.fixtures.repository import bio_site

pytestmark = pytest.mark.timeout(300)
NODES = {"node1": "10.99.0.10-10.99.0.40", "node2": "10.99.0.100-10.99.0.140"}
LIVE = ("Running", "Paused", "Saved")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with bio_site(tmp_path_factory.mktemp("migcrash"), image={"name": "mig.qcow2", "fill": b"migcrash" * 1000}) as grid:
        grid.ports = {name: free_port() for name in NODES}
        yield grid


def start_node(grid: LocalGrid, name: str, crashpoint: str | None = None, *, stall: Path | None = None):
    """The node ``name``; SIGKILLed by itself at ``crashpoint``, or held at the points ``stall`` names
    (services.common.crash)."""
    env = {"VMGRID_CRASHPOINT": crashpoint} if crashpoint else {}
    if stall:
        env["VMGRID_FAULTDIR"] = str(stall)
    return grid.start(name, ["vmmanager"], {
        "enforcement": grid.enforcement(),
        "vmmanager": {"node": name, "repository": f"{grid.services_url}/VMRepositoryService",
                      "lease_range": NODES[name], "sweep_interval": 0.3, "migration_timeout": 10.0,
                      "migration_sources": ["localhost"], "consumers_allow": ["127.0.0.0/8"]}},
        extra_env=env or None, port=grid.ports[name])


def url(grid: LocalGrid, name: str) -> str:
    return f"https://localhost:{grid.ports[name]}/wsrf/services/VMManagerService"


def client(grid: LocalGrid, name: str) -> VMManagerClient:
    return VMManagerClient(GridServiceClient(url(grid, name), grid.user("alice").credential,
                                             TrustStore(grid.cert_dir)))


def where(grid: LocalGrid, key: str) -> dict:
    """Per node: the instance's state there (if recorded), whether it holds a lease and a directory."""
    out = {}
    for name in NODES:
        node = grid.root / name / "vmmanager"
        db = sqlite3.connect(node / "node.sqlite")
        try:
            row = db.execute("SELECT state FROM instances WHERE key = ?", (key,)).fetchone()
            lease = db.execute("SELECT count(*) FROM leases WHERE instance_key = ?", (key,)).fetchone()[0]
        finally:
            db.close()
        out[name] = (row[0] if row else None, lease, (node / "instances" / key).exists())
    return out


def settled(grid: LocalGrid, key: str, timeout: float = 60) -> dict:
    """Wait until neither node has the instance in a migration state (the sweep settles it)."""
    deadline = time.monotonic() + timeout
    while True:
        now = where(grid, key)
        if not any(s in ("Migrating", "Incoming") for s, _, _ in now.values()) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


@pytest.mark.parametrize("killed, point, lands", [
    ("node1", "migration.prepared", None),               # source dies after the target prepared, before the freeze
    ("node1", "migration.frozen", "node1"),              # source dies with the state saved: restored there
    ("node1", "migration.accepted", "node1"),            # target holds it Incoming: dropped; restored at source
    ("node1", "migration.committed", "node2"),           # target committed: the restarted source releases it
    ("node2", "migration.target-prepared", "node1"),     # target dies registered: the source rolls back
    ("node2", "migration.target-restored", "node1"),     # target dies restored, before the commit
])
def test_sigkill_during_a_migration_leaves_exactly_one_instance(site, killed, point, lands):
    procs = {name: start_node(site, name, point if name == killed else None) for name in NODES}
    try:
        src = client(site, "node1")
        ref = src.deploy(site.descriptor, f"crash-{point.split('.')[1]}", 600, wait=True).ref
        with pytest.raises((ClientError, MigrationFault)):    # the killed node's half: connection lost / rolled back
            src.migrate(ref, url(site, "node2"))
        procs[killed].process.wait(20)
        assert procs[killed].process.returncode == -signal.SIGKILL
        site.processes.pop(killed)
        procs[killed] = start_node(site, killed)            # restarted on the same address
        state = settled(site, ref.key)
        live = {n: s for n, (s, _, _) in state.items() if s in LIVE}
        if lands is None:
            # the guest was never frozen, so nothing of it was saved: it died with its node's test-driver process (as
            # any running guest there does) and its record fails as Lost; the target dropped what it had prepared
            assert live == {} and state["node2"] == (None, 0, False) and state["node1"][1:] == (0, False), state
            return
        assert list(live) == [lands], state
        other = next(n for n in NODES if n != lands)
        assert state[lands][1:] == (1, True) and state[other][1:] == (0, False), state
        vm = client(site, lands)
        assert vm.status(type(ref)(url(site, lands), ref.key)).state in LIVE
        vm.destroy(type(ref)(url(site, lands), ref.key))
    finally:
        for name in NODES:
            site.stop(name)


@pytest.mark.parametrize("point", ["migration.prepared", "migration.frozen", "migration.accepted",
                                   "migration.committed"])
def test_the_client_sigkilled_during_a_migration_leaves_exactly_one_instance(site, tmp_path, point):
    """`vmgrid vm migrate` SIGKILLed while the source node is at each step (the node held there by
    services.common.crash's stall point until the client is dead): the migration is the node's work, not the
    client's, so it carries on to the target and exactly one live instance remains there."""
    stall = tmp_path / "stall"
    stall.mkdir()
    procs = {name: start_node(site, name, stall=stall if name == "node1" else None) for name in NODES}
    try:
        name = f"kc-{point.split('.')[1]}"
        ref = client(site, "node1").deploy(site.descriptor, name, 600, wait=True).ref
        kill_client_at(stall, point, ["vm", "migrate", name, "--to", url(site, "node2")],
                       {**site.env("alice"), "VMGRID_NODE": url(site, "node1")})
        state = settled(site, ref.key)
        live = {n: s for n, (s, _, _) in state.items() if s in LIVE}
        assert live == {"node2": "Running"}, state
        assert state["node2"][1:] == (1, True) and state["node1"][1:] == (0, False), state
        moved = type(ref)(url(site, "node2"), ref.key)
        assert client(site, "node2").status(moved).state == "Running"
        with pytest.raises(InstanceMoved, match=str(site.ports["node2"])):     # the old EPR says where it went
            client(site, "node1").status(ref)
        client(site, "node2").destroy(moved)
        assert procs["node1"].process.poll() is None and procs["node2"].process.poll() is None
    finally:
        for n in NODES:
            site.stop(n)
