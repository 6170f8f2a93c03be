"""The GSI GSSAPI mechanism (security/gsi.py) and AUTH GSSAPI in vmgrid's server and client: mutual
authentication against the trusted CA directory, delegation inside the context, wrapped commands,
refusals decided by the server (not by a client that declines to send a bad credential)."""
from __future__ import annotations

import base64
import datetime as dt

import pytest

from gridftp import AuthenticationError, download, upload
from gridftp.gridmap import read_gridmap
from security.gsi import GSIContext, GSIError
from security.pki import Credential, make_proxy, proxy_certificate

from tests.fixtures.pki import proxies_of
from tests.unit.gridftp.gridftp_helpers import RawFTP, sha256_of


def establish(initiator: GSIContext, acceptor: GSIContext) -> None:
    token = initiator.step(None)
    for _ in range(10):
        token = acceptor.step(token)
        if initiator.complete and acceptor.complete:
            return
        if not initiator.complete:
            token = initiator.step(token)
        if initiator.complete and acceptor.complete:
            return
    raise AssertionError("the context never completed")


@pytest.mark.parametrize("delegate", [False, True])
def test_context_authenticates_both_sides_and_delegates(grid_pki, delegate):
    trust = grid_pki.trust()
    client = GSIContext(grid_pki.alice.proxy, trust, initiate=True, delegate=delegate, expect=grid_pki.host.identity)
    server = GSIContext(grid_pki.host, trust, initiate=False)
    establish(client, server)
    assert server.peer.dn == grid_pki.alice.dn and client.peer.dn == grid_pki.host.identity
    if delegate:
        # a new proxy one level below alice's, for a key only the acceptor holds
        assert server.delegated.identity == grid_pki.alice.dn
        assert server.delegated.certificate.issuer == grid_pki.alice.proxy.certificate.subject
        assert trust.validate(server.delegated.certificates).dn == grid_pki.alice.dn
    else:
        assert server.delegated is None
    assert server.unwrap(client.wrap(b"RETR /x\r\n")) == b"RETR /x\r\n"
    assert client.unwrap(server.wrap(b"226 done\r\n")) == b"226 done\r\n"


def test_a_tampered_message_does_not_unwrap(grid_pki):
    trust = grid_pki.trust()
    client = GSIContext(grid_pki.alice.proxy, trust, initiate=True)
    server = GSIContext(grid_pki.host, trust, initiate=False)
    establish(client, server)
    token = bytearray(client.wrap(b"DELE /up/precious\r\n"))
    token[-3] ^= 1
    with pytest.raises(GSIError):
        server.unwrap(bytes(token))


def test_the_initiator_checks_the_servers_name(grid_pki):
    trust = grid_pki.trust()
    client = GSIContext(grid_pki.alice.proxy, trust, initiate=True, expect="/O=Grid/OU=vmgrid/CN=host/elsewhere")
    server = GSIContext(grid_pki.host, trust, initiate=False)
    with pytest.raises(GSIError, match="expected"):
        establish(client, server)


@pytest.mark.parametrize("who", ["stranger", "revoked", "expired proxy"])
def test_the_acceptor_refuses_bad_credentials(grid_pki, who):
    trust = grid_pki.trust()
    if who == "expired proxy":
        key = grid_pki.keys.take()
        now = dt.datetime.now(dt.timezone.utc)
        cert = proxy_certificate(grid_pki.alice.credential, key.public_key(), lifetime=dt.timedelta(hours=-1),
                                 not_before=now - dt.timedelta(hours=3))
        cred = Credential(cert, key, grid_pki.alice.credential.certificates)
    else:
        cred = getattr(grid_pki, who).proxy
    client = GSIContext(cred, trust, initiate=True)
    server = GSIContext(grid_pki.host, trust, initiate=False)
    with pytest.raises(GSIError):
        establish(client, server)
    assert server.peer is None and not server.complete


def test_limited_proxies_can_be_refused(grid_pki):
    trust = grid_pki.trust()
    limited = make_proxy(grid_pki.alice.credential, hours=1, limited=True, key=grid_pki.keys.take())
    server = GSIContext(grid_pki.host, trust, initiate=False, accept_limited=False)
    with pytest.raises(GSIError, match="limited"):
        establish(GSIContext(limited, trust, initiate=True), server)


