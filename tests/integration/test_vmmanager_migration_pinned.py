"""The target's GridFTP pull of a migration's files goes to the address the source's name resolved to when the offer
was checked, its certificate checked for the name: a name server that answers another address later (DNS rebinding)
is not followed. Two real nodes (libvirt's test driver) and the central services on loopback, real GridFTP over AUTH
TLS; only the resolver is a test's (tests/fixtures/resolver.py)."""
from __future__ import annotations

import socket
import threading

import pytest

from client.localgrid import free_port
from services.faults import MigrationFault
from tests.fixtures.grid import start_grid
from tests.fixtures.resolver import rebinding
from tests.integration.test_vmmanager_migration import deploy

pytestmark = pytest.mark.timeout(300)


class Stray:
    """A listener on ``host``:``port`` that greets as a GridFTP server would and records every connection."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_server((host, port))
        self.seen: list[tuple] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.seen.append(peer)
            with conn:
                try:
                    conn.sendall(b"421 not the source\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_the_pull_connects_to_the_address_the_sources_name_resolved_to_at_the_check(grid_pki, tmp_path,
                                                                                     monkeypatch):
    """The source's migration face listens on localhost (127.0.0.1) at [vmmanager] migration_port; the name
    `localhost` for that port answers 127.0.0.1 at its first lookup and 127.0.0.2 at every later one, where a stray
    listener waits on the same port. The migration goes through, the name is looked up once for the port, and the
    stray sees no connection. Before: every GridFTP session of the pull (a follower per file from the prepare on,
    then the pulls) looked the name up again, and all but the first went to 127.0.0.2."""
    port = free_port()
    g = start_grid(grid_pki, tmp_path / "grid", nodes=2, migration_port=port)
    stray = Stray("127.0.0.2", port)
    try:
        g.image = g.register(name="pinned-pull")
        src = g.vmm(grid_pki.alice, 0)
        ref = deploy(g, grid_pki.alice, "pinned")
        answers = rebinding(monkeypatch, "localhost", "127.0.0.1", "127.0.0.2", port=port)
        moved = src.migrate(ref, g.node_url(1))
        assert moved.state == "Running" and moved.ref.address == g.node_url(1)
        assert answers == ["127.0.0.1"]
        assert stray.seen == []
        g.vmm(grid_pki.alice, 1).destroy(moved.ref)
    finally:
        stray.close()
        g.close()


# -- the pinned source lives as long as the prepared migration's record ----------------------------------------------
@pytest.fixture(scope="module")
def grid(grid_pki, tmp_path_factory):
    g = start_grid(grid_pki, tmp_path_factory.mktemp("pinned") / "grid", nodes=2)
    g.image = g.register(name="pinned-record")
    try:
        yield g
    finally:
        g.close()


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
    from tests.integration.test_vmmanager_migration import prepare_offer

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
    from tests.integration.test_vmmanager_migration import prepare_offer
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
