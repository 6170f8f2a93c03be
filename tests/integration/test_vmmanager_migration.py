"""Cold migration between two VMManager nodes on libvirt's test driver, through the grid: the client delegates a
short-lived proxy to the source node, which registers the instance at the target as the user; the target pulls the
overlay and the saved state over GridFTP; one live instance at every moment; every failure rolls back and names
its phase; the old EPR names where the instance went."""
from __future__ import annotations

import dataclasses
import json
from urllib.parse import urlsplit

import pytest

from client.soap import GridServiceClient
from client.vmmanager import VMManagerClient
from security.pki import make_proxy
from services.faults import AccessDenied, InstanceMoved, InvalidArgument, MigrationFault
from services.vmmanager.states import MIGRATION_PHASES
from tests.fixtures.grid import start_grid

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def grid(grid_pki, tmp_path_factory):
    g = start_grid(grid_pki, tmp_path_factory.mktemp("migration") / "grid", nodes=2)
    g.image = g.register(name="migrating")
    try:
        yield g
    finally:
        g.close()


def holdings(grid, n: int) -> dict:
    """What a node holds for live instances: records, leases, directories, domains."""
    svc = grid.node(n)
    return {"live": sorted(i.key for i in svc.store.list(None, live_only=True)),
            "leases": sorted(svc.store.leases()),
            "dirs": sorted(p.name for p in svc.instances_dir.iterdir()),
            "domains": sorted(i.name for i in svc.vmm.list_instances())}


def slots_of(grid, key: str) -> list:
    from services.authz.client import AuthorizationClient
    admin = AuthorizationClient.connect(grid.authz_url, grid.pki.admin.proxy, grid.pki.trust())
    return [s for s in admin.list_slots() if s.instance == key]


def deploy(grid, user, name: str, n: int = 0):
    return grid.vmm(user, n).deploy(grid.image, name, 600, wait=True).ref


def test_a_running_instance_moves_with_its_identity_and_the_old_epr_says_where(grid, grid_pki):
    from services.container.contract import Contract
    src, dst = grid.vmm(grid_pki.alice, 0), grid.vmm(grid_pki.alice, 1)
    contract, original = Contract("vmmanager.wsdl"), src.service.call

    def validated(operation, *args, **kwargs):     # every answer valid against the published schema
        payload = original(operation, *args, **kwargs)
        contract.validator.assertValid(payload)
        return payload
    src.service.call = validated
    ref = deploy(grid, grid_pki.alice, "mover")
    before = src.status(ref)
    moved = src.migrate(ref, grid.node_url(1))
    assert moved.ref.address == grid.node_url(1) and moved.ref.key == ref.key
    assert moved.state == "Running" and moved.node == "node2"
    assert (moved.identifier, moved.owner, moved.image_id) == ("mover", grid_pki.alice.dn, before.image_id)
    assert moved.termination == before.termination
    assert moved.address.startswith("10.99.0.1") and moved.address != before.address   # the target's pool
    assert [p for p, _ in moved.phases] == list(MIGRATION_PHASES)
    assert dst.status(moved.ref).state == "Running"
    with pytest.raises(InstanceMoved) as exc:
        src.status(ref)
    assert exc.value.address == grid.node_url(1)
    # exactly one instance: nothing of it left at the source, all of it at the target
    assert ref.key not in holdings(grid, 0)["live"] + holdings(grid, 0)["leases"] + holdings(grid, 0)["dirs"] \
        + holdings(grid, 0)["domains"]
    held = holdings(grid, 1)
    assert all(ref.key in held[k] for k in ("live", "leases", "dirs", "domains"))
    # the target's audit log shows the user, not the source node, asking for vm.migrate
    entries = [json.loads(line) for line in open(grid.authz_service.state_dir / "audit.log")]
    asked = [e for e in entries if e.get("action") == "vm.migrate" and (e.get("resource") or {}).get("node") == "node2"]
    assert asked and all(e["subject"] == grid_pki.alice.dn and e["decision"] == "permit" for e in asked
                         if e.get("event") == "decision")
    assert len(slots_of(grid, ref.key)) == 1          # the slot moved; it is not counted twice
    # it can move back, and still acts as itself there
    back = dst.migrate(moved.ref, grid.node_url(0))
    assert back.state == "Running" and back.node == "node1"
    assert src.pause(back.ref) == "Paused"
    src.destroy(back.ref)


def test_the_target_gets_the_token_guestd_holds_for_its_fixup_and_keeps_it_no_longer(grid, grid_pki, monkeypatch):
    """The source sends guestd's current token in AcceptMigration (signed, as the user); the target keeps it (0600)
    only until its fixup proves the ``migrated`` request with it, and gives the instance a token of its own."""
    import os
    import stat

    from services.vmmanager import migration
    seen, real = {}, migration._fixup

    def spy(node, inst, running):
        path = node.parts.home(inst.key) / migration.GUEST_TOKEN
        seen.update(token=path.read_text(), mode=stat.S_IMODE(os.stat(path).st_mode), running=running)
        out = real(node, inst, running)
        seen["after"] = path.exists()
        return out
    monkeypatch.setattr(migration, "_fixup", spy)
    src = grid.vmm(grid_pki.alice, 0)
    ref = deploy(grid, grid_pki.alice, "token-mover")
    token = grid.node(0).store.get(ref.key).token
    moved = src.migrate(ref, grid.node_url(1))
    assert seen == {"token": token, "mode": 0o600, "running": True, "after": False}
    assert grid.node(1).store.get(ref.key).token not in ("", token)
    # the test driver has no guest channel: GuestStatus says what was not done
    assert "no guest channel to tell guestd" in grid.vmm(grid_pki.alice, 1).status(moved.ref).guest_status
    grid.vmm(grid_pki.alice, 1).destroy(moved.ref)


@pytest.mark.parametrize("state", ["Paused", "Saved"])
def test_a_paused_or_saved_instance_arrives_in_the_same_state(grid, grid_pki, state):
    src = grid.vmm(grid_pki.alice, 0)
    ref = deploy(grid, grid_pki.alice, f"frozen-{state.lower()}")
    {"Paused": src.pause, "Saved": src.save}[state](ref)
    moved = src.migrate(ref, grid.node_url(1))
    assert moved.state == state
    grid.vmm(grid_pki.alice, 1).destroy(moved.ref)


