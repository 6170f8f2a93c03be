"""The target's GridFTP pull of a migration's files goes to the address the source's name resolved to when the offer
was checked, its certificate checked for the name: a name server that answers another address later (DNS rebinding)
is not followed. Two real nodes (libvirt's test driver) and the central services on loopback, real GridFTP over AUTH
TLS; only the resolver is a test's (tests/fixtures/resolver.py)."""
from __future__ import annotations

import socket
import threading

import pytest

from client.localgrid import free_port
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
