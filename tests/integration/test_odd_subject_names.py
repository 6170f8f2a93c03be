"""Subject names that a CA the site trusts could issue and that read like another identity (attack11 F13), through
real signed calls to a grid on loopback: a multi-valued RDN `OU=vmgrid + CN=host/localhost` is not the host
`/O=Grid/OU=vmgrid/CN=host/localhost` (security.pki.dn_string renders it with '+', as OpenSSL's one-line form does),
and `.../CN=alice ` (a trailing blank) is its own subject all the way to the Authorization service's decision."""
from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client.soap import GridServiceClient
from client.vmmanager import VMManagerClient
from services.authz.client import AuthorizationClient
from services.faults import AccessDenied
from security.pki import Credential, make_proxy
from tests.fixtures.grid import start_grid


@pytest.fixture(scope="module")
def grid(grid_pki, tmp_path_factory):
    grid = start_grid(grid_pki, tmp_path_factory.mktemp("odd") / "grid")
    try:
        grid.image = grid.register()
        yield grid
    finally:
        grid.close()


def credential(grid_pki, *rdns) -> Credential:
    """A proxy of a certificate the site CA signs for exactly this name (as any CA in X509_CERT_DIR could)."""
    name = x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(oid, value) for oid, value in rdn])
                      for rdn in rdns])
    key = grid_pki.keys.take()
    cert = grid_pki.ca._sign(name, key.public_key(), 1, [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    return make_proxy(Credential(cert, key, ()), hours=1)


O, OU, CN = NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME


def test_a_multi_valued_rdn_is_not_the_host_it_would_spell(grid, grid_pki):
    odd = credential(grid_pki, [(O, "Grid")], [(OU, "vmgrid"), (CN, "host/localhost")])
    authz = AuthorizationClient.connect(grid.authz_url, odd, grid_pki.trust())
    with pytest.raises(AccessDenied):           # ListSlots: enforcement points ("/O=Grid/*/CN=host/*") and admins
        authz.list_slots()
    assert odd.identity == "/O=Grid/OU=vmgrid+CN=host/localhost" != grid_pki.host.subject
    assert authz.groups(odd.identity) == ([], [])


def test_a_trailing_blank_is_another_subject_up_to_the_decision(grid, grid_pki):
    """`CN=alice ` is not alice (in bio): a node asks about that subject, not about her, and it may not deploy
    bio's image; it may ask about itself ('me'), which the service took for a question about alice."""
    blank = credential(grid_pki, [(O, "Grid")], [(OU, "vmgrid")], [(CN, "alice ")])
    assert blank.identity == grid_pki.alice.dn + " "
    vm = VMManagerClient(GridServiceClient(grid.node_url(), blank, grid_pki.trust()))
    with pytest.raises(AccessDenied):
        vm.deploy(grid.image, "blank-1", 600)
    authz = AuthorizationClient.connect(grid.authz_url, blank, grid_pki.trust())
    assert authz.groups(blank.identity) == ([], [])
    decisions = [r for r in AuthorizationClient.connect(grid.authz_url, grid_pki.admin.proxy, grid_pki.trust())
                 .audit(event="decision", limit=50) if r.get("action") == "vm.deploy"]
    assert decisions and decisions[-1]["subject"] == blank.identity and decisions[-1]["decision"] == "deny"
