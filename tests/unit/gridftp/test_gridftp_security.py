"""Secured GridFTP: AUTH TLS (RFC 4217) with mutual authentication by grid certificates and RFC 3820 proxies,
PROT P data channels with the DCAU identity check, DN-based path authorization, refused credentials.
Certificates come from the test grid PKI (tests/fixtures/pki.py, built with security/)."""
from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import threading

import pytest

from gridftp import AuthenticationError, GridFTPClient, ReplyError, datachannel, download, third_party, upload
from gridftp.protocol import BLOCK_HEADER, DESC_EOD, DESC_EOF, find_host_ports
from gridftp.tls import DataTLS, TLSConfig
from security.pki import OID_INDEPENDENT, Credential, make_proxy, proxy_certificate

from tests.unit.gridftp.gridftp_helpers import RawFTP, read_stream, send_mode_e, sha256_of, wait_for

ALICE_ONLY = "/data/f3m"


@pytest.fixture
def decisions():
    return []


@pytest.fixture
def secure_server(start_server, grid_pki, decisions):
    """A TLS server: alice may read everything, bob everything but /data/f3m; writes go to /up."""

    def authorize(dn, op, path):
        decisions.append((dn, op, path))
        return not (path == ALICE_ONLY and dn == grid_pki.bob.dn)

    return start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, authorize=authorize,
                        upload_area="/up", anonymous=False)


def url(server, path):
    return f"gsiftp://localhost:{server.port}{path}"


@pytest.mark.parametrize("which", ["certificate", "proxy", "proxy of a proxy", "limited proxy"])
def test_download_and_upload_with_grid_credentials(secure_server, grid_pki, tree, tmp_path, decisions, which):
    alice = grid_pki.alice
    cred = {"certificate": alice.credential, "proxy": alice.proxy,
            "proxy of a proxy": make_proxy(alice.proxy, hours=1, key=grid_pki.keys.take()),
            "limited proxy": make_proxy(alice.credential, hours=1, limited=True, key=grid_pki.keys.take()),
            }[which]
    result = download(url(secure_server, "/data/f3m"), tmp_path / "f", parallel=3, credential=cred,
                      trust=grid_pki.cert_dir)
    assert result.sha256 == sha256_of(tree / "data" / "f3m")
    up = upload(tmp_path / "f", url(secure_server, "/up/f"), parallel=2, credential=cred,
                trust=grid_pki.cert_dir, state_dir=tmp_path / "state")
    assert sha256_of(tree / "up" / "f") == up.sha256 == result.sha256
    # the identity is the end-entity DN, whatever proxy carried it
    assert {dn for dn, _, _ in decisions} == {alice.dn}
    assert (alice.dn, "write", "/up/f") in decisions


def test_path_authorization_by_dn(secure_server, grid_pki, tmp_path):
    bob = grid_pki.bob
    with pytest.raises(ReplyError) as info:
        download(url(secure_server, ALICE_ONLY), tmp_path / "f", credential=bob.proxy, trust=grid_pki.cert_dir)
    assert info.value.code == 550
    assert download(url(secure_server, "/data/small"), tmp_path / "s", credential=bob.proxy,
                    trust=grid_pki.cert_dir).size == 1000


@pytest.mark.parametrize("who", ["stranger", "revoked", "expired proxy", "independent proxy"])
def test_bad_credentials_are_refused(secure_server, grid_pki, tmp_path, who):
    alice = grid_pki.alice
    key = grid_pki.keys.take()
    if who == "expired proxy":
        now = dt.datetime.now(dt.timezone.utc)
        cert = proxy_certificate(alice.credential, key.public_key(), lifetime=dt.timedelta(hours=-1),
                                 not_before=now - dt.timedelta(hours=3))
        cred = Credential(cert, key, alice.credential.certificates)
    elif who == "independent proxy":
        cert = proxy_certificate(alice.credential, key.public_key(), lifetime=dt.timedelta(hours=1),
                                 policy_language=OID_INDEPENDENT)
        cred = Credential(cert, key, alice.credential.certificates)
    else:
        cred = getattr(grid_pki, who).credential
    with pytest.raises(AuthenticationError):
        download(url(secure_server, "/data/small"), tmp_path / "x", credential=cred, trust=grid_pki.cert_dir,
                 retries=0)
    assert not (tmp_path / "x").exists()


