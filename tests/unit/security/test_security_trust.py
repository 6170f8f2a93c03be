"""Chain validation: end-entity certificates against the trusted CA directory and CRLs, then the proxy path."""
from __future__ import annotations

import datetime as dt

import pytest

from security.pki import OID_INDEPENDENT, OID_INHERIT_ALL, OID_LIMITED, Credential, GridCA, make_proxy, \
    proxy_certificate
from security.trust import ExpiredCertificate, InvalidProxy, RevokedCertificate, TrustStore, UntrustedChain
from tests.fixtures.pki import proxies_of


def _fake(issuer: Credential, pki, **kwargs) -> Credential:
    key = pki.keys.take()
    kwargs.setdefault("lifetime", dt.timedelta(hours=1))
    cert = proxy_certificate(issuer, key.public_key(), **kwargs)
    return Credential(cert, key, issuer.certificates)


def test_user_certificate_and_proxies_give_the_end_entity_identity(grid_pki):
    trust = grid_pki.trust()
    alice = grid_pki.alice
    caller = trust.validate(alice.credential.certificates)
    assert (caller.dn, caller.is_proxy, caller.limited) == (alice.dn, False, False)
    assert caller.issuer == "/O=Grid/OU=vmgrid/CN=vmgrid Test CA"
    deeper = make_proxy(alice.proxy, hours=1, key=grid_pki.keys.take())
    caller = trust.validate(deeper.certificates)
    assert caller.dn == alice.dn and caller.subject == deeper.subject and caller.is_proxy
    assert caller.chain[0] == deeper.certificate and len(caller.chain) == 3
    assert caller.not_after == deeper.certificate.not_valid_after_utc


def test_limited_proxy_is_reported(grid_pki):
    limited = make_proxy(grid_pki.alice.credential, limited=True, key=grid_pki.keys.take())
    assert grid_pki.trust().validate(limited.certificates).limited


def test_untrusted_ca_is_refused(grid_pki):
    with pytest.raises(UntrustedChain, match="not issued by a trusted CA"):
        grid_pki.trust().validate(grid_pki.stranger.proxy.certificates)


def test_revoked_certificate_and_its_proxies_are_refused(grid_pki):
    trust = grid_pki.trust()
    with pytest.raises(RevokedCertificate):
        trust.validate(grid_pki.revoked.credential.certificates)
    with pytest.raises(RevokedCertificate):
        trust.validate(grid_pki.revoked.proxy.certificates)


def test_revocation_is_seen_by_a_running_trust_store(tmp_path, grid_pki):
    ca = GridCA.create(tmp_path / "ca", key=grid_pki.keys.take())
    user = ca.issue_user("frank", key=grid_pki.keys.take())
    trust = TrustStore(ca.cert_dir, recheck_seconds=0)
    assert trust.validate(user.certificates).dn == user.subject        # now cached
    ca.revoke(user.certificate)
    with pytest.raises(RevokedCertificate):
        trust.validate(user.certificates)


def test_expired_crl_fails_closed(tmp_path, grid_pki):
    ca = GridCA.create(tmp_path / "ca", key=grid_pki.keys.take())
    user = ca.issue_user("gina", key=grid_pki.keys.take())
    trust = TrustStore(ca.cert_dir)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=40)
    with pytest.raises(ExpiredCertificate, match="CRL"):
        trust.validate(user.certificates, at=later)


def test_expired_proxy_is_refused(grid_pki):
    old = _fake(grid_pki.alice.credential, grid_pki, lifetime=dt.timedelta(minutes=1),
                not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2))
    # lifetime counts from now, so move the verification time instead
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10)
    with pytest.raises(ExpiredCertificate, match="proxy"):
        grid_pki.trust().validate(old.certificates, at=later)


def test_proxy_signed_by_another_users_key_is_refused(grid_pki):
    alice, bob = grid_pki.alice.credential, grid_pki.bob.credential
    impostor = Credential(alice.certificate, bob.private_key, ())       # alice's name, bob's key
    forged = _fake(impostor, grid_pki)
    with pytest.raises(InvalidProxy, match="not signed by the key"):
        grid_pki.trust().validate(forged.certificates)


def test_independent_proxy_is_refused(grid_pki):
    proxy = _fake(grid_pki.alice.credential, grid_pki, policy_language=OID_INDEPENDENT)
    with pytest.raises(InvalidProxy, match="independent"):
        grid_pki.trust().validate(proxy.certificates)


def test_non_critical_proxy_cert_info_is_refused(grid_pki):
    proxy = _fake(grid_pki.alice.credential, grid_pki, critical=False)
    with pytest.raises(InvalidProxy, match="critical"):
        grid_pki.trust().validate(proxy.certificates)


