"""The VMManager through zeep built from its served WSDL, signed and authorized by the Authorization
service, on libvirt's test driver: every operation, every response valid against the published
schema, the states and their typed faults, leases, staging once, lifetimes, notifications."""
from __future__ import annotations

import copy
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from lxml import etree

from client.notifications import NotificationConsumer
from client.vmmanager import InstanceRef
from services.container.contract import Contract
from services.descriptor import Descriptor, set_field
from services.faults import (AccessDenied, ChecksumMismatch, IllegalTransition, InvalidArgument,
                             InvalidDescriptor, LimitExceeded, NoCapacity, ResourceUnknown, UnknownImage, VMMFault)
from tests.fixtures.grid import grid_policy, start_grid

CONTRACT = Contract("vmmanager.wsdl")
pytestmark = pytest.mark.timeout(300)


def node_holdings(grid, n: int = 0) -> dict:
    """What a node holds for live instances: leases, instance directories, domains, and holds/slots."""
    svc = grid.node(n)
    live = {i.key for i in svc.store.list(None, live_only=True)}
    db = sqlite3.connect(grid.repo_service.catalogue.path)
    try:
        holds = sorted(r[0] for r in db.execute("SELECT holder FROM holds"))
    finally:
        db.close()
    return {"live": sorted(live), "leases": sorted(svc.store.leases()),
            "dirs": sorted(p.name for p in svc.instances_dir.iterdir()),
            "domains": sorted(i.name for i in svc.vmm.list_instances()),
            "holds": [h.rsplit("#", 1)[-1] for h in holds]}


def assert_nothing_held(grid, n: int = 0) -> None:
    assert node_holdings(grid, n) == {"live": [], "leases": [], "dirs": [], "domains": [], "holds": []}


class Validating:
    """Checks every payload the VMManager returns against the published schema; records the operations."""

    def __init__(self, vm):
        self.seen: set[str] = set()
        original = vm.service.call

        def call(operation, *args, **kwargs):
            payload = original(operation, *args, **kwargs)
            CONTRACT.validator.assertValid(payload)
            self.seen.add(operation)
            return payload

        vm.service.call = call


def test_every_operation_through_zeep_validates_and_the_instance_goes_through_its_states(vm_grid, grid_pki):
    ws = vm_grid.register()
    vm = vm_grid.vmm(grid_pki.alice)
    check = Validating(vm)
    info = vm.deploy(ws, "blast-1", 600, wait=True)
    assert info.state == "Running" and info.ref.address == vm_grid.node_url()
    assert [p for p, _ in info.phases] == ["authorize", "register", "lease", "stage", "overlay", "context",
                                           "power-on"]
    assert all(s >= 0 for _, s in info.phases)
    ref = info.ref
    assert vm.pause(ref) == "Paused"
    assert vm.resume(ref) == "Running"
    assert vm.save(ref) == "Saved"
    assert vm.restore(ref) == "Running"
    assert vm.shutdown(ref, "Trash") == "Shutoff"
    assert vm.start(ref) == "Running"
    assert vm.shutdown(ref, "Normal", timeout=2) == "Shutoff"
    new, now = vm.set_termination_time(ref, seconds=1200)
    assert timedelta(seconds=1190) < new - now <= timedelta(seconds=1200)
    assert [e.text for e in vm.property(ref, "State")] == ["Shutoff"]
    status = vm.status(ref)
    assert (status.owner, status.image_id, status.node) == (grid_pki.alice.dn, Descriptor(ws).image_id, "node1")
    with NotificationConsumer(grid_pki.trust()) as consumer:
        assert vm.subscribe(ref, consumer.url).startswith("sub-")
    assert [i.identifier for i in vm.list()] == ["blast-1"]
    vm.destroy(ref)
    with pytest.raises(ResourceUnknown):
        vm.status(ref)
    assert [i.state for i in vm.list(include_ended=True)] == ["Destroyed"]
    site_admin = vm_grid.vmm(grid_pki.admin)          # the site admin's census of the node's domains
    admin = Validating(site_admin)
    assert site_admin.domains().domains == () and site_admin.domains().missing == ()
    # the migration operations need two nodes: tests/integration/test_vmmanager_migration.py
    assert check.seen | admin.seen == set(CONTRACT.operations) - {"Migrate", "AcceptMigration", "CompleteMigration"}
    assert_nothing_held(vm_grid)


