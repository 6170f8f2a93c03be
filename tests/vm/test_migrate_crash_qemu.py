"""A migration interrupted on real QEMU (issue 11): the source node, the target node or the client SIGKILLed at a
step, the node restarted on its state directory and QEMU root, then exactly one instance exists, on one node, with
its lease, its files and its one QEMU process there only.

What QEMU adds to the test driver's matrix (tests/integration/test_vmmanager_migration_crash.py): a QEMU process
outlives the node that started it, so a source killed before the freeze finds its guest alive when it restarts,
and a target killed after restoring the state finds a restored QEMU of an instance it never committed. The
instances are deployed paused (QEMU started with its CPUs stopped: no guest boot to pay for; the save, the copy
and the restore are QEMU's and libvirt's own, of a 256 MiB guest) and two node processes migrate them."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from client.localgrid import write_toml
from client.soap import ClientError, GridServiceClient
from client.vmmanager import VMManagerClient
from services.faults import MigrationFault
from tests.fixtures.faults import kill_client_at
from tests.fixtures.grid import free_port, start_grid

from bridge_nodes import register_image
from test_vmmanager_qemu import DESCRIPTOR, NodeProcess, node_settings, qemu_processes

pytestmark = pytest.mark.timeout(600)
NODES = {"mq1": "10.99.0.150-10.99.0.159", "mq2": "10.99.0.160-10.99.0.169"}
IMAGE = "vmgrid-migcrash"
LIVE = ("Running", "Paused", "Saved")


class Site:
    def __init__(self, grid, pki, descriptor, work: Path, guest_image) -> None:
        self.grid, self.pki, self.descriptor, self.work = grid, pki, descriptor, work
        self.nodes: dict[str, NodeProcess] = {}
        self.faults = {name: work / f"f-{name}" for name in NODES}      # services.common.crash's VMGRID_FAULTDIR
        for n, (name, leases) in enumerate(NODES.items()):
            node = NodeProcess(work / f"{name}.toml", work / f"s{n}", work / f"{name}.log", free_port())
            write_toml(node.config, {
                "container": {"host": "127.0.0.1", "port": node.port, "state_dir": str(node.state),
                              "log_level": "info"},
                "security": {"cert_dir": str(pki.cert_dir), "host_cert": str(pki.host_cert_path),
                             "host_key": str(pki.host_key_path)},
                "enforcement": {"authz_url": grid.authz_url, "permit_ttl": 0.0},
                "vmmanager": {**node_settings(guest_image, root=self.root(name), lease_range=leases, name=name),
                              "repository": grid.repository_url, "migration_sources": ["localhost"],
                              "consumers_allow": ["127.0.0.0/8"],
                              "migration_timeout": 20.0},
            })
            self.nodes[name] = node

    def start(self, name: str) -> None:
        self.faults[name].mkdir(exist_ok=True)
        self.nodes[name].start(self.pki.cert_dir, env={"VMGRID_FAULTDIR": str(self.faults[name])}, timeout=180)

    def root(self, name: str) -> Path:
        return self.work / f"r{list(NODES).index(name)}"

    def client(self, name: str) -> VMManagerClient:
        return VMManagerClient(GridServiceClient(self.nodes[name].url, self.pki.alice.proxy, self.pki.trust()))

    def where(self, key: str) -> dict:
        """Per node: the instance's state there (if recorded), its leases, whether its directory exists, and the
        QEMU processes of the node's root."""
        out = {}
        for name, node in self.nodes.items():
            with node.store() as db:
                row = db.execute("SELECT state FROM instances WHERE key = ?", (key,)).fetchone()
                lease = db.execute("SELECT count(*) FROM leases WHERE instance_key = ?", (key,)).fetchone()[0]
            out[name] = (row[0] if row else None, lease, (node.state / "vmmanager" / "instances" / key).exists(),
                         len(qemu_processes(f"{self.root(name)}/lib/qemu/")))
        return out

    def settled(self, key: str, timeout: float = 120) -> dict:
        """Wait until no node has the instance in a migration state (the restarted node and the sweeps settle it)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.where(key)
            if not any(s in ("Migrating", "Incoming") for s, *_ in now.values()) or time.monotonic() > deadline:
                return now
            time.sleep(0.2)

    def stop(self) -> None:
        for name, node in self.nodes.items():
            node.stop()
            for pid in qemu_processes(f"{self.root(name)}/lib/qemu/"):   # left only when a test failed midway
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def site(grid_pki, guest_image, qemu_prerequisites, vm_dir):
    work = vm_dir / "mc"
    grid = start_grid(grid_pki, work / "g", nodes=0)
    try:
        text = DESCRIPTOR.format(name=IMAGE, kernel=guest_image.kernel_version, command="/bin/true").encode()
        descriptor = register_image(grid, grid_pki, guest_image.rootfs, text, IMAGE)
        s = Site(grid, grid_pki, descriptor, work, guest_image)
        try:
            for name in NODES:      # both run through every case; a killed one is restarted by its case
                s.start(name)
            yield s
        finally:
            s.stop()
    finally:
        grid.close()


@pytest.mark.parametrize("killed, point, lands", [
    ("mq1", "migration.prepared", "mq1"),         # source dies before the freeze: its QEMU lives on, and so does it
    ("mq1", "migration.frozen", "mq1"),           # source dies with the state saved: restored from it at the source
    ("mq2", "migration.target-restored", "mq1"),  # the target's restored QEMU outlives it: ended there, back home
    ("client", "migration.frozen", "mq2"),        # the client dies: the nodes carry the migration to its end
])
def test_an_interrupted_migration_on_qemu_leaves_exactly_one_instance_and_one_qemu(site, killed, point, lands):
    src = site.client("mq1")
    name = f"mc-{killed}-{point.split('.')[1]}"
    ref = src.deploy(site.descriptor, name, 900, paused=True).ref
    assert src.wait_for(ref, ("Paused",), timeout=180).state == "Paused"
    if killed == "client":
        kill_client_at(site.faults["mq1"], point, ["vm", "migrate", name, "--to", site.nodes["mq2"].url],
                       {**os.environ, **site.pki.alice.env(site.pki.cert_dir), "VMGRID_NODE": site.nodes["mq1"].url})
    else:
        (site.faults[killed] / "kill").write_text(point)
        with pytest.raises((ClientError, MigrationFault)):    # the killed node's half: connection lost / rolled back
            src.migrate(ref, site.nodes["mq2"].url)
        dead = site.nodes[killed]
        assert dead.process.wait(60) == -signal.SIGKILL, dead.log_tail()
        site.start(killed)                                  # restarted on its state directory and QEMU root
    state = site.settled(ref.key)
    live = {n: s for n, (s, *_) in state.items() if s in LIVE}
    assert live == {lands: "Paused"}, state
    other = next(n for n in NODES if n != lands)
    assert state[lands][1:] == (1, True, 1), f"lease, files and one QEMU on {lands}: {state}"
    deadline = time.monotonic() + 30
    while state[other][3] and time.monotonic() < deadline:  # a QEMU the other node ended may take a moment
        time.sleep(0.2)
        state = site.where(ref.key)
    assert state[other][1:] == (0, False, 0), f"nothing of it on {other}: {state}"
    here = type(ref)(site.nodes[lands].url, ref.key)
    vm = site.client(lands)
    assert vm.status(here).state == "Paused"
    vm.destroy(here)
    deadline = time.monotonic() + 30
    while qemu_processes(f"{site.root(lands)}/lib/qemu/") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not qemu_processes(f"{site.root(lands)}/lib/qemu/"), "destroyed with its QEMU"
