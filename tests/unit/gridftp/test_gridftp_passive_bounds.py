"""Passive data ports against a narrow data port range (attack15 H4): one identity held every port of a job service
face's `[gridftp] data_ports` with unconnected PASV listeners across its sessions, and another user's upload failed
"425 ... no free data port". Real servers and vmgrid's own clients (AUTH TLS with the test grid's credentials), the
range set as a site sets it (GLOBUS_TCP_PORT_RANGE, which `[gridftp] data_ports` puts in the environment)."""
from __future__ import annotations

import socket

import pytest

from gridftp import upload
from gridftp.client import GridFTPClient

from tests.unit.gridftp.gridftp_helpers import wait_for
from tests.unit.gridftp.test_gridftp_cli import _free_range


@pytest.fixture
def narrow(start_server, grid_pki, monkeypatch):
    """start(**kwargs): a server over the test tree (uploads into /up) whose data port range is 4 ports."""
    low, high = _free_range(4)
    monkeypatch.setenv("GLOBUS_TCP_PORT_RANGE", f"{low},{high}")

    def start(**kwargs):
        return start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, anonymous=False, upload_area="/up",
                            **kwargs)
    return start


def session(server, credential, grid_pki) -> GridFTPClient:
    return GridFTPClient(f"gsiftp://localhost:{server.port}/", credential=credential, trust=grid_pki.cert_dir).connect()


def refused_connection(port: int) -> bool:
    """Whether nothing listens on ``port`` any more (a connection to it is refused)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except OSError:         # e.g. its backlog full of these probes: still listening
        pass
    return False


def test_one_identity_cannot_hold_a_narrow_range_with_unconnected_passive_ports(narrow, grid_pki, tree, tmp_path):
    """alice opens four sessions (within her bound of eight) and sends PASV on each: the first two get a port, the
    others a 425 naming the bound per identity; bob's upload meanwhile takes a port of the range and arrives, and a
    node (a host identity) is not held to the bound. A session of hers that ends gives its port back to her.
    Without the fix alice held all four ports and bob's upload failed "425 ... no free data port"."""
    server = narrow()
    alice = [session(server, grid_pki.alice.proxy, grid_pki) for _ in range(4)]
    held = []
    try:
        replies = [s.command("PASV") for s in alice]
        assert [r.code for r in replies] == [227, 227, 425, 425], replies
        assert replies[2].text == (f"Cannot open a passive data port: {grid_pki.alice.dn} holds 2 already that no data "
                                   f"connection has reached, at most 2 per identity across its sessions: use them "
                                   f"(send the data command) or end those sessions first.")
        (tmp_path / "w.txt").write_bytes(b"the admin's input\n" * 1000)
        upload(tmp_path / "w.txt", f"gsiftp://localhost:{server.port}/up/w.txt", 2, credential=grid_pki.bob.proxy,
               trust=grid_pki.cert_dir, retries=0)
        assert (tree / "up" / "w.txt").read_bytes() == (tmp_path / "w.txt").read_bytes()
        node = session(server, grid_pki.host, grid_pki)
        held.append(node)
        assert node.command("PASV").code == 227          # alice's two and the node's: three of the four
        alice.pop(0).close()
        first = alice[0].passive_addresses(replies[0])[0][1]
        wait_for(lambda: refused_connection(first), interval=0.2, what="the ended session's passive port closed")
        assert alice[1].command("PASV").code == 227
    finally:
        for s in alice + held:
            s.close()


def test_a_passive_port_no_data_command_takes_up_is_closed_and_the_next_one_says_so(narrow, grid_pki, tree):
    """A PASV no data command follows within passive_wait seconds: its port is closed (no connection is taken on it
    any more), it counts no more against the identity's bound, and the data command that comes late is told why in
    its 425. (Transfers sent at once, as every client sends them, are the other tests'.) Without the fix the port
    stayed open until the session's next PASV or its end (transfer_idle_timeout, 60 s, renewed by any transfer)."""
    server = narrow(passive_wait=0.5)
    alice, *others = [session(server, grid_pki.alice.proxy, grid_pki) for _ in range(3)]
    try:
        reply = alice.command("PASV")
        assert reply.code == 227
        port = alice.passive_addresses(reply)[0][1]
        wait_for(lambda: refused_connection(port), interval=0.2, what="the unused passive port closed")
        assert [s.command("PASV").code for s in others] == [227, 227]      # the closed one is not held against her
        late = alice.command("STOR /up/late.txt")
        assert (late.code, late.text) == (425, "The passive data port was closed: no data command took it up within "
                                               "0.5 s of the PASV or EPSV; send PORT or PASV again.")
        assert not (tree / "up" / "late.txt").exists()
    finally:
        for s in [alice, *others]:
            s.close()