def test_another_user_cannot_migrate_your_instance(grid, grid_pki):
    ref = deploy(grid, grid_pki.alice, "not-bobs")
    with pytest.raises(AccessDenied):
        grid.vmm(grid_pki.bob, 0).migrate(ref, grid.node_url(1))
    assert grid.vmm(grid_pki.alice, 0).status(ref).state == "Running"
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_a_limited_proxy_cannot_migrate(grid, grid_pki):
    ref = deploy(grid, grid_pki.alice, "limited")
    limited = VMManagerClient(GridServiceClient(grid.node_url(0), make_proxy(grid_pki.alice.credential, limited=True,
                                                                             hours=1), grid_pki.trust()))
    with pytest.raises(AccessDenied):
        limited.migrate(ref, grid.node_url(1))
    assert grid.vmm(grid_pki.alice, 0).status(ref).state == "Running"
    assert ref.key not in holdings(grid, 1)["live"]
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_the_host_credential_alone_cannot_place_a_vm_in_a_users_name(grid, grid_pki):
    """A node (its host certificate) offering an instance of alice's to the target is refused there."""
    from services.vmmanager import migration_wire
    from services.vmmanager.values import MigrationFile, MigrationOffer
    from services.descriptor import Descriptor
    from lxml import etree
    ref = deploy(grid, grid_pki.alice, "hosted")
    inst = grid.node(0).store.get(ref.key)
    host = GridServiceClient(grid.node_url(1), grid.node(0).core.credential, grid_pki.trust())
    offer = MigrationOffer(key="inst-" + "0" * 32, identifier="forged", owner=grid_pki.alice.dn,
                           descriptor=Descriptor(etree.fromstring(inst.descriptor)), descriptor_xml=inst.descriptor,
                           termination=inst.termination, max_lifetime=None, state="Running",
                           source=grid.node_url(0), files_url="gsiftp://localhost:1",
                           files=(MigrationFile("root.qcow2", 1, "0" * 64), MigrationFile("state.save", 1, "0" * 64)))
    with pytest.raises(AccessDenied):
        host.call("AcceptMigration", **migration_wire.accept_request(offer, host.to_zeep))
    # nor is a migration a way around vm.deploy: bob (VO hep) offering himself an instance of a bio image, even
    # with the source node's countersignature
    from services.vmmanager.migration import sign_offer
    bob = GridServiceClient(grid.node_url(1), grid_pki.bob.proxy, grid_pki.trust())
    with pytest.raises(AccessDenied) as exc:
        bob.call("AcceptMigration", **migration_wire.accept_request(
            sign_offer(dataclasses.replace(offer, owner=grid_pki.bob.dn), grid.node(0).core.credential,
                       grid.node_url(1)), bob.to_zeep))
    assert exc.value.action == "vm.deploy"
    assert grid.node(1).store.get("inst-" + "0" * 32) is None
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_bad_targets_are_refused_before_anything_moves(grid, grid_pki):
    src = grid.vmm(grid_pki.alice, 0)
    ref = deploy(grid, grid_pki.alice, "stays")
    for target in ("ftp://x/y", grid.node_url(0), "https://localhost:1/nothing"):
        with pytest.raises(InvalidArgument):
            src.migrate(ref, target)
    with pytest.raises(InvalidArgument):
        src.migrate(ref, grid.node_url(1), mode="Live")
    assert src.status(ref).state == "Running"
    src.destroy(ref)


def test_a_target_named_another_way_that_reaches_it_takes_the_migration(grid, grid_pki):
    """The target's URL spelt with another name its host certificate gives it and that reaches it
    (https://127.0.0.1:PORT for the node that knows itself as https://localhost:PORT): the source countersigns its
    offer for the URL it was given, and the target takes that as its own. It was refused ("the sourceProof ... does
    not match this offer to https://localhost:PORT"). The source's own URL so spelt is still this node, refused
    before anything moves; a proof for a name that is not the target's is still refused
    (test_a_user_offering_an_instance_herself_is_refused_naming_why_and_nothing_is_held)."""
    ref = deploy(grid, grid_pki.alice, "respelt")
    spelt = grid.node_url(1).replace("//localhost:", "//127.0.0.1:")
    with pytest.raises(InvalidArgument) as exc:
        grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(0).replace("//localhost:", "//127.0.0.1:"))
    assert "the target is this node" in str(exc.value)
    moved = grid.vmm(grid_pki.alice, 0).migrate(ref, spelt)
    assert (moved.ref.address, moved.state) == (grid.node_url(1), "Running")
    assert grid.vmm(grid_pki.alice, 1).status(moved.ref).state == "Running"
    assert ref.key not in holdings(grid, 0)["live"]
    grid.vmm(grid_pki.alice, 1).destroy(moved.ref)


def test_an_unreachable_target_rolls_back_in_prepare(grid, grid_pki):
    src = grid.vmm(grid_pki.alice, 0)
    ref = deploy(grid, grid_pki.alice, "unreachable")
    with pytest.raises(MigrationFault) as exc:
        src.migrate(ref, "https://localhost:1/wsrf/services/VMManagerService")
    assert exc.value.phase == "prepare"
    status = src.status(ref)
    assert status.state == "Running"
    assert ref.key in holdings(grid, 0)["domains"]
    src.destroy(ref)


def assert_rolled_back(grid, grid_pki, ref, state: str = "Running") -> None:
    """The instance is on the source as before; the target holds nothing of it, not even a record."""
    assert grid.vmm(grid_pki.alice, 0).status(ref).state == state
    held = holdings(grid, 0)
    assert all(ref.key in held[k] for k in ("live", "leases", "dirs", "domains"))
    assert grid.node(0).vmm.state(ref.key).value == state.lower()
    target = holdings(grid, 1)
    assert all(ref.key not in target[k] for k in target)
    assert grid.node(1).store.get(ref.key) is None
    assert len(slots_of(grid, ref.key)) == 1


def test_no_capacity_at_the_target_rolls_back_in_prepare(grid, grid_pki):
    from services.vmmanager.store import LeaseRange
    target = grid.node(1)
    full, target.pool = target.pool, LeaseRange.parse("10.99.0.150-10.99.0.150", "10.99.0.0/24", "10.99.0.1")
    blocker = deploy(grid, grid_pki.alice, "blocker", n=1)
    ref = deploy(grid, grid_pki.alice, "no-room")
    try:
        with pytest.raises(MigrationFault) as exc:
            grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
        assert (exc.value.phase, exc.value.cause) == ("prepare", "NoCapacityFault")
        assert_rolled_back(grid, grid_pki, ref)
    finally:
        target.pool = full
        grid.vmm(grid_pki.alice, 1).destroy(blocker)
        grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_a_target_takes_in_no_migration_from_a_host_it_does_not_list(grid, grid_pki):
    """The target restores the memory state the source sends: only from the hosts in migration_sources."""
    target = grid.node(1)
    listed, target.core.config.migration_sources = target.core.config.migration_sources, ["node9.example.org"]
    ref = deploy(grid, grid_pki.alice, "unlisted-source")
    try:
        with pytest.raises(MigrationFault) as exc:
            grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
        assert (exc.value.phase, exc.value.cause) == ("prepare", "AccessDeniedFault")
        assert "migration_sources" in str(exc.value)
        assert_rolled_back(grid, grid_pki, ref)
    finally:
        target.core.config.migration_sources = listed
        grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_a_target_of_another_kind_of_vmm_refuses_in_prepare_before_the_freeze(grid, grid_pki, monkeypatch):
    """A saved memory state restores only on the kind of VMM that saved it: a qemu node's instance offered to a
    test-driver node (here: the target told it runs qemu) is refused in prepare, naming both, and rolled back;
    before, the target took it and failed only at the restore ("mismatched header magic")."""
    monkeypatch.setattr(grid.node(1).core.config, "vmm", "qemu")
    ref = deploy(grid, grid_pki.alice, "other-vmm")
    try:
        with pytest.raises(MigrationFault) as exc:
            grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
        assert (exc.value.phase, exc.value.cause) == ("prepare", "InvalidArgumentFault")
        assert "runs the VMM 'qemu' and the instance was saved by 'test'" in str(exc.value)
        assert_rolled_back(grid, grid_pki, ref)
        assert "freeze" not in dict(grid.vmm(grid_pki.alice, 0).status(ref).phases or ())
    finally:
        grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_a_checksum_mismatch_rolls_back_in_transfer(grid, grid_pki, monkeypatch):
    """The source announces a wrong digest for the files (injected at the source only: both nodes run in this
    process); the files the target followed differ from it, and so does its verified GridFTP pull: refused."""
    from services.vmmanager import migration
    from services.vmmanager.values import MigrationFile
    monkeypatch.setattr(migration, "_file_list", lambda home, names: tuple(
        MigrationFile(n, (home / n).stat().st_size, blake3="0" * 64) for n in names))
    ref = deploy(grid, grid_pki.alice, "bad-sum")
    src = grid.vmm(grid_pki.alice, 0)
    src.pause(ref)
    with pytest.raises(MigrationFault) as exc:
        src.migrate(ref, grid.node_url(1))
    assert (exc.value.phase, exc.value.cause) == ("transfer", "ChecksumMismatchFault")
    assert_rolled_back(grid, grid_pki, ref, "Paused")
    src.destroy(ref)


