"""Bounds on logged-in GridFTP sessions (attack F9): one user opened every session of the repository's face and kept
them with NOOPs, and every node's staging failed "421 Too many sessions". Real servers, real clients (AUTH TLS and
AUTH GSSAPI with the test grid's credentials)."""
from __future__ import annotations

import socket

import pytest

from gridftp.client import GridFTPClient
from gridftp.errors import GridFTPError
from gridftp.server import is_host_dn

from tests.unit.gridftp.gridftp_helpers import RawFTP, noop_until_refused, read_stream, wait_for


@pytest.fixture
def secured(start_server, grid_pki):
    def start(**kwargs):
        return start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, anonymous=False, **kwargs)
    return start


def session(server, credential, grid_pki, *, gsi: bool = False) -> GridFTPClient:
    """A logged-in session of vmgrid's own client (what a node's staging opens)."""
    return GridFTPClient(f"gsiftp://localhost:{server.port}/", credential=credential, trust=grid_pki.cert_dir,
                         gsi=gsi).connect()


def test_host_identities_are_host_end_entity_dns(grid_pki):
    assert is_host_dn(grid_pki.host.identity)
    assert is_host_dn("/O=Grid/OU=vmgrid/CN=host/node1.example.org")
    assert not is_host_dn(grid_pki.alice.dn) and not is_host_dn(None)
    assert not is_host_dn("/O=Grid/OU=vmgrid/CN=host/node1/CN=alice")       # a host name is no RDN of its own
    assert not is_host_dn("/O=Grid/OU=vmgrid/CN=hostile")
    assert not is_host_dn("/O=Grid/OU=vmgrid-guests/CN=host/10.0.0.7")      # a guest's: its owner holds the key
    # a site's own guest_ou: its guests' certificates were hosts' (only vmgrid-guests was known)
    site = ["/O=Grid/OU=site-guests/*"]
    assert is_host_dn("/O=Grid/OU=site-guests/CN=host/10.0.0.7") and not is_host_dn(
        "/O=Grid/OU=site-guests/CN=host/10.0.0.7", site)
    assert not is_host_dn("/o=grid/ou=SITE-GUESTS/CN=host/10.0.0.7", site)      # in other letters too
    assert is_host_dn("/O=Grid/OU=vmgrid/CN=host/node1.example.org", site)
    with pytest.raises(ValueError, match="'OU=site-guests' is not a DN pattern"):
        is_host_dn(None, ["OU=site-guests"])


def test_a_site_guest_ou_counts_as_users_at_the_server_and_its_face(secured, grid_pki, tmp_path):
    """GridFTPServer(guests=...) and a service's GridFTPFace: a guest container's certificate under the site's guest
    OU holds at most its identity's bound of sessions, where it held the hosts' share unbounded."""
    from gridftp.face import GridFTPFace
    from gridftp.filespace import LocalFileSpace

    guest = grid_pki.issue_host("10.0.0.8", ou="site-guests")
    server = secured(max_sessions=8, max_sessions_per_identity=2, host_sessions=4, guests=["/O=Grid/OU=site-guests/*"])
    face = GridFTPFace(LocalFileSpace(tmp_path), "127.0.0.1", 0, grid_pki.host, grid_pki.cert_dir,
                       authorize=lambda *a: True, upload_area="/up", max_sessions=8, max_sessions_per_identity=2,
                       host_sessions=4, guests=["/O=Grid/OU=site-guests/*"])
    face.start()
    held = []
    try:
        for srv in (server, face.server):
            held += [session(srv, guest, grid_pki) for _ in range(2)]
            with pytest.raises(GridFTPError, match="421 Too many sessions for /O=Grid/OU=site-guests/CN=host/10.0.0.8"):
                session(srv, guest, grid_pki)
            held += [session(srv, grid_pki.host, grid_pki) for _ in range(3)]
    finally:
        for s in held:
            s.close()
        face.stop()
    with pytest.raises(TypeError, match="unknown server options"):
        GridFTPFace(LocalFileSpace(tmp_path), "127.0.0.1", 0, grid_pki.host, grid_pki.cert_dir,
                    authorize=lambda *a: True, upload_area="/up", max_session=8)


@pytest.mark.parametrize("bad, message", [
    (dict(max_sessions=0), "max_sessions is 1 or more"),
    (dict(max_sessions=8, max_sessions_per_identity=9), "max_sessions_per_identity is 1 to 8"),
    (dict(max_sessions_per_address=0), "max_sessions_per_address is 1 to 64"),
    (dict(max_sessions=8, host_sessions=8), "host_sessions is 0 to 7"),
    (dict(transfer_idle_timeout=-1), "transfer_idle_timeout is seconds, 0"),
    (dict(guests=["site-guests"]), "'site-guests' is not a DN pattern"),
])
def test_bounds_that_cannot_mean_anything_are_refused_at_construction(tree, bad, message):
    """They were clamped unsaid (host_sessions=64 of 64 left the users one session)."""
    from gridftp.server import GridFTPServer

    with pytest.raises(ValueError, match=message):
        GridFTPServer(tree, anonymous=True, **bad)


