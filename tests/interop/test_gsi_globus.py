"""GSI (AUTH GSSAPI, issue 15) against the real Globus tools: globus-url-copy with a proxy made by
grid-proxy-init talks gsiftp:// to vmgrid's GridFTP server; the security context is the Globus GSI
mechanism (TLS handshake in ADAT tokens, a proxy delegated inside it, every later command wrapped).
Refusals: an untrusted CA, an expired proxy, a DN the server does not accept, a limited proxy where
the site refuses them. And vmgrid's client (``gsi=True``) against globus-gridftp-server with a host
certificate and a grid-mapfile, in MODE E."""
from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from gridftp import AuthenticationError, download, third_party, upload
from security.pki import Credential, load_credential, proxy_certificate, save_proxy

from tests.fixtures.pki import grid_pki  # noqa: F401
from tests.interop.test_gridftp_globus import (_free_port, globus_argv, url_copy, vmgrid_servers,  # noqa: F401
                                               world)
from tests.unit.gridftp.gridftp_helpers import MiB, make_file, sha256_of, wait_for

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not shutil.which("globus-url-copy") or not shutil.which("grid-proxy-init"),
                       reason="Globus tools not installed (run.sh setup installs them)"),
]

SIZE = 9 * MiB + 1234


def globus_env(user, cert_dir, proxy: Path | None) -> dict[str, str]:
    """grid-proxy-init (proxy None) sees the user's certificate and key; globus-url-copy sees only the
    proxy (and a home without ~/.globus), so it cannot fall back to the certificate."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "GLOBUS_"))}
    if proxy is None:
        env.update(user.env(cert_dir, proxy=False))
    else:
        env.update({"X509_CERT_DIR": str(cert_dir), "X509_USER_PROXY": str(proxy),
                    "HOME": str(proxy.parent)})
    return env


def grid_proxy_init(user, cert_dir, out: Path, *options: str) -> Path:
    proc = subprocess.run(["grid-proxy-init", *options, "-out", str(out)], env=globus_env(user, cert_dir, None),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def alice_proxy(grid_pki, tmp_path_factory):  # noqa: F811
    """alice's RFC 3820 proxy, made by grid-proxy-init itself."""
    return grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path_factory.mktemp("gpi") / "x509up", "-rfc")


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    make_file(root / "data" / "image.qcow2", SIZE)
    (root / "up").mkdir()
    return root


@pytest.fixture
def gsi_server(grid_pki, served):  # noqa: F811
    """vmgrid's server with the host credential; clear data allowed (PROT C is one of the cases)."""
    with vmgrid_servers(served, credential=grid_pki.host, trust=grid_pki.cert_dir, require_private_data=False) as start:
        yield start


DATA_CHANNELS = {
    "DCAU N, PROT C": ["-nodcau"],
    "DCAU A, PROT C": [],                       # globus-url-copy's default: authenticated, clear data
    "DCAU A, PROT S": ["-dcsafe"],
    "DCAU A, PROT P": ["-dcpriv"],
}


@pytest.mark.parametrize("direction", ["download", "upload"])
@pytest.mark.parametrize("parallel", [1, 4])
@pytest.mark.parametrize("channel", list(DATA_CHANNELS))
def test_globus_url_copy_with_a_grid_proxy_init_proxy(gsi_server, grid_pki, alice_proxy, globus_argv,  # noqa: F811
                                                      served, tmp_path, direction, parallel, channel):
    """globus-url-copy, its proxy from grid-proxy-init, against vmgrid's server: the whole file
    arrives (and -verify-checksum compares CKSM with the local copy) whatever the data channel."""
    decisions = []
    server = gsi_server(authorize=lambda dn, op, path: decisions.append((dn, op, path)) or True)
    local = tmp_path / "local.qcow2"
    remote = f"gsiftp://localhost:{server.port}"
    if direction == "download":
        src, dst, op, path = f"{remote}/data/image.qcow2", f"file://{local}", "read", "/data/image.qcow2"
    else:
        make_file(local, SIZE)
        src, dst, op, path = f"file://{local}", f"{remote}/up/image.qcow2", "write", "/up/image.qcow2"
    proc = url_copy(globus_argv, globus_env(grid_pki.alice, grid_pki.cert_dir, alice_proxy),
                    *DATA_CHANNELS[channel], "-p", str(parallel), "-verify-checksum", src, dst)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert sha256_of(local) == sha256_of(served / path.lstrip("/"))
    # the identity the path rules saw is alice's end-entity DN, behind Globus' proxy
    assert (grid_pki.alice.dn, op, path) in decisions
    assert {dn for dn, _, _ in decisions} == {grid_pki.alice.dn}


