"""A VMManager process killed (SIGKILL) at each phase of a deployment, then restarted on the same
state: no instance stuck in a transient state, no leaked lease, overlay, image hold or instance
slot, no partial image in the cache, and the node deploys again."""
from __future__ import annotations

import signal
import time
from datetime import datetime, timedelta, timezone
import sqlite3

import pytest

from client.localgrid import LocalGrid
from client.soap import ClientError, GridServiceClient
from client.vmmanager import VMManagerClient
from security.trust import TrustStore
from tests.fixtures.repository import bio_site

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The Authorization service and the VMRepository in one process, an image registered."""
    with bio_site(tmp_path_factory.mktemp("crashsite"),
                  image={"name": "emboss.qcow2", "size": "256M", "fill": b"crash" * 100000}) as grid:
        yield grid


def start_node(grid: LocalGrid, crashpoint: str | None = None):
    return grid.start_node("node1", {"lease_range": "10.99.0.10-10.99.0.40", "sweep_interval": 0.5,
                                        "hold_linger": 0},
                           extra_env={"VMGRID_CRASHPOINT": crashpoint} if crashpoint else None)


def node_client(grid: LocalGrid, proc) -> VMManagerClient:
    return VMManagerClient(GridServiceClient(proc.base_url + "/wsrf/services/VMManagerService",
                                             grid.user("alice").credential, TrustStore(grid.cert_dir)))


def held(grid: LocalGrid) -> dict:
    """What anything still holds for instances: node leases and files, repository holds, authz slots."""
    node = grid.root / "node1" / "vmmanager"
    db = sqlite3.connect(node / "node.sqlite")
    try:
        leases = db.execute("SELECT count(*) FROM leases").fetchone()[0]
        live = db.execute("SELECT count(*) FROM instances WHERE state NOT IN ('Destroyed', 'Failed')").fetchone()[0]
        transient = db.execute("SELECT count(*) FROM instances WHERE state IN "
                               "('Registered', 'Staging', 'Starting', 'ShuttingDown')").fetchone()[0]
    finally:
        db.close()
    repo = sqlite3.connect(grid.root / "central" / "repository" / "catalogue.sqlite")
    try:
        holds = repo.execute("SELECT count(*) FROM holds").fetchone()[0]
    finally:
        repo.close()
    slots_db = next((grid.root / "central" / "authz").glob("*.sqlite"), None)
    slots = 0
    if slots_db is not None:
        s = sqlite3.connect(slots_db)
        try:
            slots = s.execute("SELECT count(*) FROM slots").fetchone()[0]
        finally:
            s.close()
    instances = node / "instances"
    partial = [p.name for p in (node / "cache" / "incoming").iterdir()] if (node / "cache" / "incoming").exists() else []
    return {"leases": leases, "live": live, "transient": transient, "holds": holds, "slots": slots,
            "dirs": sorted(p.name for p in instances.iterdir()) if instances.exists() else [],
            "partial": partial}


NOTHING = {"leases": 0, "live": 0, "transient": 0, "holds": 0, "slots": 0, "dirs": [], "partial": []}


@pytest.mark.parametrize("point", ["deploy.registered", "deploy.leased", "stage.held", "deploy.staged",
                                   "deploy.overlay", "deploy.context", "deploy.powered-on"])
def test_sigkill_at_each_phase_then_restart_is_consistent(site, point):
    proc = start_node(site, point)
    with pytest.raises(ClientError):
        node_client(site, proc).deploy(site.descriptor, f"crash-{point.split('.')[1]}", 600, wait=True)
    proc.process.wait(10)
    assert proc.process.returncode == -signal.SIGKILL
    site.processes.pop("node1")

    proc = start_node(site)
    try:
        assert held(site) == NOTHING
        vm = node_client(site, proc)
        ended = [i for i in vm.list(include_ended=True) if i.identifier == f"crash-{point.split('.')[1]}"]
        assert ended and ended[-1].state == "Failed" and "Interrupted" in ended[-1].failure
        info = vm.deploy(site.descriptor, f"after-{point.split('.')[1]}", 600, wait=True)   # the node works
        assert info.state == "Running"
        vm.destroy(info.ref)
        assert held(site) == NOTHING
    finally:
        site.stop("node1")


def test_a_killed_node_loses_its_test_driver_vms_and_says_so(site):
    """libvirt's test driver keeps VMs in the VMManager's process; after a SIGKILL they are gone,
    and the restarted node records them Failed (Lost) and releases what they held."""
    proc = start_node(site)
    vm = node_client(site, proc)
    info = vm.deploy(site.descriptor, "doomed", 600, wait=True)
    assert held(site)["leases"] == 1
    site.stop("node1", signal.SIGKILL)
    proc = start_node(site)
    try:
        assert held(site) == NOTHING
        lost = [i for i in node_client(site, proc).list(include_ended=True) if i.ref.key == info.ref.key]
        assert lost[0].state == "Failed" and "Lost" in lost[0].failure
    finally:
        site.stop("node1")


def outbox(grid: LocalGrid) -> list[tuple[str, str]]:
    db = sqlite3.connect(grid.root / "node1" / "vmmanager" / "node.sqlite")
    try:
        return db.execute("SELECT kind, instance FROM outbox ORDER BY id").fetchall()
    finally:
        db.close()


def record(grid: LocalGrid, key: str) -> tuple[str, str]:
    db = sqlite3.connect(grid.root / "node1" / "vmmanager" / "node.sqlite")
    try:
        return db.execute("SELECT state, guest_status FROM instances WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()


def until(condition, timeout: float = 60) -> None:
    """Poll ``condition`` (a state on disk another process changes) until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_an_instance_ending_while_the_central_process_is_down_has_its_releases_kept_and_retried(site):
    """The node destroys an instance whose lifetime ends while the central process is down; the hold and
    slot it cannot give back are kept with the node's state, survive a node restart, and are delivered
    once the central process is back."""
    proc = start_node(site)
    vm = node_client(site, proc)
    info = vm.deploy(site.descriptor, "outage", 600, wait=True)
    assert held(site)["holds"] == 1 and held(site)["slots"] == 1
    vm.set_termination_time(info.ref, datetime.now(timezone.utc) + timedelta(seconds=3))
    central = site.processes["central"]
    site.stop("central", signal.SIGKILL)
    try:
        until(lambda: "releases pending" in record(site, info.ref.key)[1])
        state, status = record(site, info.ref.key)
        assert state == "Destroyed" and "releases pending" in status
        assert sorted(kind for kind, _ in outbox(site)) == ["hold", "slot"]
        site.stop("node1", signal.SIGKILL)        # the pending releases outlive the node
        proc = start_node(site)
        assert len(outbox(site)) == 2
    finally:
        site.restart(central)
    try:
        until(lambda: not outbox(site))           # the sweeper retries, backing off to at most 30 s
        assert outbox(site) == []
        assert held(site) == NOTHING
        assert "delivered" in record(site, info.ref.key)[1]
    finally:
        site.stop("node1")


def test_a_restarting_node_releases_only_its_own_slots_when_nodes_share_a_host_certificate(site):
    """The local grid gives every process the same host certificate: node1's reconciliation after a restart
    must not free the slot of an instance live on node2."""
    start_node(site)
    other = site.start_node("node2", {"lease_range": "10.99.0.50-10.99.0.80", "sweep_interval": 0.5})
    try:
        info = node_client(site, other).deploy(site.descriptor, "on-node2", 600, wait=True)
        assert held(site)["slots"] == 1
        site.stop("node1", signal.SIGKILL)
        start_node(site)                          # node1 reconciles with no instance of its own
        assert held(site)["slots"] == 1           # node2's instance still counts
        node_client(site, other).destroy(info.ref)
        assert held(site)["slots"] == 0
    finally:
        site.stop("node2")
        site.stop("node1")