def test_gridmap_file(tmp_path):
    f = tmp_path / "grid-mapfile"
    f.write_text('# site map\n"/O=Grid/OU=x/CN=Jane Doe" jdoe,other\n/O=Grid/OU=x/CN=bob bob\n\n')
    assert read_gridmap(f) == {"/O=Grid/OU=x/CN=Jane Doe", "/O=Grid/OU=x/CN=bob"}
    f.write_text('"/O=Grid/CN=unterminated jdoe\n')
    with pytest.raises(ValueError):
        read_gridmap(f)


# -- AUTH GSSAPI in the server and the client -----------------------------------------------------------
@pytest.fixture
def gsi_server(start_server, grid_pki):
    return start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, upload_area="/up", anonymous=False)


@pytest.mark.parametrize("parallel", [1, 3])
def test_vmgrid_client_and_server_over_gsi(gsi_server, grid_pki, tree, tmp_path, parallel):
    got = download(f"gsiftp://localhost:{gsi_server.port}/data/f3m", tmp_path / "f", parallel=parallel,
                   credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir, gsi=True, retries=0)
    assert got.sha256 == sha256_of(tree / "data" / "f3m")
    sent = upload(tmp_path / "f", f"gsiftp://localhost:{gsi_server.port}/up/f", parallel=parallel,
                  credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir, gsi=True, retries=0,
                  state_dir=tmp_path / "st")
    assert sent.sha256 == sha256_of(tree / "up" / "f") == got.sha256


def test_the_server_refuses_an_expired_proxy_itself(gsi_server, grid_pki, tmp_path):
    key = grid_pki.keys.take()
    now = dt.datetime.now(dt.timezone.utc)
    cert = proxy_certificate(grid_pki.alice.credential, key.public_key(), lifetime=dt.timedelta(hours=-1),
                             not_before=now - dt.timedelta(hours=3))
    expired = Credential(cert, key, grid_pki.alice.credential.certificates)
    with pytest.raises(AuthenticationError, match="535"):
        download(f"gsiftp://localhost:{gsi_server.port}/data/small", tmp_path / "x", credential=expired,
                 trust=grid_pki.cert_dir, gsi=True, retries=0)


def test_gridmap_decides_who_logs_in(start_server, grid_pki, tmp_path):
    server = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, anonymous=False,
                          gridmap={grid_pki.bob.dn})
    with pytest.raises(AuthenticationError, match="grid-mapfile"):
        download(f"gsiftp://localhost:{server.port}/data/small", tmp_path / "a", credential=grid_pki.alice.proxy,
                 trust=grid_pki.cert_dir, gsi=True, retries=0)
    assert download(f"gsiftp://localhost:{server.port}/data/small", tmp_path / "b", credential=grid_pki.bob.proxy,
                    trust=grid_pki.cert_dir, gsi=True, retries=0).size == 1000


def test_after_gssapi_every_command_must_be_protected(gsi_server, grid_pki):
    """A command injected in clear into an authenticated session is refused (533), and an ENC line
    whose token does not verify ends the session (535: the context is broken); FEAT names AUTH GSSAPI."""
    s = RawFTP("127.0.0.1", gsi_server.port)
    assert "AUTH GSSAPI" in s.expect("FEAT", 211).text
    s.expect("ADAT AAAA", 503)                                   # no AUTH GSSAPI yet
    s.expect("AUTH GSSAPI", 334)
    ctx = GSIContext(grid_pki.alice.proxy, grid_pki.trust(), initiate=True)
    token = ctx.step(None)
    while True:
        reply = s.cmd("ADAT " + base64.b64encode(token).decode())
        data = reply.text.strip()
        answer = base64.b64decode(data[5:]) if data.startswith("ADAT=") else b""
        if reply.code == 235:
            break
        assert reply.code == 335, reply
        token = ctx.step(answer)
    assert ctx.complete
    s.ctl.wrap, s.ctl.unwrap = ctx.wrap, ctx.unwrap
    assert s.cmd("USER :globus-mapping:").code == 232
    s.ctl.wrap = None
    assert s.cmd("DELE /up/anything").code == 533                 # clear text: refused
    assert s.cmd("NOOP").code == 533
    s.ctl.wrap = ctx.wrap
    assert s.cmd("NOOP").code == 200                              # the session goes on
    s.ctl.wrap, s.ctl.unwrap = None, None
    s.ctl.sock.sendall(b"ENC " + base64.b64encode(b"\x17\x03\x03\x00\x05hello") + b"\r\n")
    assert s.reply().code == 535
    with pytest.raises(EOFError):
        s.reply()
    s.close()