def test_data_channel_protection_can_be_required(gsi_server, grid_pki, alice_proxy, globus_argv,  # noqa: F811
                                                 tmp_path):
    """A server that requires private data (the default) refuses PROT C and serves PROT P; the refusal names the
    flag a Globus user needs (docs trial F1: globus-url-copy without -dcpriv got a 521 naming FTP commands only)."""
    server = gsi_server(require_private_data=True)
    env = globus_env(grid_pki.alice, grid_pki.cert_dir, alice_proxy)
    url = f"gsiftp://localhost:{server.port}/data/image.qcow2"
    refused = url_copy(globus_argv, env, url, f"file://{tmp_path / 'clear'}")
    assert refused.returncode != 0 and "521" in refused.stderr + refused.stdout
    assert "(globus-url-copy: -dcpriv)" in refused.stderr + refused.stdout
    assert url_copy(globus_argv, env, "-dcpriv", url, f"file://{tmp_path / 'private'}").returncode == 0


def _refused(globus_argv, env, server, tmp_path) -> str:  # noqa: F811
    out = tmp_path / "never"
    proc = url_copy(globus_argv, env, "-nodcau", f"gsiftp://localhost:{server.port}/data/image.qcow2",
                    f"file://{out}")
    assert proc.returncode != 0, proc.stdout
    assert not out.exists() or out.stat().st_size == 0
    return proc.stderr + proc.stdout


def test_a_dn_the_server_does_not_accept_is_refused(gsi_server, grid_pki, alice_proxy, globus_argv,  # noqa: F811
                                                    tmp_path):
    gridmap = tmp_path / "grid-mapfile"
    gridmap.write_text(f'"{grid_pki.bob.dn}" bob\n')
    server = gsi_server(gridmap=gridmap)
    text = _refused(globus_argv, globus_env(grid_pki.alice, grid_pki.cert_dir, alice_proxy), server, tmp_path)
    assert "grid-mapfile" in text
    # and the DN the grid-mapfile names gets in
    bob_proxy = grid_proxy_init(grid_pki.bob, grid_pki.cert_dir, tmp_path / "bob", "-rfc")
    proc = url_copy(globus_argv, globus_env(grid_pki.bob, grid_pki.cert_dir, bob_proxy), "-nodcau",
                    f"gsiftp://localhost:{server.port}/data/image.qcow2", f"file://{tmp_path / 'bob.out'}")
    assert proc.returncode == 0, proc.stderr


def test_an_untrusted_ca_is_refused(gsi_server, grid_pki, globus_argv, tmp_path):  # noqa: F811
    """stranger's certificate comes from a CA the server's X509_CERT_DIR does not hold; the client
    trusts both CAs so that only the server can refuse."""
    both = tmp_path / "both-cas"
    shutil.copytree(grid_pki.cert_dir, both)
    for f in grid_pki.untrusted_ca.cert_dir.iterdir():
        shutil.copy(f, both / f.name)
    proxy = grid_proxy_init(grid_pki.stranger, both, tmp_path / "stranger", "-rfc")
    server = gsi_server()
    text = _refused(globus_argv, globus_env(grid_pki.stranger, both, proxy), server, tmp_path)
    assert "535" in text or "not issued by a trusted CA" in text or "authentication" in text.lower()


def test_an_expired_proxy_is_refused(gsi_server, grid_pki, globus_argv, tmp_path):  # noqa: F811
    alice = grid_pki.alice
    key = grid_pki.keys.take()
    now = dt.datetime.now(dt.timezone.utc)
    cert = proxy_certificate(alice.credential, key.public_key(), lifetime=dt.timedelta(hours=-1),
                             not_before=now - dt.timedelta(hours=3))
    expired = save_proxy(Credential(cert, key, alice.credential.certificates), tmp_path / "expired")
    server = gsi_server()
    _refused(globus_argv, globus_env(alice, grid_pki.cert_dir, expired), server, tmp_path)


