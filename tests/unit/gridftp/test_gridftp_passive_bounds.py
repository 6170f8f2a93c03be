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