def test_the_cas_signing_policy_is_enforced(grid_pki, tmp_path):
    """A CA's <hash>.signing_policy names the subjects it may sign (as Globus enforces): alice's
    certificate, outside the allowed namespace, is refused by the GSI acceptor."""
    import shutil

    from security.trust import SigningPolicyViolation, TrustStore

    cert_dir = tmp_path / "certificates"
    shutil.copytree(grid_pki.cert_dir, cert_dir)
    policy = next(cert_dir.glob("*.signing_policy"))
    assert TrustStore(cert_dir).validate(grid_pki.alice.proxy.certificates).dn == grid_pki.alice.dn
    policy.write_text(policy.read_text().replace('"/O=Grid/*"', '"/O=Grid/OU=elsewhere/*"'))
    trust = TrustStore(cert_dir)
    with pytest.raises(SigningPolicyViolation):
        trust.validate(grid_pki.alice.proxy.certificates)
    with pytest.raises(GSIError, match="signing policy"):
        establish(GSIContext(grid_pki.alice.proxy, grid_pki.trust(), initiate=True),
                  GSIContext(grid_pki.host, trust, initiate=False))


def test_a_gsi_handshake_refuses_a_chain_longer_than_the_bound_in_openssl(grid_pki):
    """OpenSSL processed the peer's whole chain in the handshake before TrustStore's bound (16 certificates)
    applied to it. The GSI context's verify depth now stops a longer one in the handshake ("certificate chain too
    long", before its signatures are checked), and a chain of 16 still authenticates. Fails without: the 40-certificate
    chain got through the handshake and was refused by TrustStore afterwards ("holds 40 certificates")."""
    from cryptography.hazmat.primitives.asymmetric import ec
    trust, key = grid_pki.trust(), ec.generate_private_key(ec.SECP256R1())
    fifteen = proxies_of(grid_pki.alice.credential, 15, key)
    server = GSIContext(grid_pki.host, trust, initiate=False)
    establish(GSIContext(fifteen, trust, initiate=True), server)
    assert server.peer.dn == grid_pki.alice.dn and len(fifteen.certificates) == 16
    for proxies in (16, 39):          # 17 certificates, one past TrustStore's bound; 40
        server = GSIContext(grid_pki.host, trust, initiate=False)
        with pytest.raises(GSIError) as exc:
            establish(GSIContext(proxies_of(grid_pki.alice.credential, proxies, key), trust, initiate=True), server)
        assert "handshake failed" in exc.value.reason and "certificates; at most" not in exc.value.reason
        assert server.peer is None


def test_a_gridftp_tls_handshake_refuses_a_chain_longer_than_the_bound_in_openssl(grid_pki):
    """The same for GridFTP's AUTH TLS (Python's ssl): the server's OpenSSL refuses a 40-certificate proxy chain
    in the handshake ("certificate chain too long"); a chain of 16 is accepted, then validated by TrustStore.
    Fails without the verify depth: the 40-certificate chain completed the handshake."""
    import socket
    import ssl
    import threading

    from cryptography.hazmat.primitives.asymmetric import ec

    from gridftp.tls import _context, peer_chain
    trust, key = grid_pki.trust(), ec.generate_private_key(ec.SECP256R1())
    server_ctx = _context(True, grid_pki.host, trust)

    def handshake(cred: Credential):
        client_ctx = _context(False, cred, trust)
        a, b = socket.socketpair()
        out: dict = {}

        def serve():
            try:
                with server_ctx.wrap_socket(a, server_side=True) as s:
                    out["chain"] = peer_chain(s)
            except (ssl.SSLError, OSError) as exc:
                out["error"] = exc
        t = threading.Thread(target=serve)
        t.start()
        try:
            with client_ctx.wrap_socket(b, server_side=False) as c:
                c.recv(1)           # TLS 1.3: the server's verdict on the client's chain comes after the client's end
        except (ssl.SSLError, OSError):
            pass
        t.join(10)
        a.close()
        b.close()
        return out
    ok = handshake(proxies_of(grid_pki.alice.credential, 15, key))
    assert "error" not in ok and len(ok["chain"]) == 16
    assert trust.validate(ok["chain"]).dn == grid_pki.alice.dn
    for proxies in (16, 39):          # 17 certificates, one past TrustStore's bound; 40
        refused = handshake(proxies_of(grid_pki.alice.credential, proxies, key))
        assert "chain" not in refused and "certificate chain too long" in str(refused["error"])