def test_tls_without_a_client_certificate_is_refused(secure_server, grid_pki):
    ctx = ssl.create_default_context(capath=str(grid_pki.cert_dir))
    ctx.check_hostname = False
    s = RawFTP("127.0.0.1", secure_server.port)
    s.expect("AUTH TLS", 234)
    with pytest.raises((ssl.SSLError, OSError, EOFError)):
        s.ctl.start_tls(ctx, server_side=False)
        s.cmd("USER x")


def test_the_client_checks_the_server(start_server, grid_pki, tmp_path):
    other = grid_pki.issue_host("elsewhere.example.org")
    server = start_server(credential=other, trust=grid_pki.cert_dir, anonymous=False)
    with pytest.raises(AuthenticationError, match="does not name"):
        download(url(server, "/data/small"), tmp_path / "x", credential=grid_pki.alice.proxy,
                 trust=grid_pki.cert_dir, retries=0)
    # pinning the server's DN instead of its name works, and a wrong pin is refused
    download(url(server, "/data/small"), tmp_path / "x", credential=grid_pki.alice.proxy,
             trust=grid_pki.cert_dir, server_dn=other.subject)
    with pytest.raises(AuthenticationError):
        download(url(server, "/data/small"), tmp_path / "y", credential=grid_pki.alice.proxy,
                 trust=grid_pki.cert_dir, server_dn=grid_pki.host.subject, retries=0)


def _tls_session(server, grid_pki, user) -> tuple[RawFTP, TLSConfig]:
    tls = TLSConfig(user, grid_pki.cert_dir)
    s = RawFTP("127.0.0.1", server.port)
    s.starttls(tls.client_context)
    return s, tls


def test_secured_session_protocol(secure_server, grid_pki):
    s, _ = _tls_session(secure_server, grid_pki, grid_pki.alice.proxy)
    s.expect("AUTH TLS", 503)                          # once is enough
    s.expect("PROT P", 503)                            # PBSZ first
    s.expect("PBSZ 0", 200)
    s.expect("PROT S", 536)
    s.expect("PROT X", 504)
    reply = s.expect("USER :globus-mapping:", 232)
    assert grid_pki.alice.dn in reply.text
    s.expect("DCAU X", 504)
    s.expect("DCAU S", 504)
    s.expect("DCAU A", 200)
    s.expect("CCC", 533)
    feats = s.expect("FEAT", 211).text
    assert "AUTH TLS" in feats and "DCAU" in feats
    s.pasv()
    s.expect("RETR /data/small", 521)                  # PROT C (the RFC 4217 default) is refused
    s.expect("PROT C", 200)
    s.pasv()
    s.expect("STOR /up/x", 521)


def test_anonymous_and_named_logins_on_a_tls_server(secure_server, start_server, grid_pki, tree, tmp_path):
    s = RawFTP("127.0.0.1", secure_server.port)
    s.expect("USER anonymous", 530)                    # anonymous only when enabled
    s.expect("USER alice", 530)                        # no passwords: certificates only
    both = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, anonymous=True, upload_area="/up")
    assert download(f"ftp://127.0.0.1:{both.port}/data/small", tmp_path / "a").size == 1000
    with pytest.raises(ReplyError):
        upload(tmp_path / "a", f"ftp://127.0.0.1:{both.port}/up/a", state_dir=tmp_path / "st", retries=0)
    upload(tmp_path / "a", url(both, "/up/a"), credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir,
           state_dir=tmp_path / "st")
    assert (tree / "up" / "a").read_bytes() == (tree / "data" / "small").read_bytes()


def _final(s: RawFTP):
    reply = s.reply()
    while reply.preliminary:
        reply = s.reply()
    return reply