def test_an_offer_of_files_larger_than_the_instance_can_hold_is_refused_before_anything_is_pulled(grid, grid_pki,
                                                                                                   monkeypatch):
    """A source is untrusted: one announcing a saved state larger than the guest's memory allows (or files larger
    in all than its disks and memory) is refused in transfer before the target reserves or pulls a byte; one
    announcing a size other than what its GridFTP server then sends is refused by the pull (the follow is
    bounded too, and its file is dropped). Each time rolled back."""
    from gridftp import transfer
    from services.vmmanager import migration
    from services.vmmanager.values import MigrationFile
    real = migration._file_list
    grow = {"by": 0}

    def files(home, names):
        return tuple(MigrationFile(f.name, f.size + grow["by"] * (f.name == migration.STATE_FILE), blake3=f.blake3)
                     for f in real(home, names))
    pulled = []
    real_download = transfer.download
    monkeypatch.setattr(migration, "_file_list", files)
    monkeypatch.setattr(migration.gridftp, "download", lambda *a, **k: pulled.append(a[0]) or real_download(*a, **k))

    def from_source() -> list[str]:
        """What was pulled from the source node (the base image's staging, from the repository, is not)."""
        return [url for url in pulled if "/images/" not in url]
    ref = deploy(grid, grid_pki.alice, "too-big")
    src = grid.vmm(grid_pki.alice, 0)
    src.pause(ref)
    grow["by"] = 1 << 40
    with pytest.raises(MigrationFault) as exc:
        src.migrate(ref, grid.node_url(1))
    assert (exc.value.phase, exc.value.cause) == ("transfer", "InvalidArgumentFault")
    assert "larger" in str(exc.value) and not from_source()
    assert_rolled_back(grid, grid_pki, ref, "Paused")
    grow["by"] = 1
    with pytest.raises(MigrationFault) as exc:
        src.migrate(ref, grid.node_url(1))
    assert (exc.value.phase, exc.value.cause) == ("transfer", "TransferFault")
    assert "announces" in str(exc.value) and any(u.endswith("/state.save") for u in from_source())
    assert_rolled_back(grid, grid_pki, ref, "Paused")
    src.destroy(ref)


def test_a_source_without_blake3_is_verified_by_sha256_and_a_file_without_a_digest_is_refused(grid, grid_pki,
                                                                                             monkeypatch):
    """vmgrid sources announce BLAKE3 digests; a source that announces only sha256 (the element other peers send) is
    verified by sha256 (a wrong one rolls back in transfer, the right one moves the instance), and an offer whose
    files carry no digest at all is refused (in transfer: the files come with AcceptMigration's transfer step)."""
    from gridftp.checksum import hash_file
    from services.vmmanager import migration
    from services.vmmanager.values import MigrationFile
    digest = {"sha256": lambda path: hash_file(path)}

    def files(home, names):
        return tuple(MigrationFile(n, (home / n).stat().st_size, sha256=digest["sha256"](home / n)) for n in names)
    monkeypatch.setattr(migration, "_file_list", files)
    ref = deploy(grid, grid_pki.alice, "sha-only")
    src = grid.vmm(grid_pki.alice, 0)
    src.pause(ref)
    for wrong, (phase, cause) in (("0" * 64, ("transfer", "ChecksumMismatchFault")),
                                  ("", ("transfer", "InvalidArgumentFault"))):
        digest["sha256"] = lambda path, wrong=wrong: wrong
        with pytest.raises(MigrationFault) as exc:
            src.migrate(ref, grid.node_url(1))
        assert (exc.value.phase, exc.value.cause) == (phase, cause)
        assert_rolled_back(grid, grid_pki, ref, "Paused")
    digest["sha256"] = lambda path: hash_file(path)
    moved = src.migrate(ref, grid.node_url(1))
    assert grid.vmm(grid_pki.alice, 1).status(moved.ref).state == "Paused"
    grid.vmm(grid_pki.alice, 1).destroy(moved.ref)


def test_the_files_are_exported_only_to_the_target_of_that_migration(grid, grid_pki, monkeypatch):
    """Cut the transfer: the source exports nothing (injected), so its GridFTP face refuses the target; rolled
    back. Afterwards not even the source node's own host certificate may read the instance's files."""
    exports = grid.node(0).core.exports
    real_open = exports.open
    monkeypatch.setattr(exports, "open", lambda key, names, target: real_open(key, [], target))
    ref = deploy(grid, grid_pki.alice, "cut")
    with pytest.raises(MigrationFault) as exc:
        grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    assert (exc.value.phase, exc.value.cause) == ("transfer", "TransferFault")
    assert_rolled_back(grid, grid_pki, ref)
    assert not exports.authorize(grid.node(0).core.credential.subject, "read", f"/{ref.key}/state.save")
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def assert_a_vmm_failure_rolls_back(grid, grid_pki, monkeypatch, *, node: int, verb: str, name: str,
                                    phase: str) -> None:
    """Node ``node``'s VMM refuses ``verb`` (injected: the test driver does whatever it is asked) during a migration
    from node 0 to node 1: the fault names ``phase`` and a VMM cause, and everything is as before the migration."""
    from services.vmmanager.vmm import VMMError

    def refuse(*args, **kwargs):
        raise VMMError(f"injected: the hypervisor refused the {verb}")
    monkeypatch.setattr(grid.node(node).vmm, verb, refuse)
    ref = deploy(grid, grid_pki.alice, name)
    with pytest.raises(MigrationFault) as exc:
        grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    assert (exc.value.phase, exc.value.cause) == (phase, "VMMFault")
    assert_rolled_back(grid, grid_pki, ref)
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_a_failed_restore_at_the_target_rolls_back(grid, grid_pki, monkeypatch):
    """The target's VMM refuses the restore (injected: the test driver restores whatever it is given)."""
    assert_a_vmm_failure_rolls_back(grid, grid_pki, monkeypatch, node=1, verb="restore", name="no-restore",
                                    phase="restore")