@pytest.mark.parametrize("state, op", [
    ("Running", "resume"), ("Running", "restore"), ("Running", "start"),
    ("Paused", "pause"), ("Paused", "start"), ("Saved", "pause"), ("Saved", "resume"),
])
def test_an_illegal_transition_is_a_typed_fault_and_changes_nothing(vm_grid, grid_pki, state, op):
    vm = vm_grid.vmm(grid_pki.alice)
    ref = vm.deploy(vm_grid.register(), "t", 600, wait=True).ref
    {"Paused": vm.pause, "Saved": vm.save}.get(state, lambda r: None)(ref)
    with pytest.raises(IllegalTransition) as exc:
        getattr(vm, op)(ref)
    assert exc.value.state == state
    assert vm.status(ref).state == state


def test_another_user_cannot_touch_your_instance_and_the_vo_admin_can(vm_grid, grid_pki):
    alice, bob, admin = (vm_grid.vmm(u) for u in (grid_pki.alice, grid_pki.bob, grid_pki.admin))
    ref = alice.deploy(vm_grid.register(), "mine", 600, wait=True).ref
    for call in (bob.pause, bob.resume, bob.save, bob.restore, bob.start, bob.destroy, bob.status,
                 lambda r: bob.shutdown(r, "Trash"), lambda r: bob.set_termination_time(r, seconds=60),
                 lambda r: bob.subscribe(r, "http://127.0.0.1:1/x")):
        with pytest.raises(AccessDenied):
            call(ref)
    assert bob.list() == []
    assert alice.status(ref).state == "Running"
    assert admin.pause(ref) == "Paused"        # an admin of the instance's VO
    admin.destroy(ref)


def test_bob_cannot_deploy_an_image_of_another_vo(vm_grid, grid_pki):
    with pytest.raises(AccessDenied):
        vm_grid.vmm(grid_pki.bob).deploy(vm_grid.register(), "x", 60, wait=True)
    assert_nothing_held(vm_grid)


def test_a_limited_proxy_cannot_deploy(vm_grid, grid_pki):
    from client.soap import GridServiceClient
    from client.vmmanager import VMManagerClient
    from security.pki import make_proxy

    limited = make_proxy(grid_pki.alice.credential, limited=True, hours=1)
    vm = VMManagerClient(GridServiceClient(vm_grid.node_url(), limited, grid_pki.trust()))
    with pytest.raises(AccessDenied) as exc:
        vm.deploy(vm_grid.register(), "x", 60, wait=True)
    assert exc.value.rule == "limited-proxy-no-deploy"


def test_limits_from_obligations_are_enforced(grid_pki, tmp_path):
    policy = grid_policy(grid_pki, limits={"max_lifetime": "10m", "max_memory": 1024, "max_vcpus": 2,
                                           "max_instances_per_user": 2, "max_instances_per_group": 50})
    grid = start_grid(grid_pki, tmp_path / "g", policy=policy)
    try:
        ws = grid.register()
        vm = grid.vmm(grid_pki.alice)
        big = Descriptor(ws).element.__copy__()
        set_field(big, "hardware", "memory", 2048)
        with pytest.raises(LimitExceeded) as exc:
            vm.deploy(big, "big", 60, wait=True)
        assert exc.value.limit == "max_memory"
        with pytest.raises(LimitExceeded):
            vm.deploy(ws, "long", 3600, wait=True)
        a = vm.deploy(ws, "a", 300, wait=True).ref
        vm.deploy(ws, "b", 300, wait=True)
        with pytest.raises(LimitExceeded) as exc:
            vm.deploy(ws, "c", 300, wait=True)
        assert "instances" in exc.value.limit
        with pytest.raises(LimitExceeded):
            vm.set_termination_time(a, seconds=3600)
        vm.destroy(a)                              # a slot frees: the third fits now
        assert vm.deploy(ws, "c", 300, wait=True).state == "Running"
        assert len(grid.node().store.leases()) == 2
    finally:
        grid.close()