class Holder:
    """One session of attack16 G4's holder: PASV, then a 100-byte MODE E upload whose data connection it keeps open
    (GFD.20 caching), so that the passive listener stays for the next upload over it."""

    def __init__(self, server, credential, grid_pki):
        from gridftp.transfer import PREPARE

        self.session = session(server, credential, grid_pki)
        for line in PREPARE:
            assert self.session.command(line).ok
        self.socks = []
        self.port = None

    def pasv(self):
        reply = self.session.command("PASV")
        if reply.code == 227:
            self.addresses = self.session.passive_addresses(reply)
            self.port = self.addresses[0][1]
        return reply

    def begin(self, name: str) -> None:
        """STOR, and the data connection made (the passive port is reached) or the cached one taken."""
        from gridftp.datachannel import Opening, connect_streams

        self.session.send(f"STOR /up/{name}")
        if not self.socks:
            self.socks = connect_streams(self.addresses, 1, protection=self.session.data_protection(), timeout=20,
                                         opening=Opening())

    def finish(self):
        from gridftp.datachannel import ModeESender
        from gridftp.transfer import _await_final

        ModeESender(b"x" * 100, [(0, 100)], keep_open=True).run(self.socks)
        return _await_final(self.session, idle_timeout=30)

    def store(self, name: str):
        self.begin(name)
        return self.finish()

    def close(self):
        for s in self.socks:
            s.close()
        self.session.close()


def test_a_listener_kept_after_an_upload_counts_toward_the_bound(narrow, grid_pki, tree):
    """attack16 G4: in alice's sessions a 100-byte MODE E upload each, its data connection kept: two kept listeners
    count toward her bound of 2 (her next PASV is refused naming it), one kept past the bound is closed within
    PASSIVE_GRACE (the next STOR is told why), and a counted one serves a prompt next upload over the cached
    connection. Without the fix the kept listeners counted for nothing: every PASV got its port (the range was
    hers, for DATA_CACHE_IDLE renewed by each tiny upload)."""
    server = narrow(passive_wait=120)
    h0, h1, h2, h3 = holders = [Holder(server, grid_pki.alice.proxy, grid_pki) for _ in range(4)]
    try:
        assert h0.pasv().code == 227
        h0.begin("hold0.txt")                       # reached: a running upload holds its port, uncounted
        assert h1.pasv().code == 227 and h2.pasv().code == 227
        assert h0.finish().code == 226             # kept past the bound (h1's and h2's are unreached)
        wait_for(lambda: refused_connection(h0.port), interval=0.2, what="the kept listener past the bound closed")
        late = h0.session.command("STOR /up/late.txt")
        assert (late.code, late.text) == (503, "In MODE E the receiver listens: the passive data port kept after the "
                                               "last upload was closed: no data command took it up within 2 s; send "
                                               "PASV or SPAS first.")
        assert h1.store("hold1.txt").code == 226 and h2.store("hold2.txt").code == 226   # kept, counted
        over = h3.pasv()
        assert (over.code, over.text) == (425, f"Cannot open a passive data port: {grid_pki.alice.dn} holds 2 already "
                                               f"that no data connection has reached, at most 2 per identity across "
                                               f"its sessions: use them (send the data command) or end those sessions "
                                               f"first.")
        assert h1.store("again.txt").code == 226        # the cache serves a prompt next upload
        assert (tree / "up" / "again.txt").read_bytes() == b"x" * 100
        assert not refused_connection(h2.port)
    finally:
        for h in holders:
            h.close()


def ended_by_peer(sock) -> bool:
    """Whether the peer ended ``sock`` (its end of stream, or a TLS EOF or reset, within 10 s)."""
    sock.settimeout(10)
    try:
        while sock.recv(1 << 16):
            pass
    except TimeoutError:
        return False
    except OSError:         # ssl.SSLEOFError, a reset
        pass
    return True


def test_a_kept_listener_no_data_command_takes_up_is_closed(narrow, grid_pki, tree):
    """The kept listeners close after passive_wait seconds without a data command (not DATA_CACHE_IDLE, 120 s,
    renewed by each tiny upload: attack16 G4 held all four ports for 200 s), with their cached connections."""
    server = narrow(passive_wait=0.5)
    holders = [Holder(server, grid_pki.alice.proxy, grid_pki) for _ in range(2)]
    try:
        for i, h in enumerate(holders):
            assert h.pasv().code == 227, i
            assert h.store(f"hold{i}.txt").code == 226
        for h in holders:
            wait_for(lambda: refused_connection(h.port), interval=0.2, what="a kept listener closed")
            assert ended_by_peer(h.socks[0])                # the server ended the cached connection too
        late = holders[0].session.command("STOR /up/late.txt")
        assert (late.code, late.text) == (503, "In MODE E the receiver listens: the passive data port kept after the "
                                               "last upload was closed: no data command took it up within 0.5 s; "
                                               "send PASV or SPAS first.")
    finally:
        for h in holders:
            h.close()