def test_the_target_prepares_while_the_guest_still_runs_and_only_a_yes_freezes_it(grid, grid_pki, monkeypatch):
    """The target authorizes, registers, leases and stages before the source saves the guest: when the save
    begins, the target already holds the instance Incoming with a lease, and follows the state file (there, empty:
    nothing of it before the save), and the guest still runs at the source. The prepare's time is not in the
    downtime (freeze .. resume)."""
    source_vmm, target = grid.node(0).vmm, grid.node(1)
    seen, real_save = {}, source_vmm.save

    def save(key, path, *args, **kwargs):
        inst = target.store.get(key)
        seen.update(target=inst.state if inst else None, lease=key in target.store.leases(),
                    role=target.core.migrations.get(key).role, files=sorted(
                        (p.name, p.stat().st_size) for p in target.core.parts.home(key).glob("*.save")),
                    source=source_vmm.state(key).value)
        return real_save(key, path, *args, **kwargs)
    monkeypatch.setattr(source_vmm, "save", save)
    ref = deploy(grid, grid_pki.alice, "prepared-first")
    moved = grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    assert seen == {"target": "Incoming", "lease": True, "role": "prepared", "files": [("state.save", 0)],
                    "source": "running"}
    names = [p for p, _ in moved.phases]
    assert names.index("prepare") < names.index("freeze") < names.index("transfer")
    grid.vmm(grid_pki.alice, 1).destroy(moved.ref)


def test_a_freeze_that_fails_after_the_target_prepared_rolls_back_both_nodes(grid, grid_pki, monkeypatch):
    """The target said yes (registered, leased, staged), then the source's save fails (injected): the target drops
    everything it prepared, the guest runs on at the source; the fault names the freeze."""
    assert_a_vmm_failure_rolls_back(grid, grid_pki, monkeypatch, node=0, verb="save", name="no-freeze",
                                    phase="freeze")


def prepare_offer(grid, ref, **changes):
    """The prepare step the source sends for instance ``ref`` of node 0 (called on the target's core directly)."""
    from services.vmmanager import migration, phases
    from services.vmmanager.values import MigrationOffer
    inst = grid.node(0).store.get(ref.key)
    offer = MigrationOffer(key=inst.key, identifier=inst.identifier, owner=inst.owner,
                           descriptor=phases.descriptor_of(inst), descriptor_xml=inst.descriptor,
                           termination=inst.termination, max_lifetime=inst.max_lifetime, state="Running",
                           source=grid.node_url(0), files_url="gsiftp://localhost:1", files=(),
                           phases=(("authorize", 0.01),), step="prepare")
    return migration.sign_offer(dataclasses.replace(offer, **changes), grid.node(0).core.credential,
                                grid.node_url(1)), migration


def test_a_prepared_instance_whose_files_never_come_is_dropped_and_cannot_be_committed(grid, grid_pki, monkeypatch):
    """A source that prepared and then died (or never froze): the target's prepared record cannot be committed, a
    transfer step from another source is refused and leaves it alone, and the sweep drops it after
    migration_prepare_timeout, leaving nothing (record, lease, directory, image hold)."""
    from services.authz.pep import Subject
    from services.faults import IllegalTransition
    from services.vmmanager.values import MigrationFile
    ref = deploy(grid, grid_pki.alice, "never-frozen")
    target, alice = grid.node(1).core, Subject(grid_pki.alice.dn)
    offer, migration = prepare_offer(grid, ref)
    with pytest.raises(InvalidArgument):       # a prepare step carries no files
        target.accept_migration(alice, dataclasses.replace(offer, files=(MigrationFile("root.qcow2", 1, "0" * 64),)))
    assert target.store.get(ref.key) is None
    target.accept_migration(alice, offer)
    assert target.store.get(ref.key).state == "Incoming"
    assert ref.key in target.store.leases()
    with pytest.raises(IllegalTransition):
        target.complete_migration(alice, ref.key, True)
    elsewhere = dataclasses.replace(offer, step="transfer", source="https://elsewhere:1/wsrf/services/VMManagerService")
    with pytest.raises(InvalidArgument):
        target.accept_migration(alice, elsewhere)
    assert target.store.get(ref.key).state == "Incoming"
    # a transfer step the source did not sign (the user's own) is refused and leaves the prepared one alone too
    with pytest.raises(AccessDenied) as exc:
        target.accept_migration(alice, dataclasses.replace(offer, step="transfer", files=(
            MigrationFile("root.qcow2", 1, blake3="0" * 64), MigrationFile("state.save", 1, blake3="0" * 64))))
    assert exc.value.rule == "migration-source-proof"
    assert target.store.get(ref.key).state == "Incoming"
    migration.sweep(target)                        # within the timeout: kept
    assert target.store.get(ref.key).state == "Incoming"
    monkeypatch.setattr(target.config, "migration_prepare_timeout", 0.0)
    migration.sweep(target)
    assert target.store.get(ref.key) is None and target.migrations.get(ref.key) is None
    held = holdings(grid, 1)
    assert all(ref.key not in held[k] for k in held)
    assert grid.vmm(grid_pki.alice, 0).status(ref).state == "Running"     # the source never froze it
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def left_of(grid, key: str) -> dict:
    """What node 1 (the target) still holds of ``key``'s incoming migration: its instance record, migration record,
    lease, directory, and what the migration held in memory (the pinned source, the files' followers)."""
    core = grid.node(1).core
    inst = core.store.get(key)
    return {"instance": inst.state if inst else None, "record": core.migrations.get(key),
            "lease": key in core.store.leases(), "dir": (core.instances_dir / key).exists(),
            "pinned": core.migrations.held(key)}


NOTHING = {"instance": None, "record": None, "lease": False, "dir": False, "pinned": False}


