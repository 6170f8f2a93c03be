"""A site admin's view of a node's hypervisor (issue 9): ListDomains lists the domains libvirt has beside the
node's instance records, through the real SOAP face (signed, authorized: admin.node, site admins only), and
sees a stray domain defined and a domain removed behind the node's back (the chaos invariants count them,
tests/fixtures/chaos.py). And the Destroy answer (issue 16.2): during an outage of the VMRepository the node
destroys the instance and its signed answer carries vmm:CleanupPending; with it up, no such header.
One in-process grid for the module (the test driver of each node lives in this process, so the test can act
on the hypervisor behind the node's back)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from client.cli import main as vmgrid
from services.faults import AccessDenied
from services.vmmanager.vmm.config import DOMAIN_PREFIX
from tests.fixtures.chaos import domain_violations
from services.authz.config import AuthzConfig
from services.container.assemble import build_container, build_service
from services.vmmanager.vmm import LibvirtTestDriver
from tests.fixtures.grid import base_config, free_port, start_grid
from tests.integration.test_site_recipe import vmgrid_on_path

pytestmark = pytest.mark.timeout(300)
CLEANUP = "{http://vmgrid.org/ns/vmmanager/1}CleanupPending"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
DS = "http://www.w3.org/2000/09/xmldsig#"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"

STRAY = f"""<domain type='test'><name>{DOMAIN_PREFIX}stray-behind-the-nodes-back</name>
<uuid>6a1f0b6e-93c2-4c55-9d59-2b7f3f6d1a01</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os></domain>"""


@pytest.fixture(scope="module")
def grid(grid_pki, tmp_path_factory):
    """The central container (Authorization service + VMRepository) and one node, whose enforcement point
    asks an Authorization service in a container of its own (as a site may run it): the outage test stops
    the repository's container and the node can still authorize."""
    root = tmp_path_factory.mktemp("domains")
    g = start_grid(grid_pki, root, nodes=0)
    cfg = base_config(grid_pki, root / "authz", free_port())
    cfg.authz = AuthzConfig(policy=str(root / "policy.toml"), reload_interval=0.2)
    authz = build_container(cfg, [build_service("authz", cfg)])
    authz.start()
    try:
        g.add_node("node1", "10.99.0.10-10.99.0.99", vmm=LibvirtTestDriver.private_node(),
                   authz_url=f"https://localhost:{cfg.container.port}/wsrf/services/AuthorizationService")
        g.image = g.register(size="16M")
        yield g
    finally:
        g.close()
        authz.stop()