def _strays(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dropped a data connection" in r.getMessage()]


def test_data_channel_must_prove_the_sessions_identity(start_server, grid_pki, tree, caplog):
    """DCAU A: only alice's credential may connect to alice's data port; bob's TLS connection and a
    clear-text connection are dropped and logged, and with no one else coming the store ends with 432
    (accept_timeout) and stores nothing."""
    caplog.set_level(logging.WARNING, logger="gridftp.datachannel")
    server = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, upload_area="/up", anonymous=False,
                          accept_timeout=2)
    for intruder in ("bob", "plain"):
        s, _ = _tls_session(server, grid_pki, grid_pki.alice.proxy)
        for line in ("PBSZ 0", "PROT P", "USER :globus-mapping:", "MODE E", "ALLO 5"):
            assert s.cmd(line).ok
        addr = find_host_ports(s.expect("PASV", 227).text)[0]
        assert s.cmd("STOR /up/stolen").code == 150
        raw = socket.create_connection(addr, timeout=10)
        if intruder == "bob":
            ctx = TLSConfig(grid_pki.bob.proxy, grid_pki.cert_dir).client_context
            try:
                conn = ctx.wrap_socket(raw)
                conn.sendall(BLOCK_HEADER.pack(0, 5, 0) + b"evil!" + BLOCK_HEADER.pack(DESC_EOF, 0, 1)
                             + BLOCK_HEADER.pack(DESC_EOD, 0, 0))
            except (ssl.SSLError, OSError):
                pass
        else:
            raw.sendall(BLOCK_HEADER.pack(0, 5, 0) + b"evil!" + BLOCK_HEADER.pack(DESC_EOF, 0, 1)
                        + BLOCK_HEADER.pack(DESC_EOD, 0, 0))
        final = _final(s)
        assert final.code == 432, final
        assert not (tree / "up" / "stolen").exists()
        s.close()
    assert len(_strays(caplog)) == 2


STRAYS = ("stalled", "garbage", "clear text", "foreign CA", "another user")


@pytest.mark.parametrize("mode", ["E", "S"])
@pytest.mark.parametrize("kinds", [[k] for k in STRAYS] + [list(STRAYS)], ids=list(STRAYS) + ["all"])
def test_stray_data_connections_do_not_fail_the_users_transfer(secure_server, grid_pki, tree, caplog, mode, kinds):
    """Anyone who can reach a passive data port must not break the transfer waiting there: a connection that
    never finishes its handshake, garbage, clear text under PROT P, a certificate of a CA this server does not
    trust, a trusted user who is not the session's (DCAU A) arrive first; each is dropped (the failed ones
    logged), and alice's own data connection, behind them, stores the file."""
    caplog.set_level(logging.WARNING, logger="gridftp.datachannel")
    s, tls = _tls_session(secure_server, grid_pki, grid_pki.alice.proxy)
    payload = bytes(range(256)) * 400
    for line in ("PBSZ 0", "PROT P", "USER :globus-mapping:", "TYPE I", f"MODE {mode}", f"ALLO {len(payload)}"):
        assert s.cmd(line).ok, line
    addr = find_host_ports(s.expect("PASV", 227).text)[0]
    assert s.cmd("STOR /up/mine").code == 150
    evil = BLOCK_HEADER.pack(0, 5, 0) + b"evil!" + BLOCK_HEADER.pack(DESC_EOF, 0, 1) + BLOCK_HEADER.pack(DESC_EOD, 0, 0)
    evil = evil if mode == "E" else b"evil!"
    strays = []
    for kind in kinds:
        raw = socket.create_connection(addr, timeout=10)
        strays.append(raw)
        if kind == "garbage":
            raw.sendall(b"\x00\xff garbage \r\n" * 50)
        elif kind == "clear text":
            raw.sendall(evil)
        elif kind in ("foreign CA", "another user"):
            who = grid_pki.stranger.proxy if kind == "foreign CA" else grid_pki.bob.proxy
            try:
                conn = TLSConfig(who, grid_pki.cert_dir).client_context.wrap_socket(raw)
                strays.append(conn)
                conn.sendall(evil)
            except (ssl.SSLError, OSError):
                pass
    raw = socket.create_connection(addr, timeout=10)
    mine = DataTLS(tls, grid_pki.host_dn, tls_server=False).wrap(raw, server_side=False)
    if mode == "E":
        send_mode_e(mine, [(0, payload)])
    else:
        mine.sendall(payload)
        try:
            mine.unwrap()       # close_notify: the end of the file (the server closes without answering one)
        except OSError:
            pass
    mine.close()
    final = _final(s)
    assert final.code == 226, final
    assert (tree / "up" / "mine").read_bytes() == payload
    failed = [k for k in kinds if k != "stalled"]       # a staller is logged when cut (after the transfer here)
    wait_for(lambda: len(_strays(caplog)) >= len(failed), what="the failed strays logged")
    for sock in strays:
        sock.close()
    s.close()