@pytest.mark.parametrize("gsi", [False, True], ids=["tls", "gsi"])
def test_one_identity_cannot_hold_every_session_and_a_host_still_gets_in(secured, grid_pki, gsi):
    """bob holds his bound of sessions; his next login gets a 421 that names the bound, and the node's host
    credential still logs in (its sessions are kept room for); bob's other sessions are unaffected."""
    server = secured(max_sessions=8, max_sessions_per_identity=2, max_sessions_per_address=8, host_sessions=2)
    held = [session(server, grid_pki.bob.proxy, grid_pki, gsi=gsi) for _ in range(2)]
    with pytest.raises(GridFTPError) as refused:
        session(server, grid_pki.bob.proxy, grid_pki, gsi=gsi)
    text = str(refused.value)
    assert "421" in text and "at most 2 logged in at once per identity" in text and grid_pki.bob.dn in text
    node = session(server, grid_pki.host, grid_pki, gsi=gsi)
    assert node.command("NOOP").code == 200
    alice = session(server, grid_pki.alice.proxy, grid_pki, gsi=gsi)      # another user: her own bound
    assert alice.command("NOOP").code == 200
    for s in [*held, node, alice]:
        assert s.command("NOOP").code == 200
        s.close()


def test_users_together_leave_the_host_sessions_free(secured, grid_pki):
    """Every user within his own bound, the users together still stop short of max_sessions: the rest is the
    hosts'; a host's sessions count against no user bound."""
    server = secured(max_sessions=8, max_sessions_per_identity=2, max_sessions_per_address=8, host_sessions=4)
    users = [session(server, who.proxy, grid_pki) for who in (grid_pki.alice, grid_pki.bob) for _ in range(2)]
    with pytest.raises(GridFTPError, match="421 .*the users' 4 are in use .*other 4 are kept for hosts"):
        session(server, grid_pki.admin.proxy, grid_pki)
    nodes = [session(server, grid_pki.host, grid_pki) for _ in range(4)]     # more than one user's bound
    for s in users + nodes:
        s.close()


def test_one_address_is_bounded_anonymous_sessions_too(start_server):
    server = start_server(max_sessions=8, max_sessions_per_address=2)
    held = []
    for _ in range(2):
        held.append(RawFTP("127.0.0.1", server.port))
        held[-1].login_anonymous()
    held.append(RawFTP("127.0.0.1", server.port))
    s = held[2]
    s.expect("USER anonymous", 331)
    reply = s.cmd("PASS test@")
    assert reply.code == 421 and "at most 2 logged in at once per address" in reply.text
    assert s.sock.recv(100) == b""                      # and the session is closed
    held[0].expect("QUIT", 221)                         # a session that ended frees its place
    assert held[0].sock.recv(100) == b""
    other = RawFTP("127.0.0.1", server.port)
    wait_for(lambda: len(server._sessions) == 2, what="the ended session forgotten")
    other.login_anonymous()
    for s in held + [other]:
        s.close()


def test_a_logged_in_session_with_no_transfer_is_closed_noops_notwithstanding(start_server):
    """NOOPs kept a session for ever (idle_timeout, 900 s, renewed by each); a session with no transfer for
    transfer_idle_timeout is closed with a 421 however often it sends NOOP."""
    server = start_server(transfer_idle_timeout=1)
    s = RawFTP("127.0.0.1", server.port, timeout=30)
    s.login_anonymous()
    closed = noop_until_refused(s)
    assert closed.code == 421 and "No transfer for 1 s" in closed.text
    assert s.sock.recv(100) == b""
    # one waiting silently is closed as well
    quiet = RawFTP("127.0.0.1", server.port, timeout=30)
    quiet.login_anonymous()
    assert quiet.reply().code == 421
    s.close()
    quiet.close()


def test_a_transfer_keeps_a_session_and_restarts_the_clock(start_server):
    """A session that transfers is not idle: a RETR longer than transfer_idle_timeout (the server throttled) ends
    with its 226, and the session then still takes commands."""
    server = start_server(transfer_idle_timeout=1, max_rate=1000)     # /data/small: 1000 bytes, about 1 s or more
    s = RawFTP("127.0.0.1", server.port, timeout=30)
    s.login_anonymous()
    s.expect("TYPE I", 200)
    for _ in range(2):
        addr = s.pasv()
        data = socket.create_connection(addr, timeout=30)
        assert s.cmd("RETR /data/small").code == 150
        assert len(read_stream(data)) == 1000
        data.close()
        assert s.reply().code == 226
        assert s.cmd("NOOP").code == 200
    s.close()