def test_a_prepare_that_fails_after_its_source_was_pinned_leaves_nothing_behind(grid, grid_pki, monkeypatch):
    """The last step of a prepare pins the source's checked address and starts following the files; when that fails
    (injected: the followers cannot be started) the prepare fails naming its phase and the target holds nothing of
    it, the pinned source included. Before: the failure escaped the prepare's rollback: the instance stayed
    Incoming with its lease and the source stayed pinned in a module-wide table keyed by the node object's id."""
    from services.authz.pep import Subject
    from services.vmmanager import migration

    def cannot_follow(*args, **kwargs):
        raise OSError("injected: no follower can be started")
    ref = deploy(grid, grid_pki.alice, "follow-fails")
    offer, _ = prepare_offer(grid, ref)
    monkeypatch.setattr(migration, "Following", cannot_follow)
    with pytest.raises(MigrationFault) as exc:
        grid.node(1).core.accept_migration(Subject(grid_pki.alice.dn), offer)
    assert exc.value.phase == "prepare" and "injected" in exc.value.description
    assert left_of(grid, ref.key) == NOTHING
    assert grid.vmm(grid_pki.alice, 0).status(ref).state == "Running"
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_a_prepared_instance_whose_lifetime_ends_leaves_no_record_and_no_pinned_source(grid, grid_pki):
    """A prepared instance's termination time passes before its files come: the node's sweep destroys it, and the
    next sweep drops its migration record and with it the pinned source and the followers. Before: the record stayed
    `prepared` until the node restarted (the sweep looked only at Incoming instances) and the pinned source until the
    node's process ended."""
    import time

    from services.authz.pep import Subject
    ref = deploy(grid, grid_pki.alice, "outlived")
    offer, _ = prepare_offer(grid, ref)
    target = grid.node(1).core
    target.accept_migration(Subject(grid_pki.alice.dn), offer)
    assert left_of(grid, ref.key)["pinned"] and target.migrations.get(ref.key).role == "prepared"
    target.store.update(ref.key, termination=time.time() - 1)
    target.sweep()
    assert target.store.get(ref.key).state == "Destroyed"
    target.sweep()
    assert {**left_of(grid, ref.key), "instance": None} == NOTHING
    assert grid.vmm(grid_pki.alice, 0).status(ref).state == "Running"
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_vmgrid_vm_migrate_from_the_command_line(grid, grid_pki):
    """`vmgrid vm migrate NAME --to NODE_URL` as the README shows it: the phase table, then the old node says where."""
    import os
    import subprocess
    import sys
    key = deploy(grid, grid_pki.alice, "cli-mover").key
    env = {**os.environ, **grid_pki.alice.env(grid_pki.cert_dir), "VMGRID_NODE": grid.node_url(0)}

    def vmgrid(*args):
        return subprocess.run([sys.executable, "-m", "client.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120)
    r = vmgrid("vm", "migrate", "cli-mover", "--to", grid.node_url(1))
    assert r.returncode == 0, r.stderr
    assert "migrated to node2" in r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == [*MIGRATION_PHASES, "total"]
    again = vmgrid("vm", "migrate", "cli-mover", "--to", grid.node_url(1))
    assert again.returncode != 0 and again.stderr.startswith("vmgrid: ") and "no live instance" in again.stderr
    assert again.stderr.rstrip().endswith(f"the last one so named is Migrated ({key}); it lives on at "
                                          f"{grid.node_url(1)}: name that node (--url for vm commands, --node for "
                                          f"job commands, or VMGRID_NODE)"), again.stderr     # where, not a 2nd step
    r = vmgrid("vm", "status", "cli-mover", "--url", grid.node_url(1))
    assert r.returncode == 0 and "Running" in r.stdout
    assert "destroyed" in vmgrid("vm", "destroy", "cli-mover", "--url", grid.node_url(1)).stdout
    # trial16 T5: destroyed at the target, the source no longer says it lives on there: it asks that node
    gone = vmgrid("vm", "destroy", "cli-mover")
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1, gone.stderr
    assert gone.stderr.rstrip().endswith(f"the last one so named is Migrated ({key}); it went to {grid.node_url(1)}, "
                                         f"where it is Destroyed now (`vmgrid vm list --all --url "
                                         f"{grid.node_url(1)}` lists it)"), gone.stderr


def test_the_report_keeps_a_deployment_and_each_migration_of_an_instance_that_came_back(grid, grid_pki, tmp_path):
    """trial16 T3: an instance deployed on node1, migrated to node2, back to node1 and to node2 again. Coming back to
    a node replaced its Migrated record there, and with it that record's phases: `vmgrid report` showed 2 migrations
    and no deployment of it. Now each node keeps the earlier operations' phases (EarlierPhaseTimings): the report has
    its deployment once and each of its 3 migrations once."""
    import os
    import subprocess
    import sys

    from services.vmmanager.states import MIGRATION_PHASES
    from services.vmmanager.vmm import LibvirtTestDriver
    ref = deploy(grid, grid_pki.alice, "roundtrip")
    deployed = grid.vmm(grid_pki.alice, 0).status(ref).phases
    for to in (1, 0, 1):
        ref = grid.vmm(grid_pki.alice, 1 - to).migrate(ref, grid.node_url(to)).ref
    try:
        back = grid.vmm(grid_pki.alice, 0).list(True)
        gone = next(i for i in back if i.ref.key == ref.key)          # on node1: Migrated, after it came back once
        assert gone.state == "Migrated" and gone.earlier_phases == [deployed], gone
        env = {**os.environ, **grid_pki.alice.env(grid_pki.cert_dir)}
        r = subprocess.run([sys.executable, "-m", "client.cli", "report", "--json", "--nodes", grid.node_url(0),
                            grid.node_url(1)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        mine = [d for d in json.loads(r.stdout) if d["deployment"].startswith("roundtrip@")]
        deployments = [d for d in mine if "freeze" not in d["phases"]]
        migrations = [d for d in mine if "freeze" in d["phases"]]
        assert [d["deployment"] for d in deployments] == ["roundtrip@node1#1"], mine
        assert deployments[0]["phases"] == dict(deployed)
        assert len(migrations) == 3 and all(set(d["phases"]) <= set(MIGRATION_PHASES) for d in migrations), mine
        assert sorted(d["deployment"] for d in migrations) == ["roundtrip@node1#2", "roundtrip@node2#1",
                                                               "roundtrip@node2#2"], mine
        # a node that timed migrations only (a third one, where it arrives): the tables, and no figure, said so
        # (before: a traceback from matplotlib, "All wedge sizes are zero")
        grid.add_node("node3", "10.99.0.190-10.99.0.199", vmm=LibvirtTestDriver.private_node())
        ref = grid.vmm(grid_pki.alice, 1).migrate(ref, grid.node_url(2)).ref
        r = subprocess.run([sys.executable, "-m", "client.cli", "report", "--nodes", grid.node_url(2)], env=env,
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0 and "0 deployment(s)" in r.stdout and "1 migration(s)" in r.stdout, r.stderr
        assert r.stderr == "no figure written to phases.png: the nodes timed migrations only (the figure shows " \
                           "deployments)\n", r.stderr
        assert not (tmp_path / "phases.png").exists()
    finally:
        grid.vmm(grid_pki.alice, 2 if len(grid.nodes) > 2 else 1).destroy(ref)
        if len(grid.nodes) > 2:
            grid.stop_node(2)
            grid.nodes.pop()


def test_subscribers_hear_the_move_from_the_source_and_then_from_the_target(grid, grid_pki):
    from client.notifications import NotificationConsumer
    src = grid.vmm(grid_pki.alice, 0)
    ref = deploy(grid, grid_pki.alice, "watched")
    with NotificationConsumer(grid_pki.trust()) as consumer:
        consumer.subscribe(src, ref)
        moved = src.migrate(ref, grid.node_url(1))
        assert consumer.wait(lambda c: c.new == "Migrating").old == "Running"
        def port(url: str) -> int | None:
            return urlsplit(url).port
        events = [consumer.wait(lambda c: c.new in ("Migrated", "Running")) for _ in range(2)]
        by = {c.new: c for c in events}
        assert port(by["Migrated"].producer) == port(grid.node_url(0))        # the source: it left
        assert (by["Running"].old, port(by["Running"].producer)) == ("Incoming", port(grid.node_url(1)))
        assert by["Running"].key == ref.key
        grid.vmm(grid_pki.alice, 1).destroy(moved.ref)
        assert consumer.wait(lambda c: c.new == "Destroyed").old == "Running"


def test_vmgrid_vm_watch_follows_the_instance_to_its_new_node(grid, grid_pki):
    """`vmgrid vm watch` hears the move from the source, asks it where the instance went, and from then on takes the
    changes the new node signs: it ends on the Destroyed that node sends."""
    import os

    from tests.fixtures.watch import vm_watch
    ref = deploy(grid, grid_pki.alice, "cli-watched")
    env = {**os.environ, **grid_pki.alice.env(grid_pki.cert_dir), "VMGRID_NODE": grid.node_url(0)}
    with vm_watch("cli-watched", env) as watch:
        moved = grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
        grid.vmm(grid_pki.alice, 1).destroy(moved.ref)
        out, err = watch.finish()
    assert watch.returncode == 0, err
    assert "-> Migrating" in out and "-> Migrated" in out and f"now on {grid.node_url(1)}" in out, out
    assert out.rstrip().splitlines()[-1].split(": ", 1)[1].startswith("Running -> Destroyed"), out


def _until(condition, limit: float = 30.0) -> bool:
    """Whether ``condition()`` came true within ``limit`` seconds (bytes arriving at the other node, which no
    event announces); False, not a timing assertion: the test then fails on what did not happen."""
    import time
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_target_holds_part_of_the_saved_state_before_the_save_ends(grid, grid_pki, monkeypatch):
    """The target asks for the files right after the prepare and gets the saved state while the source still
    writes it. The test driver's save is a few KiB written at once, so the save here (injected) appends 2 MiB
    after it (the driver's restore reads its header and XML and ignores the rest) and returns only once the target
    holds more than the held-back head; the migration then verifies the whole file and completes."""
    import os

    from gridftp.growing import HEAD
    src_vmm = grid.node(0).vmm
    real_save, seen = src_vmm.save, {}

    def growing_save(key, path):
        real_save(key, path)
        with open(path, "ab") as f:
            f.write(os.urandom(2 << 20))
            f.flush()
            there = grid.node(1).instances_dir / key / "state.save"
            seen["early"] = _until(lambda: there.is_file() and there.stat().st_size > HEAD + (256 << 10))
    monkeypatch.setattr(src_vmm, "save", growing_save)
    ref = deploy(grid, grid_pki.alice, "followed")
    moved = grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    assert seen == {"early": True}
    assert grid.vmm(grid_pki.alice, 1).status(moved.ref).state == "Running"
    grid.vmm(grid_pki.alice, 1).destroy(moved.ref)


def test_a_save_that_fails_midway_leaves_nothing_at_the_target(grid, grid_pki, monkeypatch):
    """The source's save writes part of the state (which the target follows) and then fails (injected, as libvirt
    fails: the file removed, the domain running on): the target drops what it followed, and the instance runs on
    at the source as before."""
    import os

    from services.vmmanager.vmm import VMMError

    def broken_save(key, path):
        with open(path, "wb") as f:
            f.write(b"LibvirtQemudPart" + os.urandom(1 << 20))
            f.flush()
            there = grid.node(1).instances_dir / key / "state.save"
            _until(lambda: there.is_file() and there.stat().st_size > 0, 10)
        os.unlink(path)          # as libvirt does when a save fails: the file goes, the domain runs on
        raise VMMError("injected: the save failed midway")
    monkeypatch.setattr(grid.node(0).vmm, "save", broken_save)
    ref = deploy(grid, grid_pki.alice, "half-saved")
    with pytest.raises(MigrationFault) as exc:
        grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    assert (exc.value.phase, exc.value.cause) == ("freeze", "VMMFault")
    monkeypatch.undo()
    assert_rolled_back(grid, grid_pki, ref)
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_the_slot_claim_at_the_commit_runs_beside_the_resume_and_a_refused_one_rolls_back(grid, grid_pki,
                                                                                         monkeypatch):
    """The target's slot claim (a round trip to the Authorization service) is answered while the guest already
    resumes there: off the downtime. A claim refused at that point pauses the guest again at the target and the
    migration rolls back: the instance runs at the source, its slot counted once, nothing left at the target."""
    import threading

    from services.faults import AccessDenied as Denied
    target = grid.node(1)
    resumed, seen = threading.Event(), {}
    real_resume, real_claim = target.vmm.resume, target.authz.claim

    def resume(key, *args, **kwargs):
        out = real_resume(key, *args, **kwargs)
        resumed.set()
        return out

    def claim(*args, **kwargs):
        inst = target.store.get(args[1])
        if inst is None or inst.state != "Incoming":   # the prepare's claim (not registered yet): not this one
            return real_claim(*args, **kwargs)
        seen["resumed first"] = resumed.wait(30)
        if seen.get("refuse"):
            raise Denied("injected: the claim is refused", subject="", action="vm.migrate", resource="", rule="test")
        return real_claim(*args, **kwargs)
    monkeypatch.setattr(target.vmm, "resume", resume)
    monkeypatch.setattr(target.authz, "claim", claim)
    ref = deploy(grid, grid_pki.alice, "claimed")
    moved = grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    assert seen == {"resumed first": True} and len(slots_of(grid, ref.key)) == 1
    back = grid.vmm(grid_pki.alice, 1).migrate(moved.ref, grid.node_url(0))
    resumed.clear()
    seen["refuse"] = True
    with pytest.raises(MigrationFault) as exc:
        grid.vmm(grid_pki.alice, 0).migrate(back.ref, grid.node_url(1))
    assert exc.value.phase == "resume" and seen["resumed first"]
    monkeypatch.undo()
    assert_rolled_back(grid, grid_pki, back.ref)
    grid.vmm(grid_pki.alice, 0).destroy(back.ref)


def test_a_resume_failing_at_the_target_after_its_slot_claim_gives_the_slot_back_to_the_source(grid, grid_pki,
                                                                                               monkeypatch):
    """The target's claim went through (it is the slot's claimant), then its resume failed: the migration rolls back
    and the source claims the slot back, so the target's reconciliation cannot free the slot of an instance that
    runs at the source."""
    from services.vmmanager.vmm import VMMError
    target = grid.node(1)
    claimed = []
    real_claim = target.authz.claim

    def claim(*args, **kwargs):
        out = real_claim(*args, **kwargs)
        claimed.append(slots_of(grid, args[1])[0].claimant)
        return out

    def resume(key, *args, **kwargs):
        raise VMMError("injected: the resume fails at the target")
    monkeypatch.setattr(target.authz, "claim", claim)
    monkeypatch.setattr(target.vmm, "resume", resume)
    ref = deploy(grid, grid_pki.alice, "resume-fails")
    with pytest.raises(MigrationFault) as exc:
        grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    monkeypatch.undo()
    assert exc.value.phase == "resume"
    assert claimed and claimed[0].endswith(f"#{target.node}"), claimed
    assert_rolled_back(grid, grid_pki, ref)
    assert slots_of(grid, ref.key)[0].claimant.endswith(f"#{grid.node(0).node}")
    grid.vmm(grid_pki.alice, 0).destroy(ref)


def test_an_abort_learnt_only_when_the_migration_is_settled_later_claims_the_slot_back_too(grid, grid_pki,
                                                                                          monkeypatch):
    """As above, the target claimed the slot and then its resume failed, but the source could not ask the target
    how the commit ended (unreachable then, or the source restarted before it asked): the instance stays Migrating
    until the sweep (or the restart) settles it. The settle learns the abort, rolls back, and claims the slot back
    for the source as the migration does when it learns the abort at once."""
    from services.vmmanager import migration
    from services.vmmanager.vmm import VMMError
    source, target = grid.node(0), grid.node(1)

    def resume(key, *args, **kwargs):
        raise VMMError("injected: the resume fails at the target")

    def unreachable(*args, **kwargs):
        raise migration.Unsettled("injected: the target cannot be asked now")
    monkeypatch.setattr(target.vmm, "resume", resume)
    monkeypatch.setattr(migration, "_settle_with", unreachable)
    ref = deploy(grid, grid_pki.alice, "settled-later")
    with pytest.raises(MigrationFault) as exc:
        grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    assert exc.value.phase == "resume"
    assert source.store.get(ref.key).state == "Migrating"
    assert slots_of(grid, ref.key)[0].claimant.endswith(f"#{target.node}")
    monkeypatch.undo()
    assert migration.settle(source.core, ref.key) == "rolled-back"
    assert_rolled_back(grid, grid_pki, ref)
    assert slots_of(grid, ref.key)[0].claimant.endswith(f"#{source.node}")
    grid.vmm(grid_pki.alice, 0).destroy(ref)


@pytest.fixture
def files_served_as(grid, grid_pki, monkeypatch):
    """files_served_as(credential, name) -> the MigrationFault: an instance ``name`` deployed on node 0 migrates to
    node 1 (which takes migrations from any host) while node 0's GridFTP face serves its files with ``credential``:
    the migration fails in transfer (TransferFault) and is rolled back; then, served with the node's own
    credential again, it moves (and is destroyed there)."""
    from gridftp.tls import TLSConfig

    def migrate(credential, name: str) -> MigrationFault:
        exports = grid.node(0).core.exports
        real_open = exports.open

        def open_as(*args, **kwargs):
            url = real_open(*args, **kwargs)
            monkeypatch.setattr(exports.face.server, "tls", TLSConfig(credential, grid_pki.trust()))
            return url
        monkeypatch.setattr(exports, "open", open_as)
        monkeypatch.setattr(grid.node(1).core.config, "migration_sources", ["*"])
        ref = deploy(grid, grid_pki.alice, name)
        with pytest.raises(MigrationFault) as exc:
            grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
        assert (exc.value.phase, exc.value.cause) == ("transfer", "TransferFault")
        assert_rolled_back(grid, grid_pki, ref)
        monkeypatch.undo()
        moved = grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))     # the node's own certificate: taken
        grid.vmm(grid_pki.alice, 1).destroy(moved.ref)
        return exc.value
    return migrate


def test_no_migration_is_taken_in_from_a_source_presenting_a_guest_certificate(grid, grid_pki, files_served_as):
    """A node issues each guest's grid container a host DN (/O=Grid/OU=vmgrid-guests/CN=host/<address>) whose key
    the VM's owner holds as root: with migration_sources = ["*"] a guest could pose as a source node and have the
    target restore a memory state of its making. Here the source's GridFTP face presents such a certificate (the
    node's own issue(), naming this host): the target refuses it whatever migration_sources says, rolled back.
    Fails without the guest check: the instance moved."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from security.pki import Credential, new_key
    from services.vmmanager.guestcred import issue
    from services.vmmanager.service import VMManagerConfig

    key = new_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    pem, record = issue(VMManagerConfig(node="node1", guest_ca=str(grid_pki.ca.directory)),
                        {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "port": 8443},
                        "localhost", "guest-source")
    # a guest whose address this host name is (a guest's certificate names its address only, never its identifier)
    assert record["dn"] == "/O=Grid/OU=vmgrid-guests/CN=host/localhost"
    guest = Credential(x509.load_pem_x509_certificate(pem.encode()), key, ())
    refused = files_served_as(guest, "guest-source")
    assert "vmgrid-guests" in str(refused) and "refused" in str(refused)


# -- the target knows the source node took part (attack11 F2, F11) -------------------------------------------------
def rogue_offer(grid, grid_pki, ws, **changes):
    """An offer alice makes herself (attack11_rogue_migration.py): a fresh key, node 0 named as the source."""
    import time
    import uuid

    from lxml import etree

    from services.descriptor import Descriptor
    from services.vmmanager.values import MigrationOffer
    key = "inst-" + uuid.uuid4().hex
    offer = MigrationOffer(key=key, identifier=f"rogue-{key[-8:]}", owner=grid_pki.alice.dn,
                           descriptor=Descriptor(ws), descriptor_xml=etree.tostring(ws),
                           termination=time.time() + 3600, max_lifetime=None, state="Running",
                           source=grid.node_url(0), files_url="gsiftp://localhost:1", files=(), step="prepare",
                           vmm="test")
    return dataclasses.replace(offer, **changes)


def test_a_user_offering_an_instance_herself_is_refused_naming_why_and_nothing_is_held(grid, grid_pki):
    """attack11 F2: AcceptMigration is signed by the user, and the user can send it herself, naming a listed source
    and serving files of her making. The target now takes in an instance only when the source node countersigned
    the offer with its host certificate, for this target, these files: alice's own offer (no proof, a proof of her
    proxy naming the host as the attack's spoof did, the source's proof of another offer or for another target)
    is refused with an AccessDenied saying why, before any slot, lease or record. Fails without the check: the
    offer is taken in (Incoming, a lease)."""
    import datetime as dt
    import time

    from lxml import etree

    from security.pki import Credential, new_key, proxy_certificate
    from services.vmmanager import migration, migration_wire
    from services.vmmanager.values import MigrationFile
    template = deploy(grid, grid_pki.alice, "template")
    ws = etree.fromstring(grid.node(0).store.get(template.key).descriptor)
    alice = GridServiceClient(grid.node_url(1), grid_pki.alice.proxy, grid_pki.trust())
    host0 = grid.node(0).core.credential
    key = new_key()
    spoof = Credential(proxy_certificate(grid_pki.alice.credential, key.public_key(),
                                         lifetime=dt.timedelta(hours=1), cn="localhost"), key,
                       grid_pki.alice.credential.certificates)
    files = (MigrationFile("root.qcow2", 1 << 20, blake3="a" * 64), MigrationFile("state.save", 1 << 20, blake3="b" * 64))
    offer = rogue_offer(grid, grid_pki, ws)
    before = {k: v for k, v in holdings(grid, 1).items()}
    cases = [
        (offer, "carries no sourceProof"),
        (migration.sign_offer(offer, spoof, grid.node_url(1)), "not by a host certificate"),
        (migration.sign_offer(offer, host0, grid.node_url(0)), "does not match this offer"),        # another target
        (migration.sign_offer(offer, host0, grid.node_url(1).replace("//localhost:", "//127.0.0.2:")),
         "does not match this offer"),              # a name the target's certificate does not give it (nor reaches it)
        (dataclasses.replace(migration.sign_offer(offer, host0, grid.node_url(1)), key="inst-" + "1" * 32),
         "does not match this offer"),                                                             # another instance
        (dataclasses.replace(migration.sign_offer(offer, host0, grid.node_url(1)), step=""),
         "does not match this offer"),                     # the prepare's proof, the files then sent in one step
        (migration.sign_offer(offer, host0, grid.node_url(1), now=time.time() - 3600),
         "not within the last"),
    ]
    for bad, why in cases:
        if bad.step == "":
            bad = dataclasses.replace(bad, files=files)
        with pytest.raises(AccessDenied) as exc:
            alice.call("AcceptMigration", **migration_wire.accept_request(bad, alice.to_zeep))
        assert exc.value.rule == "migration-source-proof" and why in exc.value.description, (why, exc.value)
        assert grid.node(1).store.get(bad.key) is None and not slots_of(grid, bad.key)
    assert holdings(grid, 1) == before
    grid.vmm(grid_pki.alice, 0).destroy(template)


def test_an_offer_from_a_source_that_does_not_countersign_is_refused_with_a_clear_message(grid, grid_pki,
                                                                                         monkeypatch):
    """A source of an earlier version sends no sourceProof: the target refuses its prepare (AccessDenied naming the
    missing proof and what to do), the source rolls back, the instance runs on there, its slot counted once."""
    from services.vmmanager import migration
    monkeypatch.setattr(migration, "sign_offer", lambda offer, credential, target, now=None: offer)
    ref = deploy(grid, grid_pki.alice, "old-source")
    with pytest.raises(MigrationFault) as exc:
        grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    assert (exc.value.phase, exc.value.cause) == ("prepare", "AccessDeniedFault")
    assert "carries no sourceProof" in str(exc.value) and "earlier vmgrid version" in str(exc.value)
    assert_rolled_back(grid, grid_pki, ref)
    monkeypatch.undo()
    moved = grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
    grid.vmm(grid_pki.alice, 1).destroy(moved.ref)


def test_the_files_come_only_from_a_gridftp_server_with_the_sources_host_dn(grid, grid_pki, files_served_as):
    """The source countersigned the offer, but its files are served with another credential, a trusted host
    certificate naming the same host name (CN=host/localhost of another OU: not the DN that signed the offer): the
    target refuses that server whatever migration_sources says; rolled back. Fails without the check: that
    server's files are taken. (A user's proxy as the server, as in the attack, is refused too: over AUTH TLS by its
    purpose already, over GSI by this check.)"""
    refused = files_served_as(grid_pki.issue_host("localhost", ou="elsewhere"), "alices-files")
    assert "OU=elsewhere" in str(refused) and "refused" in str(refused)


def test_the_pinned_pull_takes_no_proxy_of_the_sources_own_host_credential(grid, grid_pki, files_served_as):
    """The target pulls from the address the source's name resolved to at the offer's check (a URL naming that
    address), and the server there is still checked for the name as a URL's host is: a host certificate naming it,
    never a proxy, though a proxy of the source node's own host credential carries the DN that signed the offer (a
    GSI transfer delegates such proxies to servers). Refused, rolled back. A pull pinned by the address and the DN
    alone (GridFTPClient's server_dn) took it."""
    from security.pki import make_proxy

    refused = files_served_as(make_proxy(grid.node(0).core.credential, hours=1), "proxied-source")
    assert "presented a proxy" in str(refused), str(refused)


def test_prepared_incoming_instances_are_bounded_per_user_and_give_their_slots_back(grid, grid_pki, monkeypatch):
    """attack11 F11 with a source's proof (a source node that offers instances it does not have): each prepare
    claims the instance's slot at the Authorization service, and one owner's Incoming instances on a node are
    bounded; an abort gives the slot back. Fails without the claim: no slot counted."""
    from services.faults import LimitExceeded
    from services.vmmanager import migration, migration_wire
    from lxml import etree
    monkeypatch.setattr(migration, "MAX_INCOMING_PER_USER", 2)
    template = deploy(grid, grid_pki.alice, "template")
    ws = etree.fromstring(grid.node(0).store.get(template.key).descriptor)
    alice = GridServiceClient(grid.node_url(1), grid_pki.alice.proxy, grid_pki.trust())
    keys = []
    for i in range(3):
        offer = migration.sign_offer(rogue_offer(grid, grid_pki, ws), grid.node(0).core.credential,
                                     grid.node_url(1))
        if i < 2:
            alice.call("AcceptMigration", **migration_wire.accept_request(offer, alice.to_zeep))
            keys.append(offer.key)
            assert [s.claimant.rpartition("#")[2] for s in slots_of(grid, offer.key)] == [grid.node(1).node]
        else:
            with pytest.raises(LimitExceeded) as exc:
                alice.call("AcceptMigration", **migration_wire.accept_request(offer, alice.to_zeep))
            assert exc.value.limit == "incoming_migrations_per_user"
            assert grid.node(1).store.get(offer.key) is None and not slots_of(grid, offer.key)
    from services.authz.pep import Subject
    for key in keys:
        assert grid.node(1).core.complete_migration(Subject(grid_pki.alice.dn), key, False)[0] == "aborted"
        assert not slots_of(grid, key) and grid.node(1).store.get(key) is None
    grid.vmm(grid_pki.alice, 0).destroy(template)


def test_a_prepare_flood_is_bounded_by_the_users_instance_limit(grid_pki, tmp_path):
    """attack11 F11: 240 prepares filled a node's lease pool past alice's instance limit. Now each prepare claims a
    slot as a deployment does: with max_instances_per_user = 3 and one instance running, two prepares are taken
    and the third is refused (LimitExceeded, max_instances_per_user) before any lease; the flood's other offers
    too. (Without a source's proof none is taken at all: the test above.)"""
    from lxml import etree

    from services.faults import LimitExceeded
    from tests.fixtures.grid import grid_policy
    from services.vmmanager import migration, migration_wire
    policy = grid_policy(grid_pki, limits={"max_lifetime": "2h", "max_memory": 4096, "max_vcpus": 4,
                                           "max_instances_per_user": 3, "max_instances_per_group": 50})
    g = start_grid(grid_pki, tmp_path / "g", policy=policy, nodes=2)
    try:
        g.image = g.register(name="flooded")
        running = deploy(g, grid_pki.alice, "running")
        ws = etree.fromstring(g.node(0).store.get(running.key).descriptor)
        alice = GridServiceClient(g.node_url(1), grid_pki.alice.proxy, grid_pki.trust())
        taken, refused = [], []
        for i in range(6):
            offer = migration.sign_offer(rogue_offer(g, grid_pki, ws), g.node(0).core.credential, g.node_url(1))
            try:
                alice.call("AcceptMigration", **migration_wire.accept_request(offer, alice.to_zeep))
                taken.append(offer.key)
            except LimitExceeded as exc:
                refused.append(exc.limit)
        assert len(taken) == 2 and refused == ["max_instances_per_user"] * 4
        assert sorted(g.node(1).store.leases()) == sorted(taken)
    finally:
        g.close()


def test_the_source_sends_its_proof_only_to_a_target_whose_contract_has_it(grid, grid_pki):
    """A target of an earlier version would refuse the unknown sourceProof element (a schema fault): the source
    reads the target's WSDL and leaves it out there; a target of this version gets it."""
    from services.vmmanager.migration_peer import SoapPeer
    peer = SoapPeer(grid.node_url(1), grid_pki.alice.proxy, grid_pki.trust(), 30)
    try:
        assert peer._takes_proof(peer._client())
    finally:
        peer.close()


def test_a_migration_uses_the_configured_migration_port_and_data_port_range(grid_pki, tmp_path, monkeypatch):
    """[vmmanager] migration_port: the source's migration GridFTP face listens on that port (the files URL the target
    pulls from names it), and the migration goes through with GLOBUS_TCP_PORT_RANGE set (the target's data listeners
    then take ports of that range: tests/unit/gridftp/test_gridftp_data_ports.py); the instance arrives. Before: the face listened on a random port, no key named it (a site firewall could not
    allow it)."""
    from client.localgrid import free_port
    from tests.unit.gridftp.test_gridftp_cli import _free_range

    port = free_port()
    low, high = _free_range()
    monkeypatch.setenv("GLOBUS_TCP_PORT_RANGE", f"{low},{high}")
    g = start_grid(grid_pki, tmp_path / "grid", nodes=2, migration_port=port)
    try:
        g.image = g.register(name="through-the-firewall")
        src = g.vmm(grid_pki.alice, 0)
        ref = deploy(g, grid_pki.alice, "firewalled")
        moved = src.migrate(ref, g.node_url(1))
        assert moved.state == "Running" and moved.ref.address == g.node_url(1)
        assert g.node(0).core.exports.face.server.port == port
        assert g.node(0).core.exports.face.base_url.endswith(f":{port}")
        g.vmm(grid_pki.alice, 1).destroy(moved.ref)
    finally:
        g.close()