def test_a_tls_data_peer_that_goes_silent_mid_transfer_is_cut_at_the_idle_bound(secure_server, grid_pki, tree,
                                                                                 monkeypatch):
    """A PROT P data connection whose sender stops sending (and keeps the connection open) ends the transfer after
    the data idle bound, as a clear one does: Python's ssl would retry the kernel's receive timeout for ever on a
    blocking TLS socket, holding the session's transfer (and its thread) until the peer closes."""
    monkeypatch.setattr(datachannel, "DATA_TIMEOUT", 1.0)
    s, tls = _tls_session(secure_server, grid_pki, grid_pki.alice.proxy)
    for line in ("PBSZ 0", "PROT P", "USER :globus-mapping:", "TYPE I", "MODE S"):
        assert s.cmd(line).ok, line
    addr = find_host_ports(s.expect("PASV", 227).text)[0]
    assert s.cmd("STOR /up/silent").code == 150
    mine = DataTLS(tls, grid_pki.host_dn, tls_server=False).wrap(socket.create_connection(addr, timeout=10),
                                                                 server_side=False)
    mine.sendall(b"x" * 1000)           # then nothing more, the connection left open
    final = _final(s)
    assert final.code in (426, 451), final
    assert not (tree / "up" / "silent").exists() or (tree / "up" / "silent").stat().st_size <= 1000
    assert s.cmd("NOOP").code == 200    # the session goes on
    mine.close()
    s.close()


def test_stalled_handshakes_hold_a_passive_port_only_for_their_time_bound(secure_server, grid_pki, tree,
                                                                         monkeypatch):
    """More connections that never finish their handshake than a port handshakes at once (MAX_HANDSHAKING)
    arrive before alice's: each is cut at the handshake bound (1 s here) and alice's connection, behind them
    all, is then taken and stores the file."""
    monkeypatch.setattr(datachannel, "HANDSHAKE_TIMEOUT", 1.0)
    s, tls = _tls_session(secure_server, grid_pki, grid_pki.alice.proxy)
    for line in ("PBSZ 0", "PROT P", "USER :globus-mapping:", "TYPE I", "MODE E", "ALLO 5"):
        assert s.cmd(line).ok, line
    addr = find_host_ports(s.expect("PASV", 227).text)[0]
    assert s.cmd("STOR /up/mine").code == 150
    stallers = [socket.create_connection(addr, timeout=10) for _ in range(datachannel.MAX_HANDSHAKING + 4)]
    raw = socket.create_connection(addr, timeout=30)
    mine = DataTLS(tls, grid_pki.host_dn, tls_server=False).wrap(raw, server_side=False)
    send_mode_e(mine, [(0, b"mine!")])
    mine.close()
    assert _final(s).code == 226
    assert (tree / "up" / "mine").read_bytes() == b"mine!"
    for staller in stallers:
        assert staller.recv(1) == b""           # cut
        staller.close()
    s.close()


@pytest.mark.parametrize("mode", ["E", "S"])
def test_without_dcau_a_passive_port_takes_only_the_clients_address(start_server, tree, caplog, mode):
    """With no data channel authentication (anonymous, DCAU N) whoever reached the port first would get or
    write the data. A connection from another address (127.0.0.2 stands for another host) is dropped and
    logged, the wait goes on, and the client's own connection gets the file (MODE S RETR) or stores it
    (MODE E STOR); an address listed in ``data_peers`` (a trusted third-party server) is taken."""
    caplog.set_level(logging.WARNING, logger="gridftp.datachannel")
    server = start_server(upload_area="/up", insecure_anonymous_writes=True)
    small = (tree / "data" / "small").read_bytes()
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    for line in ("TYPE I", f"MODE {mode}"):
        s.expect(line, 200)
    addr = s.pasv()
    if mode == "S":
        assert s.cmd("RETR /data/small").code == 150
    else:
        assert s.cmd("STOR /up/mine").code == 150
    stray = socket.create_connection(addr, timeout=10, source_address=("127.0.0.2", 0))
    try:
        if mode == "E":
            stray.sendall(BLOCK_HEADER.pack(0, 5, 0) + b"evil!" + BLOCK_HEADER.pack(DESC_EOF, 0, 1)
                          + BLOCK_HEADER.pack(DESC_EOD, 0, 0))
        assert read_stream(stray) == b""                               # dropped: not a byte of the file
    except ConnectionResetError:
        pass
    stray.close()
    mine = socket.create_connection(addr, timeout=10)
    if mode == "S":
        assert read_stream(mine) == small
    else:
        send_mode_e(mine, [(0, small)])
    mine.close()
    assert _final(s).code == 226
    if mode == "E":
        assert (tree / "up" / "mine").read_bytes() == small
    assert len(_strays(caplog)) == 1 and "127.0.0.2" in _strays(caplog)[0]
    s.close()
    peers = start_server(data_peers=["127.0.0.2/32"])            # a trusted server may connect
    s = RawFTP("127.0.0.1", peers.port)
    s.login_anonymous()
    s.expect("TYPE I", 200)
    addr = s.pasv()
    assert s.cmd("RETR /data/small").code == 150
    trusted = socket.create_connection(addr, timeout=10, source_address=("127.0.0.2", 0))
    assert read_stream(trusted) == small
    trusted.close()
    assert _final(s).code == 226
    s.close()


