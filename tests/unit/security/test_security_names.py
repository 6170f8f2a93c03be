"""Names compared as parsed names, never as strings (issue 9.7, its siblings outside the policy): GSI host
authorization of responses and the notification consumer's signer check take the host from a DN's one CN
`host/<name>`, so a user whose DN merely contains `/CN=host/...` is no host."""
from __future__ import annotations

import datetime as dt

import pytest

from security.client import host_authorizer
from security.pki import host_of
from security.trust import Caller

FORGED = ["/O=Grid/OU=vmgrid/CN=x/CN=host/localhost",     # two CN parts
          "/O=Grid/OU=vmgrid/CN=x\\/CN=host/localhost",   # one CN value holding '/CN=host/...'
          "/O=Grid/OU=vmgrid/CN=host/",                   # no host name
          "/O=Grid/OU=vmgrid/CN=alice"]


def caller(dn: str) -> Caller:
    return Caller(dn=dn, subject=dn, chain=(), limited=False, is_proxy=False,
                  not_after=dt.datetime.now(dt.timezone.utc), issuer="/O=Grid/OU=vmgrid/CN=vmgrid CA")


def test_host_of_reads_the_one_host_cn():
    assert host_of("/O=Grid/OU=vmgrid/CN=host/node1.example.org") == "node1.example.org"
    for dn in FORGED:
        assert host_of(dn) is None


@pytest.mark.parametrize("dn", FORGED)
def test_a_response_signed_by_a_user_whose_dn_contains_a_host_cn_is_not_the_host(dn):
    authorized = host_authorizer("https://localhost:8443/wsrf/services/VMManagerService")
    assert authorized(caller("/O=Grid/OU=vmgrid/CN=host/localhost"))
    assert not authorized(caller(dn))


def test_soap_host_authorization_takes_a_hosts_own_certificate_never_a_proxy_of_it(grid_pki):
    """host_authorizer judges the end-entity DN and refuses a proxy chain as a host's (security.hostauth)."""
    import datetime as dt

    from security.client import host_authorizer
    from security.pki import Credential, proxy_certificate

    trust = grid_pki.trust()
    authorized = host_authorizer("https://localhost:8443/wsrf/services/VMManagerService")
    assert authorized(trust.validate(grid_pki.host.certificates))
    key = grid_pki.keys.take()
    proxy = Credential(proxy_certificate(grid_pki.host, key.public_key(), lifetime=dt.timedelta(hours=1)), key,
                       grid_pki.host.certificates)
    caller = trust.validate(proxy.certificates)
    assert caller.dn == grid_pki.host.subject and caller.is_proxy
    assert not authorized(caller)
    assert not authorized(trust.validate(grid_pki.alice.proxy.certificates))