@pytest.fixture
def roomy_grid(grid_pki, tmp_path):
    """A grid whose policy lets one user run 20 instances at once."""
    grid = start_grid(grid_pki, tmp_path / "g", policy=grid_policy(grid_pki, limits={
        "max_lifetime": "24h", "max_memory": 8192, "max_vcpus": 8, "max_instances_per_user": 20,
        "max_instances_per_group": 50}))
    yield grid
    grid.close()


def test_twenty_concurrent_deploys_stage_once_and_get_twenty_distinct_leases(roomy_grid, grid_pki):
    vm_grid = roomy_grid
    ws = vm_grid.register(size="256M", fill=b"x" * 4096)
    vm_clients = [vm_grid.vmm(grid_pki.alice) for _ in range(4)]
    results, errors = [], []

    def deploy(i: int) -> None:
        try:
            results.append(vm_clients[i % 4].deploy(ws, f"copy-{i:02d}", 600, wait=True))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.address for r in results}) == 20 and len({r.mac for r in results}) == 20
    assert all(r.state == "Running" for r in results)
    node = vm_grid.node()
    assert node.cache.fetches == 1
    assert sum(1 for r in results if r.staged[2]) >= 0     # the cache flag is per deployment
    assert len(list(node.cache.images.iterdir())) == 1


def test_two_nodes_on_one_subnet_lease_disjoint_addresses(grid_pki, tmp_path):
    grid = start_grid(grid_pki, tmp_path / "g", nodes=2)
    try:
        ws = grid.register()
        a = [grid.vmm(grid_pki.alice, 0).deploy(ws, f"a{i}", 300, wait=True) for i in range(3)]
        b = [grid.vmm(grid_pki.alice, 1).deploy(ws, f"b{i}", 300, wait=True) for i in range(3)]
        addresses = [x.address for x in a + b]
        macs = [x.mac for x in a + b]
        assert len(set(addresses)) == 6 and len(set(macs)) == 6
        assert {x.node for x in a} == {"node1"} and {x.node for x in b} == {"node2"}
    finally:
        grid.close()


def test_leases_survive_a_restart_and_are_never_handed_out_twice(vm_grid, grid_pki):
    ws = vm_grid.register()
    vm = vm_grid.vmm(grid_pki.alice)
    first = vm.deploy(ws, "one", 600, wait=True)
    svc = vm_grid.node()
    before = svc.store.leases()
    from services.vmmanager.store import NodeStore
    reopened = NodeStore(svc.store.path)
    assert reopened.leases() == before
    second = vm.deploy(ws, "two", 600, wait=True)
    assert second.address != first.address


def test_an_exhausted_lease_range_is_a_typed_fault_and_leaks_nothing(grid_pki, tmp_path):
    grid = start_grid(grid_pki, tmp_path / "g")
    try:
        from services.vmmanager.store import LeaseRange
        node = grid.node()
        node.pool = LeaseRange.parse("10.99.0.10-10.99.0.11", "10.99.0.0/24", "10.99.0.1")
        ws = grid.register()
        vm = grid.vmm(grid_pki.alice)
        refs = [vm.deploy(ws, f"n{i}", 300, wait=True).ref for i in range(2)]
        before = node_holdings(grid)
        with pytest.raises(NoCapacity) as exc:
            vm.deploy(ws, "third", 300, wait=True)
        assert exc.value.resource == "addresses"
        assert node_holdings(grid) == before
        for r in refs:
            vm.destroy(r)
        assert_nothing_held(grid)
    finally:
        grid.close()


def _corrupt_the_repository_blob(grid, ws) -> None:
    path = grid.repo_service.store.path(Descriptor(ws).sha256)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["not-from-repository", "unknown-image", "differs", "checksum", "vmm-failure",
                                  "duplicate-identifier"])