def test_third_party_between_secured_servers(start_server, grid_pki, tree, tmp_path):
    """Each server proves its host DN to the other on the data connections (DCAU S)."""
    source = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, anonymous=False)
    target_root = tmp_path / "target"
    (target_root / "up").mkdir(parents=True)
    target_host = grid_pki.ca.issue_host("gridftp-target", alt_names=["localhost"], key=grid_pki.keys.take(),
                                         out_dir=tmp_path / "target-host")
    target = start_server(root=target_root, credential=target_host, trust=grid_pki.cert_dir, anonymous=False,
                          upload_area="/up")
    result = third_party(url(source, "/data/f3m"), url(target, "/up/f3m"), parallel=2,
                         credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir, state_dir=tmp_path / "s")
    assert sha256_of(target_root / "up" / "f3m") == result.sha256 == sha256_of(tree / "data" / "f3m")


def test_injected_identity_check(start_server, grid_pki, tmp_path):
    """`identify` replaces the TrustStore decision (e.g. a deployment's own policy): here it maps every peer
    to a fixed name, which the authorization callback then sees."""
    seen = []
    server = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, anonymous=False,
                          identify=lambda sock: "/O=Test/CN=mapped",
                          authorize=lambda dn, op, path: seen.append(dn) or True)
    with GridFTPClient(url(server, "/"), credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir) as c:
        assert c.size("/data/small") == 1000
    assert seen == ["/O=Test/CN=mapped"]


