"""`vmgrid transfer` with a `grid-proxy-init -old` (GT2 legacy) or `-draft` (GT3) proxy, made by Globus' own tool,
against vmgrid's GridFTP server (trial12 T3): OpenSSL's check, which AUTH TLS and PROT S/P data channels use on
both ends, refuses these forms, so nothing could move; the client says so before it connects (AUTH TLS ended in
"EOF occurred in violation of protocol", `--gsi` in a 426 and the hint to run the command again, which never helps)."""
from __future__ import annotations

import shutil
import socket

import pytest

from client.cli import main
from gridftp import AuthenticationError, GridFTPServer, download

from tests.interop.test_gsi_globus import grid_proxy_init
from tests.unit.gridftp.gridftp_helpers import make_file

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("grid-proxy-init") is None,
                                 reason="Debian package globus-proxy-utils is not installed")]


@pytest.fixture
def server(grid_pki, tmp_path):
    """vmgrid's server with the host credential and its defaults (PROT P required)."""
    make_file(tmp_path / "served" / "data" / "small", 1000)
    s = GridFTPServer(tmp_path / "served", "127.0.0.1", 0, credential=grid_pki.host, trust=grid_pki.cert_dir).start()
    yield s
    s.stop()


@pytest.mark.parametrize("form", ["-old", "-draft"])
@pytest.mark.parametrize("gsi", [[], ["--gsi"]], ids=["auth-tls", "gsi"])
def test_transfer_with_an_older_globus_proxy_says_to_make_an_rfc_3820_one(server, grid_pki, tmp_path, capsys,
                                                                        form, gsi):
    proxy = grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "x509up", form)
    rc = main(["transfer", f"gsiftp://localhost:{server.port}/data/small", str(tmp_path / "copy"), "-q",
               "--proxy", str(proxy), "--cert-dir", str(grid_pki.cert_dir), *gsi])
    err = capsys.readouterr().err
    kind = "legacy" if form == "-old" else "draft"
    assert rc == 1 and err.count("\n") == 1, err
    assert f"is a {kind} proxy (grid-proxy-init {form})" in err
    assert "takes RFC 3820 proxies only: make one with `vmgrid proxy-init` or `grid-proxy-init -rfc`" in err
    assert "run the same command again" not in err and "EOF" not in err
    assert not (tmp_path / "copy").exists()


def test_the_older_proxy_is_refused_before_any_connection(grid_pki, tmp_path):
    """Nothing reaches the network: a listener given as the server is never connected to."""
    proxy = grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "x509up", "-old")
    from security.pki import load_credential

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.5)
        with pytest.raises(AuthenticationError, match="legacy proxy"):
            download(f"gsiftp://localhost:{listener.getsockname()[1]}/x", tmp_path / "x",
                     credential=load_credential(proxy=proxy), trust=grid_pki.cert_dir, retries=0)
        with pytest.raises(socket.timeout):
            listener.accept()


def test_an_rfc_3820_proxy_of_grid_proxy_init_still_transfers(server, grid_pki, tmp_path, capsys):
    proxy = grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "x509up", "-rfc")
    rc = main(["transfer", f"gsiftp://localhost:{server.port}/data/small", str(tmp_path / "copy"), "-q",
               "--proxy", str(proxy), "--cert-dir", str(grid_pki.cert_dir)])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "copy").read_bytes() == (tmp_path / "served" / "data" / "small").read_bytes()


@pytest.mark.parametrize("form", ["-old", "-draft"])
def test_an_older_proxy_moves_clear_data_over_gsi_where_the_server_allows_it(grid_pki, tmp_path, capsys,
                                                                             form):
    """GSI's own contexts (control channel, PROT C data channels) take the older forms: `--gsi --prot C` is not
    refused before connecting, and transfers from a server that allows clear data (docs/gridftp.md says so)."""
    make_file(tmp_path / "served" / "data" / "small", 1000)
    server = GridFTPServer(tmp_path / "served", "127.0.0.1", 0, credential=grid_pki.host, trust=grid_pki.cert_dir,
                           require_private_data=False).start()
    try:
        proxy = grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "x509up", form)
        rc = main(["transfer", f"gsiftp://localhost:{server.port}/data/small", str(tmp_path / "copy"), "-q",
                   "--proxy", str(proxy), "--cert-dir", str(grid_pki.cert_dir), "--gsi", "--prot", "C"])
    finally:
        server.stop()
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "copy").read_bytes() == (tmp_path / "served" / "data" / "small").read_bytes()