def test_deploy_faults_are_typed_and_leak_nothing(vm_grid, grid_pki, case):
    """Each refused or failed deployment: its typed fault, and the node, repository and Authorization
    service hold nothing for it afterwards."""
    ws = vm_grid.register()
    vm = vm_grid.vmm(grid_pki.alice)
    if case == "duplicate-identifier":
        kept = vm.deploy(ws, "same", 300, wait=True)
    d = Descriptor(ws).element
    if case == "not-from-repository":
        set_field(d, "image", "sha256", None)
        expected = InvalidDescriptor
    elif case == "unknown-image":
        set_field(d, "identity", "imageId", "img-" + "0" * 32)
        expected = UnknownImage
    elif case == "differs":
        set_field(d, "image", "size", 12345)
        expected = InvalidDescriptor
    elif case == "checksum":
        _corrupt_the_repository_blob(vm_grid, ws)
        expected = ChecksumMismatch
    elif case == "vmm-failure":
        set_field(d, "hardware", "memory", 8)        # below what the VMM can define: libvirt refuses
        expected = VMMFault
    else:
        expected = InvalidArgument
    with pytest.raises(expected):
        vm.deploy(d, "same", 300, wait=True)
    if case == "duplicate-identifier":
        vm.destroy(kept.ref)
    assert_nothing_held(vm_grid)
    assert vm_grid.authz_service.authority.slots() == []
    assert list(vm_grid.node().cache.incoming.glob("*")) == []
    failed = [i for i in vm.list(include_ended=True) if i.state == "Failed"]
    if case in ("checksum", "vmm-failure"):      # failed after registration: recorded with the reason
        assert failed and expected.__name__ in failed[-1].failure


def test_a_removed_image_never_deploys_though_the_node_reused_its_verdict(vm_grid, grid_pki):
    """The node reuses the repository's verdict on a descriptor ([vmmanager] verdict_seconds): the second
    deployment does not ask for it. Once the image is removed, a deployment of its descriptor within that
    time is refused all the same (the repository refuses the hold), holds nothing, and the node asks again."""
    ws = vm_grid.register()
    vm = vm_grid.vmm(grid_pki.alice)
    vm.destroy(vm.deploy(ws, "first", 300, wait=True).ref)
    access = vm_grid.node().repository
    assert [i[0] for i in access._verdicts] == [Descriptor(ws).image_id]      # the verdict kept
    vm_grid.repo(grid_pki.admin).remove(Descriptor(ws).image_id)
    with pytest.raises((UnknownImage, AccessDenied)):
        vm.deploy(ws, "after-removal", 300, wait=True)
    assert access._verdicts == {}                        # dropped: the next deployment asks the repository
    with pytest.raises((UnknownImage, AccessDenied)):
        vm.deploy(ws, "again", 300, wait=True)
    assert_nothing_held(vm_grid)
    assert vm_grid.authz_service.authority.slots() == []


def test_an_asynchronous_deploy_is_watched_to_running(vm_grid, grid_pki):
    vm = vm_grid.vmm(grid_pki.alice)
    info = vm.deploy(vm_grid.register(size="512M", fill=b"y" * 65536), "async", 600)
    assert info.state in ("Registered", "Staging", "Starting", "Running")
    seen = []
    final = vm.wait_for(info.ref, ("Running",), timeout=60, on_update=lambda i: seen.append(i.state))
    assert final.state == "Running" and seen[-1] == "Running"
    assert "stage" in dict(final.phases)


