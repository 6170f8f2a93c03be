"""What a GSI client delegates, and to whom (attack16 G1, G2): the server is checked inside the GSI exchange, before
the delegation flag, so a server that is not the one meant (a certificate of the site's CA for another host, a user's
proxy) gets no proxy, whether reached by ``gsi=True``, by the 504 fallback or by a job service's stage-in and
stage-out; the proxy delegated is a limited one unless a full one is asked for by name."""
from __future__ import annotations

import pytest

from gridftp import AuthenticationError, download, upload
from gridftp import server as server_module
from gridftp.client import GSI_FALLBACK, GridFTPClient
from security.gsi import DELEGATE_FULL, GSIContext, GSIError
from security.hostauth import host_refusal
from security.pki import make_proxy
from services.jobs.staging import Stager, StagingError

from tests.unit.gridftp.gridftp_helpers import sha256_of
from tests.unit.gridftp.test_gridftp_gsi import establish


@pytest.fixture
def acceptors(monkeypatch):
    """Every GSI acceptor context vmgrid's servers make in the test, to see what each received."""
    made: list[GSIContext] = []

    class Recorded(GSIContext):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(server_module, "GSIContext", Recorded)
    return made


@pytest.fixture
def gsi_only(start_server, grid_pki, monkeypatch):
    """start(**kwargs) -> a vmgrid server refusing AUTH TLS with 504 (a GSI-only server, as a forged 504 makes any)."""
    original = server_module._Session.cmd_AUTH

    def gsi_only_auth(self, arg):
        if arg.upper() != "GSSAPI":
            raise server_module._Reply(504, "Unknown authentication type.")
        return original(self, arg)

    monkeypatch.setattr(server_module._Session, "cmd_AUTH", gsi_only_auth)

    def start(**kwargs):
        return start_server(**{"credential": grid_pki.host, "trust": grid_pki.cert_dir, "upload_area": "/up",
                               "anonymous": False, **kwargs})
    return start


def nothing_delegated(made: list[GSIContext]) -> bool:
    """The servers' contexts authenticated the client and then got no delegation flag: none asked for a proxy."""
    return bool(made) and all(c.delegated is None and c.state not in ("certificate", "done") for c in made)


# -- the context ------------------------------------------------------------------------------------------------
def test_a_peer_the_initiator_refuses_never_hears_the_delegation_flag(grid_pki):
    """A GSI acceptor with bob's proxy (a certificate of the site's CA, no host's): the initiator that delegates
    refuses it by the host rule before its flag; without the rule the same peer gets alice's proxy."""
    trust = grid_pki.trust()
    peer = GSIContext(grid_pki.bob.proxy, trust, initiate=False)
    client = GSIContext(grid_pki.alice.proxy, trust, initiate=True, delegate=True,
                        authorize=lambda caller: host_refusal(caller, "localhost"))
    with pytest.raises(GSIError, match="presented a proxy"):
        establish(client, peer)
    assert peer.delegated is None and peer.state == "flags" and not client.complete

    unchecked = GSIContext(grid_pki.bob.proxy, trust, initiate=False)
    establish(GSIContext(grid_pki.alice.proxy, trust, initiate=True, delegate=True), unchecked)
    assert unchecked.delegated is not None and unchecked.delegated.identity == grid_pki.alice.dn


def test_delegation_is_limited_unless_full_is_asked_for(grid_pki):
    trust = grid_pki.trust()
    full_proxy = grid_pki.alice.proxy
    assert not full_proxy.limited
    for delegate, limited in ((True, True), ("limited", True), (DELEGATE_FULL, False)):
        server = GSIContext(grid_pki.host, trust, initiate=False)
        establish(GSIContext(full_proxy, trust, initiate=True, delegate=delegate), server)
        assert server.delegated.identity == grid_pki.alice.dn and server.delegated.limited is limited, delegate
    # a limited credential delegates a limited proxy whatever is asked
    limited = make_proxy(grid_pki.alice.credential, hours=1, limited=True, key=grid_pki.keys.take())
    server = GSIContext(grid_pki.host, trust, initiate=False)
    establish(GSIContext(limited, trust, initiate=True, delegate=DELEGATE_FULL), server)
    assert server.delegated.limited
    with pytest.raises(ValueError):
        GSIContext(full_proxy, trust, initiate=True, delegate="everything")


# -- a real GSI server presenting a CA-valid certificate of another host -----------------------------------------
@pytest.mark.parametrize("how", ["gsi", "fallback"])
def test_a_server_with_another_hosts_certificate_gets_no_proxy(gsi_only, acceptors, grid_pki, tmp_path, how):
    elsewhere = grid_pki.issue_host("elsewhere.example.org")
    server = gsi_only(credential=elsewhere)
    with pytest.raises(AuthenticationError) as info:
        download(f"gsiftp://localhost:{server.port}/data/small", tmp_path / "x", credential=grid_pki.alice.proxy,
                 trust=grid_pki.cert_dir, gsi=True if how == "gsi" else GSI_FALLBACK, retries=0)
    assert str(info.value) == (f"server certificate {elsewhere.identity!r} does not name localhost "
                               f"(GSI: nothing was delegated to it)")
    assert nothing_delegated(acceptors)
    assert not (tmp_path / "x").exists()