def cli(grid, capsys, monkeypatch, user, *args) -> tuple[int, str]:
    """``vmgrid ARGS`` as ``user``, in this process (its proxy and the grid's CAs in the environment)."""
    for k, v in user.env(grid.pki.cert_dir).items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    rc = vmgrid(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_a_site_admin_sees_each_domain_with_its_instance_and_others_are_refused(grid, grid_pki, capsys, monkeypatch):
    info = grid.vmm(grid_pki.alice).deploy(grid.image, "census-1", 600, wait=True)
    census = grid.vmm(grid_pki.admin).domains()
    mine = [d for d in census.domains if d.instance == info.ref.key]
    assert census.node == "node1" and len(mine) == 1
    assert mine[0].hypervisor_state == "running" and mine[0].instance_state == "Running" and mine[0].uuid
    assert domain_violations(census) == {"orphan domains (no live record)": 0,
                                         "live Running/Paused instances without a domain": 0}
    # deny by default: admin.node is the site admins' (an instance owner, even a VO admin's member, is refused)
    with pytest.raises(AccessDenied):
        grid.vmm(grid_pki.alice).domains()
    # the command line, as docs/operations.md shows it
    rc, out = cli(grid, capsys, monkeypatch, grid_pki.admin, "node", "domains", "--node", grid.node_url())
    assert rc == 0 and info.ref.key in out and "node1: 1 domain(s), 0 orphan, 0 instance(s) missing" in out
    rc, out = cli(grid, capsys, monkeypatch, grid_pki.alice, "node", "domains", "--node", grid.node_url())
    assert rc == 1 and out.startswith("vmgrid: ") and "denied" in out.lower(), out
    grid.vmm(grid_pki.alice).destroy(info.ref)


DOC = Path(__file__).resolve().parents[2] / "docs" / "vmmanager.md"
MARK = "<!-- run as written by tests/integration/test_node_domains.py (as a site admin, VMGRID_NODE set) -->"


def test_the_commands_of_docs_vmmanager_md_run_as_written(grid, grid_pki, tmp_path):
    m = re.search(re.escape(MARK) + r"\n```sh\n(.*?)```", DOC.read_text(), re.S)
    assert m, "docs/vmmanager.md lost its tested node domains commands"
    info = grid.vmm(grid_pki.alice).deploy(grid.image, "census-doc", 600, wait=True)
    env = {**grid_pki.admin.env(grid_pki.cert_dir), "VMGRID_NODE": grid.node_url(), "HOME": str(tmp_path),
           "PATH": f"{vmgrid_on_path(tmp_path)}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    r = subprocess.run(["bash", "-e", "-c", m.group(1)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    table, _, js = r.stdout.partition("\n{")
    assert info.ref.key in table and "node1: 1 domain(s), 0 orphan, 0 instance(s) missing their domain" in table
    listed = json.loads("{" + js)
    assert [d["instance"] for d in listed["domains"]] == [info.ref.key] and listed["missing"] == []
    grid.vmm(grid_pki.alice).destroy(info.ref)


def test_a_stray_domain_and_a_vanished_one_are_counted(grid, grid_pki):
    vm = grid.vmm(grid_pki.alice)
    info = vm.deploy(grid.image, "census-2", 600, wait=True)
    node = grid.node()
    conn = node.vmm._conn                       # the node's own test-driver connection: behind its back
    conn.defineXML(STRAY)
    try:
        census = grid.vmm(grid_pki.admin).domains()
        assert [d.name for d in census.orphans] == ["stray-behind-the-nodes-back"]
        assert domain_violations(census)["orphan domains (no live record)"] == 1
        dom = conn.lookupByName(DOMAIN_PREFIX + info.ref.key)
        dom.undefine()        # transient first, then gone: the node's stop event finds no domain to mark Shutoff
        dom.destroy()         # the instance's domain gone; its record still says Running
        census = grid.vmm(grid_pki.admin).domains()
        assert census.missing == ((info.ref.key, "Running"),)
        assert domain_violations(census) == {"orphan domains (no live record)": 1,
                                             "live Running/Paused instances without a domain": 1}
    finally:
        conn.lookupByName(DOMAIN_PREFIX + "stray-behind-the-nodes-back").undefine()
    vm.destroy(info.ref)
    assert domain_violations(grid.vmm(grid_pki.admin).domains()) == {
        "orphan domains (no live record)": 0, "live Running/Paused instances without a domain": 0}


def test_destroy_says_when_cleanup_at_the_central_services_is_pending(grid, grid_pki, capsys, monkeypatch):
    vm = grid.vmm(grid_pki.alice)
    up = vm.deploy(grid.image, "pending-0", 600, wait=True)
    assert vm.destroy(up.ref) == []             # central services up: no CleanupPending header
    assert vm.service.response_header(CLEANUP) is None
    # a node's instances of one image share one hold (released with the last of them): two images, so each
    # Destroy below is the last user of its hold
    other = grid.register(name="pending-other", size="16M")
    a = vm.deploy(grid.image, "pending-1", 600, wait=True)
    b = vm.deploy(other, "pending-2", 600, wait=True)
    c = vm.deploy(grid.image, "pending-3", 600, wait=True)
    grid.central.stop()     # the VMRepository's container down (last in this module: it stays down)
    assert vm.destroy(c.ref) == []              # the hold stays: pending-1 still uses it
    assert vm.service.response_header(CLEANUP) is None
    assert vm.destroy(a.ref) == ["hold"]        # the slot went back to the Authorization service, up
    header = vm.service.response_header(CLEANUP)
    assert header.get(f"{{{SOAP_ENV}}}mustUnderstand") in (None, "0")   # other stacks may ignore it
    signed = {r.get("URI") for r in header.getroottree().iter(f"{{{DS}}}Reference")}
    assert "#" + header.get(f"{{{WSU}}}Id") in signed           # the response's signature covers it
    node = grid.node()
    assert node.store.get(a.ref.key).state == "Destroyed"
    assert [kind for _, kind, *_ in node.store.outbox(instance=a.ref.key)] == ["hold"]
    rc, out = cli(grid, capsys, monkeypatch, grid_pki.alice, "vm", "destroy", "pending-2", "--url", grid.node_url())
    assert rc == 0, out
    assert out.strip() == "pending-2: destroyed; cleanup at the central services pending (will be retried): hold"
    assert node.store.get(b.ref.key).state == "Destroyed"