def test_lifetime_expiry_destroys_and_releases_everything(vm_grid, grid_pki):
    vm = vm_grid.vmm(grid_pki.alice)
    info = vm.deploy(vm_grid.register(), "short", 3, wait=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and vm_grid.node().store.get(info.ref.key).state != "Destroyed":
        time.sleep(0.2)
    assert vm_grid.node().store.get(info.ref.key).state == "Destroyed"
    with pytest.raises(ResourceUnknown):
        vm.status(info.ref)
    # the sweeper commits Destroyed first and then gives the image hold and the slot back to the central services
    # (nobody waits for an expiry's answer): they are given back soon after, not at the same instant
    empty = {"live": [], "leases": [], "dirs": [], "domains": [], "holds": []}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (node_holdings(vm_grid) != empty or info.ref.key in [
            s.instance for s in vm_grid.authz_service.authority.slots()]):
        time.sleep(0.1)
    assert_nothing_held(vm_grid)
    assert info.ref.key not in [s.instance for s in vm_grid.authz_service.authority.slots()]


def test_set_termination_time_refuses_the_past_and_nil(vm_grid, grid_pki):
    vm = vm_grid.vmm(grid_pki.alice)
    ws = vm_grid.register()
    ref = vm.deploy(ws, "t", 600, wait=True).ref
    with pytest.raises(InvalidArgument):
        vm.set_termination_time(ref, when=datetime.now(timezone.utc) - timedelta(minutes=1))
    new, _ = vm.set_termination_time(ref, when=datetime.now(timezone.utc) + timedelta(hours=2))
    assert new > datetime.now(timezone.utc) + timedelta(minutes=119)
    # the node's hold on the image (one per image and node) was renewed, not doubled
    assert node_holdings(vm_grid)["holds"] == [f"image:{Descriptor(ws).image_id}"]
    db = sqlite3.connect(vm_grid.repo_service.catalogue.path)
    try:
        (expires,) = db.execute("SELECT expires FROM holds").fetchone()
    finally:
        db.close()
    assert expires >= new.timestamp()


def test_subscribers_receive_signed_state_changes(vm_grid, grid_pki):
    vm = vm_grid.vmm(grid_pki.alice)
    ref = vm.deploy(vm_grid.register(), "watched", 600, wait=True).ref
    with NotificationConsumer(grid_pki.trust()) as consumer:
        consumer.subscribe(vm, ref)
        vm.pause(ref)
        change = consumer.wait(lambda c: c.new == "Paused")
        assert (change.key, change.old, change.identifier) == (ref.key, "Running", "watched")
        assert change.signer == grid_pki.host_dn and change.producer == vm_grid.node_url()
        vm.destroy(ref)
        assert consumer.wait(lambda c: c.new == "Destroyed").old == "Paused"


def test_a_notification_not_signed_by_a_host_is_refused(grid_pki):
    import requests

    from security.wssec import sign_envelope
    from services.vmmanager.wire import state_change_envelope as notify_envelope

    with NotificationConsumer(grid_pki.trust()) as consumer:
        env = notify_envelope(consumer.url, "https://x/", "inst-" + "0" * 32, "x", "Running", "Paused", time.time())
        forged = sign_envelope(env, grid_pki.bob.proxy)     # a user, not a host
        assert requests.post(consumer.url, data=forged).status_code == 500
        assert requests.post(consumer.url, data=b"<notsigned/>").status_code == 500
        assert consumer.refused == 2 and consumer.changes.empty()


def test_an_instance_request_without_its_key_is_resource_unknown(vm_grid, grid_pki):
    vm = vm_grid.vmm(grid_pki.alice)
    with pytest.raises(ResourceUnknown):
        vm.service.call("Pause")
    with pytest.raises(ResourceUnknown):
        vm.pause(InstanceRef(vm_grid.node_url(), "inst-" + "f" * 32))


def test_a_restarted_node_on_the_test_driver_fails_the_instances_it_lost(vm_grid, grid_pki):
    """The test driver keeps its VMs in the process: a new process has none. The records say so."""
    from services.vmmanager.vmm import LibvirtTestDriver

    vm = vm_grid.vmm(grid_pki.alice)
    ref = vm.deploy(vm_grid.register(), "lost", 600, wait=True).ref
    svc = vm_grid.node()
    cfg_like = svc.config
    svc.close()
    from services.vmmanager.service import VMManagerService
    again = VMManagerService(svc.state_dir, cfg_like, svc.authz.pdp, vmm=LibvirtTestDriver.private_node(),
                             repository=svc.repository)
    try:
        inst = again.store.get(ref.key)
        assert inst.state == "Failed" and "Lost" in inst.failure
        assert again.store.leases() == {} and list(again.instances_dir.iterdir()) == []
        assert again.reconcile_report["failed_lost"] == 1
    finally:
        again.close()


def test_the_node_fails_closed_when_the_authorization_service_is_unreachable(vm_grid, grid_pki):
    """A node whose Authorization service does not answer refuses every operation (ServiceUnavailable),
    and holds nothing for the refused deployment."""
    from services.faults import ServiceUnavailable
    from services.vmmanager.vmm import LibvirtTestDriver
    from tests.fixtures.grid import free_port

    dead = f"https://localhost:{free_port()}/wsrf/services/AuthorizationService"
    vm_grid.add_node("orphan", "10.99.0.200-10.99.0.210", vmm=LibvirtTestDriver.private_node(), authz_url=dead)
    vm = vm_grid.vmm(grid_pki.alice, n=1)
    with pytest.raises(ServiceUnavailable):
        vm.deploy(vm_grid.register(), "refused", 60, wait=True)
    with pytest.raises(ServiceUnavailable):
        vm.list()
    assert node_holdings(vm_grid, 1) == {"live": [], "leases": [], "dirs": [], "domains": [], "holds": []}


def test_a_deploy_has_its_owners_destroy_decided_with_the_claim_and_the_destroy_asks_nothing_more(vm_grid, grid_pki):
    """A node with a permit cache asks the Authorization service about its owner's Destroy of a new instance
    with the ClaimSlot (one message, not two): the Destroy's authorization, still its first step, is answered
    from the cache. Another user's Destroy is still asked about and denied; nothing is held afterwards."""
    from services.vmmanager.vmm import LibvirtTestDriver

    vm_grid.add_node("cached", "10.99.0.200-10.99.0.210", vmm=LibvirtTestDriver.private_node(), permit_ttl=60)
    alice, bob = vm_grid.vmm(grid_pki.alice, n=1), vm_grid.vmm(grid_pki.bob, n=1)
    ws = vm_grid.register()
    failing = copy.deepcopy(ws)
    set_field(failing, "hardware", "memory", 8)      # fails after the claim (libvirt refuses): its slot given back
    with pytest.raises(VMMFault):
        alice.deploy(failing, "fails", 600, wait=True)
    assert vm_grid.authz_service.authority.slots() == []
    info = alice.deploy(ws, "ahead", 600, wait=True)
    with pytest.raises(AccessDenied):
        bob.destroy(info.ref)
    alice.destroy(info.ref)
    audit = vm_grid.authz_service.authority.audit
    decisions = [r for r in audit.read(event="decision", limit=1000) if r["action"] == "vm.destroy"]
    [claim] = [r for r in audit.read(event="slot", limit=1000) if r.get("instance") == info.ref.key and
               r["result"] == "claimed"]
    decisions = [r for r in decisions if r["resource"]["id"] == info.ref.key]
    assert [(r["subject"], r["decision"], r.get("ahead_of")) for r in decisions] == [
        (grid_pki.alice.dn, "permit", claim["id"]), (grid_pki.bob.dn, "deny", None)]
    assert decisions[0]["resource"] == {"type": "instance", "owner": grid_pki.alice.dn, "vo": "bio",
                                        "node": "cached", "id": info.ref.key, "image": ws.findtext("{*}identity/{*}imageId")}
    assert node_holdings(vm_grid, 1) == {"live": [], "leases": [], "dirs": [], "domains": [], "holds": []}
    assert vm_grid.authz_service.authority.slots(subject=grid_pki.alice.dn) == []


def _raw_call(url: str, to: str | None, action: str | None, payload, credential, trust):
    """POST one hand-signed request with the given wsa:To / wsa:Action (None: header left out)."""
    from security.tls import grid_session
    from security.wssec import sign_envelope
    from services.container.soap import envelope

    headers = []
    for name, value in (("To", to), ("Action", action)):
        if value is not None:
            h = etree.Element(f"{{http://www.w3.org/2005/08/addressing}}{name}")
            h.text = value
            headers.append(h)
    data = sign_envelope(envelope(payload, headers), credential)
    resp = grid_session(trust.cert_dir).post(url, data=data, timeout=30,
                                             headers={"Content-Type": "text/xml; charset=utf-8"})
    fault = etree.fromstring(resp.content).find(".//{http://schemas.xmlsoap.org/soap/envelope/}Fault")
    return resp.status_code, fault


LIST = "http://vmgrid.org/ns/vmmanager/1/ListInstances"


def test_a_request_signed_for_one_node_is_refused_by_another(vm_grid, grid_pki):
    """Issue 9.1: the signed wsa:To names node1, so node2 refuses it (each node keeps its own replay record)."""
    vm_grid.add_node("node-b", "10.99.0.220-10.99.0.230")
    node1, node2 = vm_grid.node_url(0), vm_grid.node_url(len(vm_grid.nodes) - 1)
    alice, trust = grid_pki.alice.proxy, grid_pki.trust()
    body = lambda: etree.Element("{http://vmgrid.org/ns/vmmanager/1}ListInstances")  # noqa: E731
    status, fault = _raw_call(node1, node1, LIST, body(), alice, trust)
    assert status == 200 and fault is None
    status, fault = _raw_call(node2, node1, LIST, body(), alice, trust)
    assert status == 500 and fault.findtext("faultcode") == "wsa:DestinationUnreachable"
    status, fault = _raw_call(node2, None, LIST, body(), alice, trust)        # no wsa:To at all
    assert status == 500 and fault.findtext("faultcode") == "wsa:MessageAddressingHeaderRequired"


def test_an_action_that_is_not_the_dispatched_operation_is_refused(vm_grid, grid_pki):
    node = vm_grid.node_url(0)
    body = etree.Element("{http://vmgrid.org/ns/vmmanager/1}ListInstances")
    status, fault = _raw_call(node, node, "http://vmgrid.org/ns/vmmanager/1/Destroy", body, grid_pki.alice.proxy,
                              grid_pki.trust())
    assert status == 500 and fault.findtext("faultcode") == "wsa:ActionNotSupported"


def test_a_notify_signed_for_another_consumer_is_refused(grid_pki):
    import requests

    from security.wssec import sign_envelope
    from services.vmmanager.wire import state_change_envelope

    with NotificationConsumer(grid_pki.trust()) as consumer:
        env = state_change_envelope("http://other-consumer.example.org/notify", "https://x/", "inst-" + "0" * 32,
                                    "x", "Running", "Paused", time.time())
        data = sign_envelope(env, grid_pki.host)
        assert requests.post(consumer.url, data=data).status_code == 500
        assert consumer.refused == 1 and consumer.changes.empty()


def test_a_notify_replayed_to_its_consumer_is_refused(grid_pki):
    """The consumer listens on plain HTTP: anyone on the way can capture a signed Notify and send it again (an old
    Paused after the Running that followed it). Fails without the consumer's replay cache: both were taken."""
    import requests

    from security.wssec import sign_envelope
    from services.vmmanager.wire import state_change_envelope

    with NotificationConsumer(grid_pki.trust(), producers=[grid_pki.host_dn]) as consumer:
        env = state_change_envelope(consumer.url, "https://localhost/", "inst-" + "0" * 32, "x", "Running",
                                    "Paused", time.time())
        data = sign_envelope(env, grid_pki.host)
        assert requests.post(consumer.url, data=data).status_code == 200
        assert consumer.changes.get(timeout=5).new == "Paused"
        response = requests.post(consumer.url, data=data)
        assert response.status_code == 500 and "replayed" in response.text
        assert consumer.refused == 1 and consumer.changes.empty()


def test_a_guest_containers_certificate_is_no_node_to_the_central_services(vm_grid, grid_pki, tmp_path):
    """The certificate a node issues to a guest's grid container (here with the site CA as guest CA, as the main
    job configures it) is a host DN whose key the VM's owner holds as root. It passed the default policy's
    "/O=Grid/*/CN=host/*" as a node and an enforcement point: alice's guest read a private hep image and listed
    and could release anyone's slots. Fails without [policy] guests: both answered 200."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from security.pki import Credential, new_key
    from services.vmmanager.guestcred import issue
    from services.vmmanager.service import VMManagerConfig
    from tests.fixtures.repository import signed_call

    hep = vm_grid.register(name="hep-private", vo="hep")
    image_id = hep.findtext(".//{*}imageId")
    key = new_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    pem, record = issue(VMManagerConfig(node="node1", guest_ca=str(grid_pki.ca.directory)),
                        {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "port": 8443},
                        "10.99.0.12", "vm-12")
    guest = Credential(x509.load_pem_x509_certificate(pem.encode()), key, ())
    assert record["dn"] == "/O=Grid/OU=vmgrid-guests/CN=host/10.99.0.12"
    repo, authz = "http://vmgrid.org/ns/vmrepository/1", "http://vmgrid.org/ns/authz/1"
    read = etree.fromstring(f'<r:GetDescriptor xmlns:r="{repo}"><r:image>{image_id}</r:image></r:GetDescriptor>')
    status, answer = signed_call(vm_grid.repository_url, read, grid_pki.bob.proxy, grid_pki.trust())
    assert status == 200                                                     # hep's own member reads it
    status, fault = signed_call(vm_grid.repository_url, read, guest, grid_pki.trust())
    assert status == 500 and "guests-are-not-grid-identities" in fault.findtext("faultstring")
    status, fault = signed_call(vm_grid.authz_url, etree.fromstring(f'<a:ListSlots xmlns:a="{authz}"/>'), guest,
                                grid_pki.trust())
    assert status == 500 and "not an enforcement point" in fault.findtext("faultstring")


def test_a_notify_about_another_hosts_instance_is_refused(grid_pki):
    """The consumer took a state change from any host certificate, whatever node it named as producer: another
    node, or a guest's container (a host DN whose key the VM's owner holds), could tell a scientist that her VM on
    node1 was Destroyed. The signer must be the producer's host. Fails without: the change was taken."""
    import requests

    from security.wssec import sign_envelope
    from services.vmmanager.wire import state_change_envelope

    other = grid_pki.issue_host("node2.example.org")
    with NotificationConsumer(grid_pki.trust(), producers=[grid_pki.host_dn, other.subject]) as consumer:
        env = state_change_envelope(consumer.url, "https://localhost:8443/wsrf/services/VMManagerService",
                                    "inst-" + "0" * 32, "x", "Running", "Destroyed", time.time())
        response = requests.post(consumer.url, data=sign_envelope(env, other))
        assert response.status_code == 500 and "signed by /O=Grid/OU=vmgrid/CN=host/node2.example.org" in response.text
        assert consumer.refused == 1 and consumer.changes.empty()
        env = state_change_envelope(consumer.url, "https://localhost:8443/wsrf/services/VMManagerService",
                                    "inst-" + "0" * 32, "x", "Running", "Destroyed", time.time())
        assert requests.post(consumer.url, data=sign_envelope(env, grid_pki.host)).status_code == 200
        assert consumer.changes.get(timeout=5).new == "Destroyed"


def test_a_lifetime_outside_the_schema_is_a_fault_saying_what_is_expected(vm_grid, grid_pki):
    """Deploy's lifetime is an anonymous restriction (a positiveInteger up to a year): libxml2 alone says only
    "not a valid value of the local atomic type"; the fault says what the schema expects."""
    ws = vm_grid.register()
    vm = vm_grid.vmm(grid_pki.alice)
    with pytest.raises(InvalidArgument) as exc:
        vm.deploy(ws, "zero", 0, wait=True)
    assert "lifetime" in str(exc.value) and "expected a positiveInteger at most 31536000" in str(exc.value)
    assert_nothing_held(vm_grid)
