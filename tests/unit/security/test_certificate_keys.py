"""The verifier's per-certificate public key and key digest (`wssec._certificate_key`), cached by the certificate
object's identity: each certificate gets its own key, a new object of the same certificate is looked up afresh, and
the cache never hands a key to an object it was not computed from."""
from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from security import wssec


def _spki_digest(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_key().public_bytes(serialization.Encoding.DER,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


def test_each_certificate_object_gets_its_own_key(grid_pki):
    certs = [grid_pki.host.certificate, grid_pki.alice.proxy.certificate, grid_pki.bob.proxy.certificate]
    for cert in certs * 2:
        assert wssec._public_key(cert).public_numbers() == cert.public_key().public_numbers()
        assert wssec._key_digest(cert) == _spki_digest(cert)
    assert len({wssec._key_digest(c) for c in certs}) == 3


def test_an_entry_is_only_used_for_the_object_it_was_made_from(grid_pki):
    cert = grid_pki.host.certificate
    wssec._public_key(cert)
    other = grid_pki.bob.proxy.certificate
    # an entry filed under another object's id (as a recycled id would find it) is not taken for that object
    wssec._certificate_keys[id(other)] = (cert, wssec._public_key(cert), wssec._key_digest(cert))
    assert wssec._key_digest(other) == _spki_digest(other)
    assert wssec._certificate_keys[id(other)][0] is other