def test_a_limited_proxy_where_the_site_refuses_them(gsi_server, grid_pki, globus_argv, tmp_path):  # noqa: F811
    limited = grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "limited", "-rfc", "-limited")
    refusing = gsi_server(accept_limited_proxies=False)
    text = _refused(globus_argv, globus_env(grid_pki.alice, grid_pki.cert_dir, limited), refusing, tmp_path)
    assert "limited proxy" in text
    accepting = gsi_server()
    proc = url_copy(globus_argv, globus_env(grid_pki.alice, grid_pki.cert_dir, limited), "-nodcau",
                    f"gsiftp://localhost:{accepting.port}/data/image.qcow2", f"file://{tmp_path / 'ok'}")
    assert proc.returncode == 0, proc.stderr


# -- vmgrid's client against globus-gridftp-server with GSI -------------------------------------------------
class GlobusGSIServer:
    """globus-gridftp-server with a host certificate and a grid-mapfile (no anonymous access). As root it
    runs each session as the mapped account (nobody), so its CA directory and files are world-readable."""

    def __init__(self, globus_argv, world: Path, pki, mapped_dns: list[str]):  # noqa: F811
        self.world = world
        certs = world / "certificates"
        shutil.copytree(pki.cert_dir, certs)
        os.chmod(certs, 0o755)
        for f in certs.iterdir():
            os.chmod(f, 0o644)
        gridmap = world / "grid-mapfile"
        account = "nobody" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        gridmap.write_text("".join(f'"{dn}" {account}\n' for dn in mapped_dns))
        self.log = world / "globus-gsi.log"
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "GLOBUS_"))}
        env.update({"X509_USER_CERT": str(pki.host_cert_path), "X509_USER_KEY": str(pki.host_key_path),
                    "X509_CERT_DIR": str(certs), "GRIDMAP": str(gridmap)})
        argv = ["globus-gridftp-server", "-p", str(self.port), "-d", "ALL", "-l", str(self.log), "-daemon",
                "-control-interface", "127.0.0.1"]
        self.proc = subprocess.Popen(globus_argv(argv), env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        wait_for(self._ready, timeout=20, what="globus-gridftp-server to listen")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"globus-gridftp-server exited: {self.proc.stderr.read()!r}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(3) == b"220"
        except OSError:
            return False

    def url(self, path: Path) -> str:
        return f"gsiftp://localhost:{self.port}{path}"

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc.stderr.close()


@pytest.fixture
def globus_gsi(globus_argv, world, grid_pki):  # noqa: F811
    server = GlobusGSIServer(globus_argv, world, grid_pki, [grid_pki.alice.dn])
    yield server
    server.stop()


@pytest.mark.parametrize("proxy_from", ["vmgrid", "grid-proxy-init"])
@pytest.mark.parametrize("parallel", [1, 4])
def test_vmgrid_client_against_a_globus_gsi_server(globus_gsi, world, grid_pki, alice_proxy, tmp_path,  # noqa: F811
                                                   proxy_from, parallel):
    """MODE E, DCAU A, PROT P, a proxy delegated to the Globus server (which then authenticates the
    data connections with it): download and upload, each verified by sha256 against the file."""
    proxy = grid_pki.alice.proxy if proxy_from == "vmgrid" else load_credential(proxy=alice_proxy)
    source = world / "src" / "image.qcow2"
    make_file(source, SIZE)
    os.chmod(source, 0o644)
    got = download(globus_gsi.url(source), tmp_path / "got", parallel=parallel, credential=proxy,
                   trust=grid_pki.cert_dir, gsi=True, retries=0)
    assert got.sha256 == sha256_of(source) == sha256_of(tmp_path / "got")
    sent = upload(tmp_path / "got", globus_gsi.url(world / "dst" / "image.qcow2"), parallel=parallel,
                  credential=proxy, trust=grid_pki.cert_dir, gsi=True, retries=0, state_dir=tmp_path / "st")
    assert sent.sha256 == sha256_of(world / "dst" / "image.qcow2") == got.sha256
    assert f"{grid_pki.alice.dn}" in globus_gsi.log.read_text(errors="replace")


def test_a_globus_gsi_server_refuses_an_unmapped_dn(globus_gsi, world, grid_pki, tmp_path):  # noqa: F811
    source = world / "src" / "small"
    make_file(source, 1000)
    os.chmod(source, 0o644)
    with pytest.raises(AuthenticationError):
        download(globus_gsi.url(source), tmp_path / "x", credential=grid_pki.bob.proxy, trust=grid_pki.cert_dir,
                 gsi=True, retries=0)


@pytest.mark.parametrize("form, channel", [("-old", "DCAU N, PROT C"), ("-draft", "DCAU N, PROT C"),
                                           ("-draft", "DCAU A, PROT C")])
def test_the_older_globus_proxy_forms(gsi_server, grid_pki, globus_argv, served, tmp_path, form,  # noqa: F811
                                      channel):
    """grid-proxy-init -old (GT2: CN=proxy, no extension) and -draft (GT3 ProxyCertInfo OID): the
    server walks them like RFC 3820 proxies and names alice. (With -old and DCAU A, globus-url-copy
    itself refuses the data channel: its check of the proxy it delegated from a GT2 proxy says "key
    usage does not include certificate signing"; not tested. PROT S/P data connections are made with
    Python's ssl module, whose OpenSSL check refuses both older forms: not supported.)"""
    decisions = []
    server = gsi_server(authorize=lambda dn, op, path: decisions.append(dn) or True)
    proxy = grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "x509up", form)
    out = tmp_path / "copy"
    proc = url_copy(globus_argv, globus_env(grid_pki.alice, grid_pki.cert_dir, proxy), *DATA_CHANNELS[channel],
                    f"gsiftp://localhost:{server.port}/data/image.qcow2", f"file://{out}")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert sha256_of(out) == sha256_of(served / "data" / "image.qcow2")
    assert set(decisions) == {grid_pki.alice.dn}


