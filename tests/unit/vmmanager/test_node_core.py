"""The VMManager's node core without HTTP, SOAP or GridFTP: libvirt's test driver (a private node per
test), a fake image source standing in for the repository (the one part replaced: it serves a local
qcow2 file and records holds), and the policy engine over the default site policy as the local policy
point. Authorization comes before anything about an instance is revealed."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
import time
import types
from pathlib import Path

import pytest
from lxml import etree

from services.authz.engine import site_policy_point
from services.authz.pep import Subject
from services.descriptor import Descriptor, parse_descriptor, set_field
from services.faults import AccessDenied, IllegalTransition, InvalidArgument, ResourceUnknown
from services.vmmanager import wire
from services.vmmanager.config import VMManagerConfig
from services.vmmanager.node import Node
from services.vmmanager.values import DeployRequest
from services.vmmanager.states import COLD_PHASES as PHASES
from services.vmmanager.states import State
from services.vmmanager.vmm import LibvirtTestDriver

EXAMPLES = Path(__file__).resolve().parents[3] / "wsdl" / "examples"
ALICE, BOB = Subject("/O=Grid/OU=t/CN=alice"), Subject("/O=Grid/OU=t/CN=bob")
NODE_ADDRESS = "https://node1.example.org:8443/wsrf/services/VMManagerService"


class FakeImageSource:
    """Stands in for RepositoryAccess (no repository process here): the descriptor it knows, a local qcow2."""

    def __init__(self, image: Path, descriptor: Descriptor):
        self.image, self.known = image, descriptor
        self.holds: dict[str, tuple[str, int]] = {}
        self.fetches = 0

    def verify(self, d: Descriptor) -> None:
        assert d.image_id == self.known.image_id

    def hold(self, image_id: str, holder: str, seconds: int) -> str:
        return self.hold_until(image_id, holder, seconds)[0]

    def hold_until(self, image_id: str, holder: str, seconds: int) -> tuple[str, float]:
        """As the repository: one hold per holder, renewed under its id when asked again."""
        self.hold_calls = getattr(self, "hold_calls", 0) + 1
        hold = next((h for h, (who, _) in self.holds.items() if who == holder), f"hold-{self.hold_calls}")
        self.holds[hold] = (holder, seconds)
        return hold, time.time() + seconds

    def release(self, hold_id: str) -> None:
        self.holds.pop(hold_id, None)

    def fetch(self, image_id, sha256, size, dest: Path, progress, blake3=None) -> None:
        self.fetches += 1
        self.blake3 = blake3
        shutil.copyfile(self.image, dest)

    def close(self) -> None:
        pass


def make_node(tmp_path: Path, config: VMManagerConfig | None = None) -> Node:
    """A node on a private test driver, its image served by a FakeImageSource (also used by test_guard.py)."""
    image = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    ws = parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes())
    data = image.read_bytes()
    for section, name, value in (("identity", "imageId", "img-" + "1" * 32), ("identity", "owner", ALICE.dn),
                                 ("identity", "vo", "bio"), ("image", "sha256", hashlib.sha256(data).hexdigest()),
                                 ("image", "size", len(data)), ("image", "format", "qcow2")):
        set_field(ws, section, name, value)
    source = FakeImageSource(image, Descriptor(ws))
    policy = site_policy_point(vos={"bio": {"members": [ALICE.dn]}, "hep": {"members": [BOB.dn]}})
    n = Node(tmp_path / "node", config or VMManagerConfig(node="node1"), policy,
             vmm=LibvirtTestDriver.private_node(), repository=source, address=NODE_ADDRESS)
    n.ws, n.source = ws, source
    return n


@pytest.fixture
def node(tmp_path):
    n = make_node(tmp_path)
    yield n
    n.close()


def deploy(node: Node, identifier: str = "blast", lifetime: int = 600, **kw):
    return node.deploy(ALICE, DeployRequest(Descriptor(node.ws), etree.tostring(node.ws), identifier, lifetime,
                                            wait=True, **kw))


def test_deploy_runs_every_phase_and_holds_the_image_in_the_nodes_name(node):
    view = deploy(node)
    inst = node.store.get(view.inst.key)
    assert inst.state == State.RUNNING.value and inst.address and inst.mac
    assert [p for p, _ in inst.phase_list()] == [p for p in PHASES if p != "guest-ready"]
    assert node.source.fetches == 1
    assert node.source.blake3 is None                    # a descriptor without image/blake3: verified by sha256
    (holder, _), = node.source.holds.values()
    assert holder == f"{NODE_ADDRESS}#image:{inst.image_id}"      # the configured address, no caller chose it
    deploy(node, "second")
    assert node.source.fetches == 1                      # cached: not staged again


def test_a_deploy_without_wait_answers_its_registration_even_when_the_phases_start_first(node, monkeypatch):
    """Deploy without wait answers the registration (Registered, its lease) while the phases go on on the node's
    executor. Its answer was read after handing them over, so a phase that committed first (Staging) could be
    answered instead (seen in the QEMU tier under load): here the executor runs them before submit returns."""
    monkeypatch.setattr(node.executor, "submit", lambda fn, *args: fn(*args))
    view = node.deploy(ALICE, DeployRequest(Descriptor(node.ws), etree.tostring(node.ws), "blast", 600, wait=False))
    assert view.inst.state == State.REGISTERED.value and view.inst.address and view.inst.mac
    assert node.store.get(view.inst.key).state == State.RUNNING.value      # the phases did run


def test_a_deployments_commits_are_on_the_disk_once_before_it_answers_and_before_a_hold_is_asked(node, monkeypatch):
    """NodeStore.one_sync: the deployment's commits written without an fsync each, the WAL synced once after the last
    of them and before deploy returns; the hold's intent synced before the repository is asked (a spy on
    os.fdatasync that passes every call through, beside SQLite's own commits seen by its trace callback)."""
    import os as _os

    events: list[str] = []
    real = _os.fdatasync

    def spy(fd):
        events.append("sync " + _os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
        return real(fd)

    monkeypatch.setattr(_os, "fdatasync", spy)
    node.store._db().set_trace_callback(lambda sql: sql.strip().upper() == "COMMIT" and events.append("commit"))
    ask = node.source.hold_until
    node.source.hold_until = lambda *a: (events.append("hold asked"), ask(*a))[1]
    view = deploy(node)
    wal = node.store.path.name + "-wal"
    assert node.store.get(view.inst.key).state == State.RUNNING.value
    assert events.count("commit") >= 5
    # the intent (hold_holder) committed and synced before the hold is asked; the rest synced once at the end
    first = events.index("hold asked")
    assert events[first - 1] == f"sync {wal}" and "commit" in events[:first - 1]
    assert events[-1] == f"sync {wal}" and events[-2] == "commit"
    assert events.count(f"sync {wal}") == 2
    assert node.store._db().execute("PRAGMA synchronous").fetchone()[0] == 2     # FULL again outside
    events.clear()
    deploy(node, "second")       # the node's hold covers it: nothing asked, one sync after the last commit
    assert "hold asked" not in events and events.count(f"sync {wal}") == 1 and events[-1] == f"sync {wal}"


def test_the_instances_of_an_image_share_the_nodes_hold_released_with_the_last(node):
    """One hold per image and node: a second deployment within the hold asks the repository nothing; the
    hold stays while any instance of the image lives and goes with the last; one that would outlive the
    hold renews it (the same hold)."""
    first = deploy(node, "one", lifetime=600).inst.key
    second = deploy(node, "two", lifetime=600).inst.key
    assert node.source.hold_calls == 1 and len(node.source.holds) == 1
    hold = node.store.get(first).hold_id
    assert node.store.get(second).hold_id == hold
    node.destroy(ALICE, first)
    assert list(node.source.holds) == [hold]             # the other instance still needs it
    longer = deploy(node, "longer", lifetime=600 + 2 * 3600).inst.key   # beyond the hold's slack: renewed
    assert node.source.hold_calls == 2 and list(node.source.holds) == [hold]
    assert node.source.holds[hold][1] > 2 * 3600
    node.destroy(ALICE, second)
    assert list(node.source.holds) == [hold]
    node.destroy(ALICE, longer)
    assert list(node.source.holds) == [hold]             # the last instance ended: kept for hold_linger
    node.sweep(time.time() + node.config.hold_linger + 1)
    assert node.source.holds == {}                       # unused that long: given back
    deploy(node, "after")                                # a new hold: the node forgot the released one
    assert node.source.hold_calls == 3 and len(node.source.holds) == 1


def test_a_hold_lingers_after_its_last_instance_so_a_stream_of_deployments_holds_the_image_once(node):
    """Deploy, destroy, deploy, destroy...: the node's hold on the image outlives its last instance by
    [vmmanager] hold_linger, so the next deployment asks the repository nothing and nothing is released in
    between; the release waits in the outbox (it survives a restart) and goes once the hold was unused that long."""
    for i in range(3):
        node.destroy(ALICE, deploy(node, f"cycle{i}").inst.key)
    assert node.source.hold_calls == 1 and len(node.source.holds) == 1
    (entry,) = node.store.outbox()
    assert entry[1] == "idle-hold" and entry[2] == f"{NODE_ADDRESS}#image:img-{'1' * 32}"
    assert node.deliver_outbox(time.time() + 1) == 1     # not yet due
    key = deploy(node, "taken-again").inst.key           # taken again before it was due: kept
    assert node.deliver_outbox(time.time() + node.config.hold_linger + 1) == 0
    assert len(node.source.holds) == 1 and node.source.hold_calls == 1
    node.destroy(ALICE, key)
    assert node.deliver_outbox(time.time() + node.config.hold_linger + 1) == 0
    assert node.source.holds == {}


def test_without_a_linger_the_last_instance_gives_the_hold_back_at_once(node):
    node.config.hold_linger = 0
    node.destroy(ALICE, deploy(node).inst.key)
    assert node.source.holds == {} and node.store.outbox() == []


def test_staging_verifies_with_the_descriptors_blake3(node, tmp_path):
    """A descriptor that carries image/blake3 (the repository computes it at ingest) is staged verified by
    it: the node hands it to the image source (GridFTP then checks the bytes with BLAKE3)."""
    set_field(node.ws, "image", "blake3", "c" * 64)
    deploy(node, "with-blake3")
    assert node.source.blake3 == "c" * 64


def test_operations_go_through_the_state_machine(node):
    key = deploy(node).inst.key
    assert node.pause(ALICE, key) == State.PAUSED
    with pytest.raises(IllegalTransition):
        node.pause(ALICE, key)
    assert node.resume(ALICE, key) == State.RUNNING
    assert node.save(ALICE, key) == State.SAVED
    assert node.restore(ALICE, key) == State.RUNNING
    node.destroy(ALICE, key)
    assert node.store.get(key).state == State.DESTROYED.value
    assert node.store.leases() == {}
    node.sweep(time.time() + node.config.hold_linger + 1)
    assert node.source.holds == {}


@pytest.mark.parametrize("operation", [
    lambda n, k: n.pause(BOB, k), lambda n, k: n.destroy(BOB, k), lambda n, k: n.inspect(BOB, k),
    lambda n, k: n.set_termination_time(BOB, k, time.time() + 60),
    lambda n, k: n.set_termination_time(BOB, k, time.time() - 60),     # past: still authorization first
    lambda n, k: n.subscribe(BOB, k, "https://192.0.2.1/x", None),
])
def test_another_vo_is_refused_before_anything_about_the_instance_is_revealed(node, operation):
    key = deploy(node).inst.key
    node.destroy(ALICE, key)                  # a destroyed instance: bob must not learn that
    with pytest.raises(AccessDenied):
        operation(node, key)


def test_the_owner_learns_that_an_ended_instance_is_gone(node):
    key = deploy(node).inst.key
    node.destroy(ALICE, key)
    with pytest.raises(ResourceUnknown, match="destroyed"):
        node.pause(ALICE, key)
    with pytest.raises(ResourceUnknown):
        node.pause(ALICE, "inst-" + "0" * 32)


def test_set_termination_time_and_the_sweeper(node):
    key = deploy(node).inst.key
    new = node.set_termination_time(ALICE, key, time.time() + 30)
    assert node.store.get(key).termination == new
    with pytest.raises(InvalidArgument, match="past"):
        node.set_termination_time(ALICE, key, time.time() - 1)
    assert node.sweep(new + 1) == [key]
    assert node.store.get(key).state == State.DESTROYED.value


def test_subscribe_refuses_the_nodes_own_loopback_unless_configured(node):
    key = deploy(node).inst.key
    with pytest.raises(InvalidArgument, match="loopback"):
        node.subscribe(ALICE, key, "http://127.0.0.1:9/consumer", None)
    sub = node.subscribe(ALICE, key, "https://192.0.2.7/consumer", time.time() + 10)
    assert sub.key.startswith("sub-") and sub.expires <= node.store.get(key).termination


def test_resource_properties_are_served_generically_from_one_set(node):
    view = node.inspect(ALICE, deploy(node).inst.key)
    req = etree.Element("{http://docs.oasis-open.org/wsrf/rp-2}GetMultipleResourceProperties",
                        nsmap={"vmm": wire.VMM_NS})
    for name in ("State", "Address", "PhaseTimings", "StagingProgress"):
        etree.SubElement(req, "{http://docs.oasis-open.org/wsrf/rp-2}ResourceProperty").text = f"vmm:{name}"
    resp = wire.INSTANCE_PROPERTIES.get_multiple(view, req)
    assert wire.StateProperty.read(resp) == "Running"
    assert wire.Address.read(resp) == view.inst.address
    assert [p for p, _ in wire.PhaseTimings.read(resp)][:2] == ["authorize", "register"]
    assert wire.StagingProgress.read(resp)[0] == view.inst.size
    el = wire.instance_element(view, node.address)
    assert el.findtext(f"{{{wire.NS['wsa']}}}EndpointReference/{{{wire.NS['wsa']}}}Address") == NODE_ADDRESS


def test_the_console_log_property_is_the_tail_of_the_first_serial_log(node):
    """ConsoleLog: one class and one entry in wire.py (docs/architecture.md, "a new resource property")."""
    view = node.inspect(ALICE, deploy(node).inst.key)
    req = etree.Element("{http://docs.oasis-open.org/wsrf/rp-2}GetResourceProperty", nsmap={"vmm": wire.VMM_NS})
    req.text = "vmm:ConsoleLog"
    assert wire.ConsoleLog.read(wire.INSTANCE_PROPERTIES.get(view, req)) is None     # no console file yet
    (view.home / "serial0.log").write_bytes(b"x" * 10_000 + b"\x00login: \x1b[0m\n")
    text = wire.ConsoleLog.read(wire.INSTANCE_PROPERTIES.get(view, req))
    assert len(text) == wire.ConsoleLog.TAIL and text.endswith("\ufffdlogin: \ufffd[0m\n")
    assert wire.ConsoleLog.qname not in {el.tag for el in wire.instance_element(view, node.address)}


def repository_down(node) -> list[bool]:
    """The node's repository refuses hold releases (ServiceUnavailable) while the returned flag's [0] is true."""
    from services.faults import ServiceUnavailable
    release, down = node.source.release, [True]

    def unreachable(hold: str) -> None:
        if down[0]:
            raise ServiceUnavailable("the VMRepository cannot be reached", service="test")
        release(hold)

    node.source.release = unreachable
    return down


def test_destroy_succeeds_when_the_repository_cannot_take_the_hold_back_and_the_release_is_retried(node):
    key = deploy(node).inst.key
    (hold_id,) = node.source.holds
    down = repository_down(node)
    node.config.hold_linger = 0                              # given back at the destroy (a lingering one: below)
    node.destroy(ALICE, key)                                 # answered: the instance is destroyed
    inst = node.store.get(key)
    assert inst.state == State.DESTROYED.value and "releases pending" in inst.guest_status
    assert [(kind, arg) for _, kind, _, arg, _ in node.store.outbox()] == [("hold", hold_id)]
    assert node.deliver_outbox(time.time() + 60) == 1        # still down: kept
    down[0] = False
    assert node.deliver_outbox(time.time() + 120) == 0
    assert node.source.holds == {} and "delivered" in node.store.get(key).guest_status


def test_a_lingering_holds_release_is_retried_while_the_repository_cannot_take_it(node):
    key = deploy(node).inst.key
    down = repository_down(node)
    node.destroy(ALICE, key)
    assert "pending" not in node.store.get(key).guest_status   # nothing asked of the repository yet
    later = time.time() + node.config.hold_linger + 1
    assert node.deliver_outbox(later) == 1                   # due, the repository down: kept
    assert len(node.source.holds) == 1
    down[0] = False
    assert node.deliver_outbox(later + 60) == 0
    assert node.source.holds == {}
    deploy(node, "after")                                    # the node forgot the released hold: asks anew
    assert node.source.hold_calls == 2


# -- ListInstances in pages (services/vmmanager/listing.py) -------------------------------------------------
def _record(node: Node, owner: Subject, identifier: str, created: float):
    """An instance record straight into the node's store (listing reads records only)."""
    from services.vmmanager.store import Instance

    key = f"inst-{identifier:0>32}"
    node.store.insert(Instance(key=key, identifier=identifier, owner=owner.dn, vo="bio", image_id="img-1",
                               image_name="x", sha256="0" * 64, size=1, format="qcow2", memory=64, vcpus=1,
                               descriptor=b"<x/>", state=State.RUNNING.value, initial_state="Running", address=None,
                               mac=None, created=created, termination=created + 600, max_lifetime=None, token="t"))
    return key


def _walk(node: Node, who: Subject, limit: int | None, include_ended: bool = False) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page = node.list_page(who, include_ended, limit=limit, cursor=cursor)
        pages.append([v.inst.key for v in page.views])
        if not page.more:
            return pages
        cursor = page.cursor


def test_list_pages_follow_the_cursor_through_the_callers_own_instances_only(node):
    now = time.time()
    mine = [_record(node, ALICE, f"a{i}", now + i // 2) for i in range(7)]   # pairs created at the same time
    _record(node, BOB, "b0", now)
    assert _walk(node, ALICE, 3) == [mine[0:3], mine[3:6], mine[6:7]]
    assert _walk(node, ALICE, 7) == [mine]
    assert _walk(node, BOB, None) == [[f"inst-{'b0':0>32}"]]
    node.config.list_page = 4                                    # no maxResults: the node's page size
    assert _walk(node, ALICE, None) == [mine[0:4], mine[4:7]]
    # instances ending or arriving between pages: none listed twice, none of those left skipped
    first = node.list_page(ALICE, limit=3)
    node.store.set_state(mine[3], State.DESTROYED)
    later = _record(node, ALICE, "a9", now + 100)
    rest = node.list_page(ALICE, limit=10, cursor=first.cursor)
    assert [v.inst.key for v in rest.views] == mine[4:] + [later] and not rest.more
    ended = node.list_page(ALICE, True, limit=10, cursor=node.list_page(ALICE, True, limit=3).cursor)
    assert mine[3] in [v.inst.key for v in ended.views]


@pytest.mark.parametrize("bad", ["bob's", "altered", "garbage", "too long", "other node", "includeEnded"])
def test_a_cursor_not_given_to_the_caller_for_this_listing_is_refused(node, bad):
    from services.vmmanager.listing import Cursors

    now = time.time()
    for i in range(3):
        _record(node, ALICE, f"a{i}", now + i)
        _record(node, BOB, f"b{i}", now + i)
    cursor = node.list_page(ALICE, limit=1).cursor
    who, include_ended = ALICE, False
    if bad == "bob's":
        who = BOB                                      # alice's cursor shows bob nothing of alice's
    elif bad == "altered":
        cursor = cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB")
    elif bad == "garbage":
        cursor = "%%%not base64%%%"
    elif bad == "too long":
        cursor = "A" * 10_000
    elif bad == "other node":
        cursor = Cursors().make(ALICE.dn, False, now, "inst-" + "0" * 32)
    else:
        include_ended = True
    with pytest.raises(InvalidArgument) as refused:
        node.list_page(who, include_ended, limit=1, cursor=cursor)
    assert refused.value.argument == "cursor"


@pytest.mark.parametrize("limit", [0, -1, 1001])
def test_a_page_size_out_of_range_is_refused(node, limit):
    with pytest.raises(InvalidArgument) as refused:
        node.list_page(ALICE, limit=limit)
    assert refused.value.argument == "maxResults"


def test_a_listed_instance_is_rendered_once_while_its_record_stays_the_same(node):
    from services.vmmanager.listing import Page

    key = deploy(node, "listed").inst.key
    fragments = wire.InstanceFragments()

    def listed():
        resp = wire.list_response(node.list_page(ALICE), NODE_ADDRESS, fragments)
        el, = resp.iterfind("vmm:Instance", wire.NS)
        return el

    first, second = listed(), listed()
    assert fragments.rendered == 1                                    # the second was a copy
    assert etree.tostring(first.find("vmm:State", wire.NS)) == etree.tostring(second.find("vmm:State", wire.NS))
    assert second.find("wsrf-rl:CurrentTime", wire.NS).text                # set on every copy
    node.pause(ALICE, key)                                             # the record changed: rendered again
    assert listed().findtext("vmm:State", namespaces=wire.NS) == "Paused" and fragments.rendered == 2
    resp = wire.list_response(Page([], "c"), NODE_ADDRESS, fragments)
    assert resp.findtext("vmm:more", namespaces=wire.NS) == "true" and resp.findtext("vmm:cursor", namespaces=wire.NS) == "c"
    # the answer as the contract declares it (wsdl/vmmanager.xsd), a page with a cursor as well as the last
    from services.container.contract import Contract

    validator = Contract("vmmanager.wsdl").validator
    deploy(node, "second")
    page = node.list_page(ALICE, limit=1)
    for answer in (wire.list_response(page, NODE_ADDRESS, fragments),
                   wire.list_response(node.list_page(ALICE, cursor=page.cursor), NODE_ADDRESS, fragments)):
        validator.assertValid(answer)
    small = wire.InstanceFragments(size=1)                              # bounded: the least recently listed go
    wire.list_response(node.list_page(ALICE), NODE_ADDRESS, small)
    assert len(small._kept) == 1


def test_guests_that_stop_by_themselves_are_shutoff_through_the_nodes_long_lived_handlers(node):
    """libvirt's STOPPED events go to a few handler threads started with the node (not a thread per event), which
    mark a Running instance whose guest stopped Shutoff; a Destroy's own stop changes nothing; close() ends them."""
    node.start()
    views = [deploy(node, f"self-stop-{i}") for i in range(3)]
    handled, threads = threading.Semaphore(0), set()
    real = node._guest_stopped

    def observed(event):
        real(event)
        threads.add(threading.current_thread().name)
        handled.release()

    node._guest_stopped = observed
    for view in views[:2]:
        node.vmm.destroy(view.inst.key)             # behind the node's back: as a guest powering itself off
    node.destroy(ALICE, views[2].inst.key)
    for _ in range(3):
        assert handled.acquire(timeout=60)
    states = [node.store.get(v.inst.key) for v in views]
    assert [s.state for s in states] == [State.SHUTOFF.value, State.SHUTOFF.value, State.DESTROYED.value]
    assert all(s.guest_status.startswith("stopped by itself") for s in states[:2])
    assert threads and all(name.startswith("vmgrid-guest-stopped-") for name in threads)
    handlers = list(node._stopped_handlers)
    node.close()
    for handler in handlers:
        handler.join(10)
        assert not handler.is_alive()
    node.close = lambda: None                       # closed already (the fixture closes it again)


def test_a_node_for_real_guests_with_a_deep_state_directory_puts_their_channel_sockets_in_a_short_private_one(tmp_path):
    """A guest's channel is a Unix socket (107 bytes at most): with a state directory too deep for
    <state_dir>/instances/inst-<32 hex>/guestd.sock, the node starts and puts the sockets in a short private
    directory (0700) that a rebuild of the spec (a restart) finds again; an ended instance's socket is removed.
    Before, the node refused to start (and before that every deploy failed at `define`)."""
    import dataclasses
    import os
    import stat

    def start() -> Node:
        vmm = LibvirtTestDriver.private_node()
        vmm.capabilities = dataclasses.replace(vmm.capabilities, guest_channel=True)
        try:
            return Node(deep, VMManagerConfig(node="node1"), policy, vmm=vmm, repository=nothing,
                        address=NODE_ADDRESS)
        except Exception:
            vmm.close()
            raise

    policy = site_policy_point(vos={"bio": {"members": [ALICE.dn]}})
    deep = tmp_path / ("d" * (120 - len(str(tmp_path)))) / "vmmanager"
    nothing = types.SimpleNamespace(close=lambda: None)      # no repository: the node never stages here
    key = "inst-" + "a" * 32
    node = start()
    short = node.parts.channels.short_dir
    try:
        sock = node.parts.channel_path(key)
        assert sock == short / f"{key}.sock" and len(str(sock).encode()) <= 107
        assert stat.S_IMODE(os.lstat(short).st_mode) == 0o700 and os.lstat(short).st_uid == os.getuid()
        node.close()
        node = start()
        assert node.parts.channel_path(key) == sock               # the same after a restart
        sock.write_bytes(b"")                                       # left by a killed QEMU
        node._release(key, quiet=True)
        assert not sock.exists()
        node.close()
        assert not short.exists()                                   # nothing left in it: let go at the stop
        os.mkdir(short, 0o755)                                      # made (or loosened) by someone else
        os.chmod(short, 0o755)
        with pytest.raises(ValueError, match=r"has mode 0755, open to other users: refusing it"):
            start()
    finally:
        node.close()
        shutil.rmtree(short, ignore_errors=True)
