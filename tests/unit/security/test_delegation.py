"""RFC 3820 delegation to a service (security/delegation.py): a proxy issued for the service's own key, paired
with it on the service's side, refused when it is for another key, of another identity, too long-lived or not
a certificate chain at all."""
from __future__ import annotations

import datetime as dt

import pytest

from security.delegation import DelegationError, accept, delegate
from security.pki import make_proxy


def test_the_service_acts_as_the_user_with_its_own_key(grid_pki):
    pem = delegate(grid_pki.alice.credential, grid_pki.host.certificate)
    cred = accept(pem, grid_pki.host, grid_pki.trust(), expected_dn=grid_pki.alice.dn)
    assert cred.identity == grid_pki.alice.dn and cred.is_proxy and not cred.limited
    assert cred.private_key is grid_pki.host.private_key
    assert cred.not_after <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=31)


def test_a_proxy_of_a_limited_proxy_stays_limited(grid_pki):
    limited = make_proxy(grid_pki.alice.credential, hours=1, limited=True)
    cred = accept(delegate(limited, grid_pki.host.certificate), grid_pki.host, grid_pki.trust())
    assert cred.limited


def test_a_full_credential_may_delegate_a_limited_proxy(grid_pki):
    """delegate(limited=True): Globus' limited proxy (it moves data, starts nothing), from a full credential; the
    service accepts it and knows it limited."""
    cred = accept(delegate(grid_pki.alice.credential, grid_pki.host.certificate, limited=True), grid_pki.host,
                  grid_pki.trust(), expected_dn=grid_pki.alice.dn)
    assert cred.limited and cred.identity == grid_pki.alice.dn


@pytest.mark.parametrize("case", ["other-key", "other-identity", "too-long", "garbage", "empty", "not-proxy"])
def test_an_unusable_delegation_is_refused(grid_pki, case):
    pem = delegate(grid_pki.alice.credential, grid_pki.host.certificate)
    expected = grid_pki.alice.dn
    if case == "other-key":
        pem = delegate(grid_pki.alice.credential, grid_pki.bob.credential.certificate)
    elif case == "other-identity":
        expected = grid_pki.bob.dn
    elif case == "too-long":
        pem = delegate(grid_pki.alice.credential, grid_pki.host.certificate, lifetime=dt.timedelta(days=3))
    elif case == "garbage":
        pem = b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    elif case == "empty":
        pem = b""
    elif case == "not-proxy":
        pem = grid_pki.host.cert_pem()
    with pytest.raises(DelegationError):
        accept(pem, grid_pki.host, grid_pki.trust(), expected_dn=expected)
