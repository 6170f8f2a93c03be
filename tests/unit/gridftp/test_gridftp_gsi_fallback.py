"""``gsi=GSI_FALLBACK`` (a job service's gsiftp:// files, trial15 X12): AUTH TLS, and AUTH GSSAPI on the same
connection when a GSI-only server (globus-gridftp-server; here vmgrid's server with AUTH TLS refused) answers 504,
with the server checked exactly as under AUTH TLS (its host certificate naming the URL's host, or ``server_dn``);
without it the refusal says what the server likely is."""
from __future__ import annotations

import pytest

from gridftp import AuthenticationError, GSIOnlyServer, download, upload
from gridftp.client import GSI_FALLBACK, GridFTPClient

from tests.unit.gridftp.gridftp_helpers import sha256_of


@pytest.fixture
def gsi_only(start_server, grid_pki, monkeypatch):
    """start(**kwargs) -> vmgrid's server refusing AUTH TLS with 504 as globus-gridftp-server does; the
    mechanisms clients asked for are in the list it returns with the server."""
    from gridftp import server as server_module

    asked: list[str] = []
    original = server_module._Session.cmd_AUTH

    def gsi_only_auth(self, arg):
        asked.append(arg.upper())
        if arg.upper() != "GSSAPI":
            raise server_module._Reply(504, "Unknown authentication type.")
        return original(self, arg)

    monkeypatch.setattr(server_module._Session, "cmd_AUTH", gsi_only_auth)

    def start(**kwargs):
        kwargs = {"credential": grid_pki.host, "trust": grid_pki.cert_dir, "upload_area": "/up",
                  "anonymous": False, **kwargs}
        return start_server(**kwargs), asked
    return start


def test_the_fallback_moves_files_with_gsi_where_auth_tls_is_refused(gsi_only, grid_pki, tree, tmp_path):
    server, asked = gsi_only()
    url = f"gsiftp://localhost:{server.port}"
    got = download(f"{url}/data/f3m", tmp_path / "f", parallel=2, credential=grid_pki.alice.proxy,
                   trust=grid_pki.cert_dir, gsi=GSI_FALLBACK, retries=0)
    assert got.sha256 == sha256_of(tree / "data" / "f3m") == sha256_of(tmp_path / "f")
    sent = upload(tmp_path / "f", f"{url}/up/f", parallel=2, credential=grid_pki.alice.proxy,
                  trust=grid_pki.cert_dir, gsi=GSI_FALLBACK, retries=0, state_dir=tmp_path / "st")
    assert sent.sha256 == sha256_of(tree / "up" / "f") == got.sha256
    assert asked[:2] == ["TLS", "GSSAPI"] and set(asked) == {"TLS", "GSSAPI"}
    with GridFTPClient(f"{url}/", credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir,
                       gsi=GSI_FALLBACK) as session:
        assert session.gsi and session.gss is not None and session.server_dn == grid_pki.host_dn


@pytest.fixture
def delegations(monkeypatch):
    """The proxies this process's GSI initiators signed for a server (security.gsi.GSIContext._sign_request)."""
    from security.gsi import GSIContext

    signed: list[str] = []
    original = GSIContext._sign_request

    def sign(self):
        token = original(self)
        if self.state == "done":
            signed.append(self.peer.dn)
        return token

    monkeypatch.setattr(GSIContext, "_sign_request", sign)
    return signed


def test_the_fallback_keeps_the_servers_name_check(gsi_only, grid_pki, tmp_path, delegations):
    """A GSI-only server whose certificate is not a host certificate for the URL's host is refused after the
    fallback as AUTH TLS refuses it (nothing is sent to it), and so is one that is not the expected DN; and it is
    refused before the delegation: it holds no proxy of the user's (a 504 forged on the way, answered by any holder of
    a certificate of the grid's CAs, gained one: the host check came after the whole GSI exchange, delegation
    included)."""
    server, _ = gsi_only(credential=grid_pki.issue_host("elsewhere.example.org"))
    with pytest.raises(AuthenticationError, match="elsewhere.example.org"):
        GridFTPClient(f"gsiftp://localhost:{server.port}/", credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir,
                      gsi=GSI_FALLBACK).connect()
    with pytest.raises(AuthenticationError, match="elsewhere.example.org"):     # the same with GSI asked outright
        GridFTPClient(f"gsiftp://localhost:{server.port}/", credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir,
                      gsi=True).connect()
    refusing, _ = gsi_only()
    with pytest.raises(AuthenticationError, match="presented"):
        GridFTPClient(f"gsiftp://localhost:{refusing.port}/", credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir,
                      gsi=GSI_FALLBACK, refuse_server=lambda dn: True).connect()
    assert delegations == []
    server, _ = gsi_only()
    with pytest.raises(AuthenticationError, match="expected"):
        GridFTPClient(f"gsiftp://localhost:{server.port}/", credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir,
                      gsi=GSI_FALLBACK, server_dn="/O=Grid/CN=host/other").connect()
    with GridFTPClient(f"gsiftp://localhost:{server.port}/", credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir,
                       gsi=GSI_FALLBACK) as session:        # the right server: checked, then delegated to
        assert session.server_dn == grid_pki.host_dn
    assert delegations == [grid_pki.host_dn]


def test_without_gsi_the_504_says_what_the_server_likely_is(gsi_only, grid_pki, tmp_path):
    """A library caller without the fallback gets a GSIOnlyServer (an AuthenticationError) naming the likely server;
    what to set is its caller's to say (a node: [vmmanager] staging_gsi; `vmgrid transfer` falls back)."""
    server, asked = gsi_only()
    with pytest.raises(GSIOnlyServer) as info:
        download(f"gsiftp://localhost:{server.port}/data/small", tmp_path / "x", credential=grid_pki.alice.proxy,
                 trust=grid_pki.cert_dir, retries=0)
    assert isinstance(info.value, AuthenticationError) and info.value.code == 504
    assert str(info.value) == ("server refused AUTH TLS: 504 Unknown authentication type. (a GSI-only server, e.g. "
                               "globus-gridftp-server: it takes AUTH GSSAPI)")
    assert asked == ["TLS"]