# -- third-party transfers between vmgrid's and Globus' servers, with delegation --------------------------
def _third_party_ends(direction: str, vmgrid, globus_gsi, world: Path, served: Path):
    """(source URL, destination URL, the file that arrives) of a third-party copy of served/data/image.qcow2
    between vmgrid's server and the Globus one, in ``direction``."""
    if direction == "vmgrid to globus":
        return (f"gsiftp://localhost:{vmgrid.port}/data/image.qcow2", globus_gsi.url(world / "dst" / "image.qcow2"),
                world / "dst" / "image.qcow2")
    shutil.copy(served / "data" / "image.qcow2", world / "src" / "image.qcow2")
    os.chmod(world / "src" / "image.qcow2", 0o644)
    return (globus_gsi.url(world / "src" / "image.qcow2"), f"gsiftp://localhost:{vmgrid.port}/up/image.qcow2",
            served / "up" / "image.qcow2")


@pytest.mark.parametrize("driver", ["globus-url-copy", "vmgrid"])
@pytest.mark.parametrize("direction", ["vmgrid to globus", "globus to vmgrid"])
def test_third_party_between_vmgrid_and_globus(gsi_server, globus_gsi, world, grid_pki, alice_proxy,  # noqa: F811
                                               globus_argv, served, tmp_path, driver, direction):
    """The client delegates a proxy to each server; the servers then authenticate their data
    connection to each other with it (DCAU A: both prove alice's DN) and move the file directly."""
    vmgrid = gsi_server()
    image = served / "data" / "image.qcow2"
    src, dst, arrived = _third_party_ends(direction, vmgrid, globus_gsi, world, served)
    if driver == "globus-url-copy":
        proc = url_copy(globus_argv, globus_env(grid_pki.alice, grid_pki.cert_dir, alice_proxy), "-p", "2", src, dst)
        assert proc.returncode == 0, proc.stderr + proc.stdout
    else:
        result = third_party(src, dst, 2, credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir, gsi=True,
                             retries=0, state_dir=tmp_path / "st")
        assert result.sha256 == sha256_of(image)
    assert sha256_of(arrived) == sha256_of(image)