# -- FTP bounce and port scans (issue 9) ---------------------------------------------------------------
def _listener(host: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(4)
    sock.settimeout(10)
    return sock


def _hp(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return ",".join(host.split(".") + [str(port >> 8), str(port & 255)])


def test_data_connections_go_only_to_the_control_peer(start_server, tree):
    """PORT, EPRT and SPOR naming any address but the client's own are refused before anything is
    opened: the server cannot be made to connect to a third host (127.0.0.2 stands for one)."""
    server = start_server()
    third = _listener("127.0.0.2")
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    s.expect(f"PORT {_hp(third)}", 501)
    s.expect(f"EPRT |1|127.0.0.2|{third.getsockname()[1]}|", 501)
    s.expect("EPRT |2|::ffff:127.0.0.2|5000|", 501)
    s.expect("MODE E", 200)
    s.expect(f"SPOR 127,0,0,1,19,137 {_hp(third)}", 501)
    s.expect("EPRT |2|::ffff:127.0.0.1|5000|", 200)    # the peer itself, however it is written
    s.expect("PORT 127,0,0,1,0,25", 501)               # and the privileged-port rule stays
    s.expect("MODE S", 200)
    s.expect(f"PORT {_hp(third)}", 501)
    s.expect("RETR /data/small", 425)                  # nothing set up: no connection was attempted
    third.settimeout(0.0)
    with pytest.raises(BlockingIOError):
        third.accept()
    s.close()


def test_a_site_may_trust_other_servers_for_third_party(start_server, tree):
    """``data_peers`` names the trusted servers a third-party transfer may reach."""
    server = start_server(data_peers=["127.0.0.2/32"])
    third = _listener("127.0.0.2")
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    s.expect("TYPE I", 200)
    s.expect(f"PORT {_hp(third)}", 200)
    assert s.cmd("RETR /data/small").code == 150
    conn, _ = third.accept()
    with conn:
        data = b"".join(iter(lambda: conn.recv(65536), b""))
    assert data == (tree / "data" / "small").read_bytes()
    assert s.reply().code == 226
    s.expect("PORT 127,0,0,3,19,137", 501)            # 127.0.0.3 is not on the list
    s.close()


@pytest.mark.parametrize("mode", ["S", "E"])
def test_failed_data_connections_look_alike(secure_server, grid_pki, mode):
    """A closed port and a port where some other service listens (it answers with a banner and
    hangs up, so the TLS handshake fails) get one and the same reply: the server is no port scanner."""
    closed = _listener("127.0.0.1")
    closed_port = closed.getsockname()[1]
    closed.close()
    other_service = _listener("127.0.0.1")

    def serve_banner():
        try:
            conn, _ = other_service.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            conn.close()
        except OSError:
            pass

    banner = threading.Thread(target=serve_banner, daemon=True)
    banner.start()
    answers = []
    for port in (closed_port, other_service.getsockname()[1]):
        s, _ = _tls_session(secure_server, grid_pki, grid_pki.alice.proxy)
        for line in ("PBSZ 0", "PROT P", "USER :globus-mapping:", "TYPE I", f"MODE {mode}",
                     f"PORT 127,0,0,1,{port >> 8},{port & 255}"):
            assert s.cmd(line).ok, line
        reply = s.cmd("RETR /data/small")
        while reply.preliminary:
            reply = s.reply()
        answers.append((reply.code, reply.text))
        s.close()
    banner.join(timeout=10)
    other_service.close()
    assert answers[0][0] == 425 and answers[0] == answers[1], answers


# -- host authorization: judged on the end-entity certificate, never a proxy (attack11 F1) ------------------------
def _server_credential(grid_pki, kind: str) -> Credential:
    """A credential a grid CA or a user can make that tries to pass as host ``localhost``."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def eec(*cns: str) -> Credential:
        name = x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(oid, value)]) for oid, value in
                          [(NameOID.ORGANIZATION_NAME, "Grid"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "vmgrid"),
                           *((NameOID.COMMON_NAME, cn) for cn in cns)]])
        key = grid_pki.keys.take()
        # serverAuth too: AUTH TLS's purpose check then lets the chain through, as for any site server
        cert = grid_pki.ca._sign(name, key.public_key(), 1, [ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH], [])
        return Credential(cert, key, ())

    def proxy(issuer: Credential, cn: str) -> Credential:
        key = grid_pki.keys.take()
        return Credential(proxy_certificate(issuer, key.public_key(), lifetime=dt.timedelta(hours=1), cn=cn), key,
                          issuer.certificates)

    if kind == "a user's proxy whose last CN is localhost":
        return proxy(eec("carol"), "localhost")
    if kind == "a user's proxy whose last CN is host/localhost":
        return proxy(eec("carol"), "host/localhost")
    if kind == "a proxy of the host's own certificate":
        return proxy(grid_pki.host, "12345")
    if kind == "a user certificate named localhost":
        return eec("localhost")
    if kind == "a user certificate with a second CN host/localhost":
        return eec("carol", "host/localhost")
    raise AssertionError(kind)


SPOOFS = ["a user's proxy whose last CN is localhost", "a user's proxy whose last CN is host/localhost",
          "a proxy of the host's own certificate", "a user certificate named localhost",
          "a user certificate with a second CN host/localhost"]


@pytest.mark.parametrize("gsi", [True, False], ids=["AUTH GSSAPI", "AUTH TLS"])
@pytest.mark.parametrize("kind", SPOOFS)
def test_only_a_host_certificate_passes_as_the_host(start_server, grid_pki, tmp_path, kind, gsi):
    """A node staging or pulling a migration's files (its host credential, no pinned DN) takes a server for the
    URL's host only by the chain's end-entity certificate: a host certificate naming it. Before, every CN of the
    presented leaf counted, so any user's proxy `.../CN=carol/CN=localhost` passed as localhost over GSI."""
    server = start_server(credential=_server_credential(grid_pki, kind), trust=grid_pki.cert_dir, anonymous=False)
    with pytest.raises(AuthenticationError, match="proxy|does not name localhost"):
        download(url(server, "/data/small"), tmp_path / "x", credential=grid_pki.host, trust=grid_pki.cert_dir,
                 gsi=gsi, retries=0)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("gsi", [True, False], ids=["AUTH GSSAPI", "AUTH TLS"])
def test_the_hosts_own_certificate_passes_by_its_cn_or_its_alt_names(start_server, grid_pki, tree, tmp_path, gsi):
    server = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, anonymous=False)
    for host in ("localhost", "127.0.0.1"):
        got = download(f"gsiftp://{host}:{server.port}/data/small", tmp_path / host, credential=grid_pki.host,
                       trust=grid_pki.cert_dir, gsi=gsi, retries=0)
        assert got.sha256 == sha256_of(tree / "data" / "small")