@pytest.mark.parametrize("gsi", [False, True], ids=["tls", "gsi"])
def test_a_server_where_guests_have_no_rights_refuses_their_login(secured, grid_pki, gsi):
    """Attack G10: each of a VM owner's guest certificates (issued as a node issues them) is an identity of its own,
    so seven of them took 47 of the repository's 48 user sessions. A server with refuse_guests turns a guest's
    login away with one 530 line (its guest_ou in other letters too); users and hosts log in as before. Without
    refuse_guests a guest still logs in, and counts as a user."""
    guest = grid_pki.issue_guest("10.99.0.17")
    site_guest = grid_pki.issue_guest("10.99.0.18", guest_ou="Site-Guests")
    server = secured(refuse_guests=True, guests=["/O=Grid/OU=vmgrid-guests/*", "/O=Grid/OU=site-guests/*"])
    for who, dn in ((guest, "/O=Grid/OU=vmgrid-guests/CN=host/10.99.0.17"),
                    (site_guest, "/O=Grid/OU=Site-Guests/CN=host/10.99.0.18")):
        with pytest.raises(GridFTPError) as refused:
            session(server, who, grid_pki, gsi=gsi)
        assert str(refused.value).count("530") >= 1 and f"{dn} is a guest container's certificate: guests have " \
            "no rights on this server." in str(refused.value)
    wait_for(lambda: not server._sessions, what="the refused sessions closed")
    held = [session(server, grid_pki.alice.proxy, grid_pki, gsi=gsi), session(server, grid_pki.host, grid_pki, gsi=gsi)]
    open_to_guests = secured(max_sessions=8, max_sessions_per_identity=1, host_sessions=2)
    held.append(session(open_to_guests, guest, grid_pki, gsi=gsi))
    with pytest.raises(GridFTPError, match="421 Too many sessions for /O=Grid/OU=vmgrid-guests/CN=host/10.99.0.17"):
        session(open_to_guests, guest, grid_pki, gsi=gsi)
    for s in held:
        assert s.command("NOOP").code == 200
        s.close()


def test_a_refused_guest_gets_the_530_for_what_it_pipelined_and_is_closed(secured, grid_pki, tmp_path):
    """The 530 answers the commands a client sent behind its USER (as a 421 of a bound does), then the session ends:
    a refused guest holds no pre-login session for login_timeout."""
    import ssl

    from gridftp.tls import TLSConfig

    guest = grid_pki.issue_guest("10.99.0.19")
    server = secured(refuse_guests=True)
    raw = RawFTP("127.0.0.1", server.port)
    context = TLSConfig(guest, grid_pki.trust()).client_context
    context.check_hostname = False
    raw.starttls(context)
    raw.ctl.send_line("USER :globus-mapping:")
    raw.ctl.send_line("PASS dummy")
    first, second = raw.ctl.read_reply(), raw.ctl.read_reply()
    assert first.code == second.code == 530 and "guests have no rights on this server" in first.text
    try:
        rest = raw.sock.recv(100)
    except (ssl.SSLError, OSError):
        rest = b""
    assert rest == b""                                  # and the session is closed
    wait_for(lambda: not server._sessions, what="the refused session forgotten")
    raw.close()


def test_sessions_are_counted_per_loopback_and_per_ipv6_64(start_server):
    """One local account may bind any of 127.0.0.0/8 (attack G10's 127.0.0.2-4), and one IPv6 host any address of
    its /64: each is one address for max_sessions_per_address. A login past it from another loopback address is
    refused naming the loopback; other IPv4 addresses stay apart."""
    from gridftp.server import _address_group

    assert _address_group("127.0.0.2") == _address_group("127.9.8.7") == _address_group("::1") \
        == _address_group("::ffff:127.0.0.1")
    assert _address_group("2001:db8:1:2::1") == _address_group("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert _address_group("2001:db8:1:2::1") != _address_group("2001:db8:1:3::1")
    assert _address_group("192.0.2.1") == _address_group("::ffff:192.0.2.1") != _address_group("192.0.2.2")
    server = start_server(max_sessions=8, max_sessions_per_address=2)
    held = []
    for source in ("127.0.0.2", "127.0.0.3"):
        held.append(RawFTP("127.0.0.1", server.port, source=source))
        held[-1].login_anonymous()
    third = RawFTP("127.0.0.1", server.port, source="127.0.0.4")
    third.expect("USER anonymous", 331)
    reply = third.cmd("PASS test@")
    assert reply.code == 421 and "Too many sessions from loopback (127.0.0.0/8, ::1): at most 2" in reply.text
    for s in held + [third]:
        s.close()


def test_sessions_not_yet_logged_in_are_counted_per_loopback_too(start_server):
    """The bound on sessions not yet logged in groups addresses as the logged-in bounds do: two waiting sessions from
    127.0.0.2 and 127.0.0.3 fill max_unauthenticated_per_host = 2 of all of loopback, and a third from 127.0.0.4 is
    greeted 421. Before: the pre-login bound counted each loopback address apart (one local account binding
    127.0.0.2, .3, .4 … held max_unauthenticated_per_host sessions from each)."""
    server = start_server(max_sessions=16, max_unauthenticated_per_host=2)
    waiting = [RawFTP("127.0.0.1", server.port, source=source) for source in ("127.0.0.2", "127.0.0.3")]
    try:
        assert [w.greeting.code for w in waiting] == [220, 220]
        third = RawFTP("127.0.0.1", server.port, source="127.0.0.4")
        assert third.greeting.code == 421 and "Too many sessions" in third.greeting.text
        third.close()
    finally:
        for w in waiting:
            w.close()