def test_proxy_subject_must_extend_its_issuer(grid_pki):
    # issued (and signed) by alice, but named under bob
    proxy = proxy_certificate(grid_pki.alice.credential, grid_pki.keys.take().public_key(),
                              lifetime=dt.timedelta(hours=1))
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    bad_subject = x509.Name(list(grid_pki.bob.credential.certificate.subject.rdns) +
                            [x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "1")])])
    key = grid_pki.keys.take()
    cert = (x509.CertificateBuilder().subject_name(bad_subject).issuer_name(proxy.issuer)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(proxy.not_valid_before_utc).not_valid_after(proxy.not_valid_after_utc)
            .add_extension(proxy.extensions.get_extension_for_oid(
                x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14")).value, critical=True)
            .sign(grid_pki.alice.credential.private_key, hashes.SHA256()))
    with pytest.raises(InvalidProxy, match="plus one CN"):
        grid_pki.trust().validate([cert, grid_pki.alice.credential.certificate])


def test_proxy_path_length_is_enforced(grid_pki):
    first = make_proxy(grid_pki.alice.credential, path_length=0, key=grid_pki.keys.take())
    assert grid_pki.trust().validate(first.certificates).is_proxy
    second = make_proxy(first, key=grid_pki.keys.take())
    with pytest.raises(InvalidProxy, match="path length"):
        grid_pki.trust().validate(second.certificates)


def test_limited_proxy_cannot_sign_a_full_proxy(grid_pki):
    limited = make_proxy(grid_pki.alice.credential, limited=True, key=grid_pki.keys.take())
    full = _fake(limited, grid_pki, policy_language=OID_INHERIT_ALL)
    with pytest.raises(InvalidProxy, match="limited proxy cannot sign"):
        grid_pki.trust().validate(full.certificates)
    ok = _fake(limited, grid_pki, policy_language=OID_LIMITED)
    assert grid_pki.trust().validate(ok.certificates).limited


def test_missing_proxy_issuer_and_ca_as_identity_are_refused(grid_pki):
    with pytest.raises(InvalidProxy, match="was not presented"):
        grid_pki.trust().validate([grid_pki.alice.proxy.certificate])
    with pytest.raises(UntrustedChain):
        grid_pki.trust().validate([grid_pki.ca.certificate])
    with pytest.raises(UntrustedChain):
        grid_pki.trust().validate([])


def test_validated_chains_are_cached_per_directory_generation(grid_pki):
    trust = grid_pki.trust()
    chain = grid_pki.bob.proxy.certificates
    first = trust.validate(chain, cache_key=b"k")
    assert trust.lookup(b"k") is first
    trust.reload()
    assert trust.lookup(b"k") is None


def test_a_crl_rewritten_in_place_is_seen_by_a_running_trust_store(tmp_path, grid_pki):
    """`cp new.r0 HASH.r0` over the published CRL writes the same file in place: the directory's own time does
    not change, and the revocation must still take effect without a restart."""
    import shutil
    ca = GridCA.create(tmp_path / "ca", key=grid_pki.keys.take())
    user = ca.issue_user("hank", key=grid_pki.keys.take())
    trusted = tmp_path / "trusted"
    shutil.copytree(ca.cert_dir, trusted)
    trust = TrustStore(trusted, recheck_seconds=0)
    assert trust.validate(user.certificates).dn == user.subject        # now cached
    ca.revoke(user.certificate)
    crls = [p for p in ca.cert_dir.iterdir() if p.suffix == ".r0"]
    assert crls
    for crl in crls:
        with open(trusted / crl.name, "r+b") as out:                   # same inode, same directory entry
            out.write(crl.read_bytes())
            out.truncate()
    with pytest.raises(RevokedCertificate):
        trust.validate(user.certificates)


def test_a_chain_longer_than_the_bound_is_refused_before_any_signature_is_checked(grid_pki):
    """The chain is validated before the message's signature: an unauthenticated client chooses it. A PKIPath of
    200 proxies cost a second of CPU per message (900: 26 s), the proxy walk comparing names pairwise. Fails
    without the bound: the deep chain of alice's own proxies was accepted."""
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    assert grid_pki.trust().validate(proxies_of(grid_pki.alice.credential, 15, key).certificates).dn == \
        grid_pki.alice.dn
    with pytest.raises(UntrustedChain, match="holds 17 certificates; at most 16"):
        grid_pki.trust().validate(proxies_of(grid_pki.alice.credential, 16, key).certificates)
    with pytest.raises(UntrustedChain, match="holds 201 certificates"):
        grid_pki.trust().validate(proxies_of(grid_pki.alice.credential, 200, key).certificates)


@pytest.mark.parametrize("bits,exponent,words", [
    (16384, 65537, "16384 bits"), (2048, (1 << 63) + 1, "64-bit exponent")], ids=["rsa-16384", "exponent-2^63+1"])
def test_a_proxy_key_too_costly_to_verify_with_is_refused(bits, exponent, words, grid_pki):
    """An RSA-16384 key with a 64-bit exponent costs 11 ms a verification (RSA-2048: 0.07 ms), and proxies are
    checked before the end entity is: refused by its size. The modulus need not be a real key's (nobody signs
    with it here). Fails without the check: the proxy was accepted."""
    import secrets

    from cryptography.hazmat.primitives.asymmetric import rsa
    n = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    costly = rsa.RSAPublicNumbers(exponent, n).public_key()
    cert = proxy_certificate(grid_pki.alice.credential, costly, lifetime=dt.timedelta(hours=1))
    with pytest.raises(UntrustedChain, match=words):
        grid_pki.trust().validate([cert, grid_pki.alice.credential.certificate])