# -- `vmgrid transfer` at a GSI-only Globus server: GSI with --gsi only -----------------------------------------
def _vmgrid_transfer(grid_pki, *args: str) -> subprocess.CompletedProcess:  # noqa: F811
    """`vmgrid transfer ARGS -q` as alice (her proxy from the environment)."""
    import sys

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("X509_", "GLOBUS_"))},
           **grid_pki.alice.env(grid_pki.cert_dir)}
    return subprocess.run([sys.executable, "-m", "client.cli", "transfer", *args, "-q"], env=env,
                          capture_output=True, text=True, timeout=180)


def test_vmgrid_transfer_at_a_gsi_only_globus_server_lends_a_proxy_only_with_gsi(globus_gsi, world,  # noqa: F811
                                                                                 grid_pki, tmp_path):  # noqa: F811
    """globus-gridftp-server answers AUTH TLS with 504. Without --gsi, `vmgrid transfer` lends nothing: one line
    saying what --gsi would lend, rc 1, nothing transferred (it fell back by itself for a while, which gave a VM
    owner's job service face answering 504 a proxy of whoever fetched from it: attack16 G2); the server authorized
    no DN. With --gsi it downloads, uploads and verifies, the server authorizing alice."""
    source = world / "src" / "in.fa"
    make_file(source, 3 * MiB + 17)
    os.chmod(source, 0o644)
    refused = _vmgrid_transfer(grid_pki, "-p", "2", globus_gsi.url(source), str(tmp_path / "got"))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "server refused AUTH TLS: 504" in refused.stderr, refused.stderr
    assert "add --gsi: that lends the server a limited proxy" in refused.stderr, refused.stderr
    assert not (tmp_path / "got").exists()
    assert "successfully authorized" not in globus_gsi.log.read_text(errors="replace")
    got = _vmgrid_transfer(grid_pki, "--gsi", "-p", "2", globus_gsi.url(source), str(tmp_path / "got"))
    assert got.returncode == 0, got.stderr
    assert sha256_of(tmp_path / "got") == sha256_of(source)
    assert f"sha256 {sha256_of(source)} verified" in got.stdout
    sent = _vmgrid_transfer(grid_pki, "--gsi", "-p", "2", "--state-dir", str(tmp_path / "st"), str(tmp_path / "got"),
                            globus_gsi.url(world / "dst" / "back.fa"))
    assert sent.returncode == 0, sent.stderr
    assert sha256_of(world / "dst" / "back.fa") == sha256_of(source)
    assert f"DN {grid_pki.alice.dn} successfully authorized" in globus_gsi.log.read_text(errors="replace")


@pytest.mark.parametrize("direction", ["vmgrid to globus", "globus to vmgrid"])
def test_vmgrid_transfer_third_party_with_a_gsi_only_globus_server(gsi_server, globus_gsi, world, grid_pki,  # noqa: F811
                                                                   served, tmp_path, direction, caplog):
    """Third party between vmgrid's server (AUTH TLS and GSI) and a GSI-only Globus server, with --gsi: the Globus
    side is reached by GSI, and vmgrid's side too (DCAU A: each proves alice's DN with the
    proxy delegated to it), whichever of them is asked first."""
    import logging

    caplog.set_level(logging.INFO, logger="gridftp.server")
    decisions: list[str] = []
    vmgrid = gsi_server(authorize=lambda dn, op, path: decisions.append(dn) or True)
    image = served / "data" / "image.qcow2"
    src, dst, arrived = _third_party_ends(direction, vmgrid, globus_gsi, world, served)
    proc = _vmgrid_transfer(grid_pki, "--gsi", "-p", "2", "--state-dir", str(tmp_path / "st"), src, dst)
    assert proc.returncode == 0, proc.stderr
    assert sha256_of(arrived) == sha256_of(image)
    assert set(decisions) == {grid_pki.alice.dn}
    assert any("authenticated by GSI" in r.getMessage() for r in caplog.records)       # vmgrid's side too