def test_a_server_presenting_a_users_proxy_gets_no_proxy(gsi_only, acceptors, grid_pki, tmp_path):
    """attack16 G1's man in the middle: bob's own proxy as the server's credential."""
    server = gsi_only(credential=grid_pki.bob.proxy)
    with pytest.raises(AuthenticationError) as info:
        upload(tree_file(tmp_path), f"gsiftp://localhost:{server.port}/up/f", credential=grid_pki.alice.proxy,
               trust=grid_pki.cert_dir, gsi=GSI_FALLBACK, retries=0, state_dir=tmp_path / "st")
    said = str(info.value)
    assert said.startswith(f"the server presented a proxy ({grid_pki.bob.proxy.subject}), not a host certificate")
    assert said.endswith("(expected a host certificate naming localhost) (GSI: nothing was delegated to it)")
    assert nothing_delegated(acceptors)


def test_a_server_other_than_server_dn_or_refused_gets_no_proxy(gsi_only, acceptors, grid_pki):
    server = gsi_only()
    url = f"gsiftp://localhost:{server.port}/"
    with pytest.raises(AuthenticationError) as info:
        GridFTPClient(url, credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir, gsi=True,
                      server_dn="/O=Grid/CN=host/other").connect()
    assert str(info.value) == (f"server is {grid_pki.host.identity!r}, expected '/O=Grid/CN=host/other' "
                               f"(GSI: nothing was delegated to it)")
    with pytest.raises(AuthenticationError, match="a certificate refused here"):
        GridFTPClient(url, credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir, gsi=GSI_FALLBACK,
                      refuse_server=lambda dn: dn == grid_pki.host.identity).connect()
    assert nothing_delegated(acceptors)
    # the host meant gets a limited proxy of alice's full one, and the transfer works
    acceptors.clear()
    with GridFTPClient(url, credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir, gsi=True) as session:
        assert session.server_dn == grid_pki.host.identity
    assert [c.delegated.limited for c in acceptors] == [True]


def test_a_job_services_stage_in_and_out_lend_no_proxy_to_the_wrong_server(gsi_only, acceptors, grid_pki,
                                                                            tmp_path):
    """The path attack16 G1 took: a job's gsiftp:// stage-in and stage-out (gsi=GSI_FALLBACK, no server_dn) with
    the submitter's proxy, the server answered by a certificate of another host."""
    server = gsi_only(credential=grid_pki.issue_host("elsewhere.example.org"))
    stager = Stager(grid_pki.host, grid_pki.trust(), tmp_path / "staging")
    url = f"gsiftp://localhost:{server.port}"
    with pytest.raises(StagingError, match="does not name localhost .GSI: nothing was delegated to it."):
        stager.fetch(f"{url}/data/small", tmp_path / "in", "/O=Grid/CN=alice", None, lambda n: None,
                     credential=grid_pki.alice.proxy)
    with pytest.raises(StagingError, match="does not name localhost .GSI: nothing was delegated to it."):
        stager.send(tree_file(tmp_path), f"{url}/up/out", sha256_of(tree_file(tmp_path)), lambda n: None,
                    credential=grid_pki.alice.proxy)
    assert nothing_delegated(acceptors)


def tree_file(tmp_path):
    f = tmp_path / "local.bin"
    if not f.exists():
        f.write_bytes(b"x" * 5000)
    return f


# -- vmgrid transfer --gsi (attack16 G2) ----------------------------------------------------------------------------
def test_vmgrid_transfer_gsi_delegates_a_limited_proxy_unless_full_delegation(start_server, acceptors, grid_pki, tree,
                                                                               tmp_path):
    """The server sees a limited proxy from `vmgrid transfer --gsi` (alice's own proxy is a full one), a full one
    only with --full-delegation; the session that asks the checksum gets none."""
    from tests.unit.gridftp.test_gridftp_cli import vmgrid

    assert not grid_pki.alice.proxy.limited
    server = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, upload_area="/up", anonymous=False)
    url = f"gsiftp://localhost:{server.port}"
    common = ["--proxy", str(grid_pki.alice.proxy_path), "--cert-dir", str(grid_pki.cert_dir), "-q", "--retries", "0"]
    got = vmgrid("transfer", "--gsi", f"{url}/data/f3m", str(tmp_path / "f"), *common)
    assert got.returncode == 0, got.stderr
    assert sha256_of(tmp_path / "f") == sha256_of(tree / "data" / "f3m")
    delegated = [c.delegated for c in acceptors if c.delegated is not None]
    assert len(acceptors) == 2 and len(delegated) == 1      # the data session; the CKSM session got nothing
    assert delegated[0].identity == grid_pki.alice.dn and delegated[0].limited

    acceptors.clear()
    sent = vmgrid("transfer", "--gsi", "--full-delegation", str(tmp_path / "f"), f"{url}/up/f", *common)
    assert sent.returncode == 0, sent.stderr
    delegated = [c.delegated for c in acceptors if c.delegated is not None]
    assert delegated and all(d.identity == grid_pki.alice.dn and not d.limited for d in delegated)

