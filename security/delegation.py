"""RFC 3820 delegation to a service, the way GT4's delegation service did it: the client signs a short-lived
proxy certificate for the *service's own public key* (read from the service's host certificate), so no
private key ever travels; the service pairs the proxy with its host key and acts as the user.

    pem = delegate(user_credential, node_certificate, lifetime=timedelta(minutes=30))   # client side
    credential = accept(pem, host_credential, trust, expected_dn=caller.dn)            # service side

A proxy of a limited proxy is limited (the policy refuses limited proxies for ``vm.deploy`` and
``vm.migrate``), and the delegated proxy never outlives the credential it was made from.
"""
from __future__ import annotations

import datetime as _dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .pki import OID_INHERIT_ALL, OID_LIMITED, Credential, proxy_certificate
from .trust import ChainError, TrustStore

DEFAULT_LIFETIME = _dt.timedelta(minutes=30)
MAX_LIFETIME = _dt.timedelta(hours=12)      # a service refuses a longer-lived delegation
MAX_PEM = 64 * 1024                          # a chain of a few certificates is far smaller


class DelegationError(Exception):
    """The delegated credential cannot be used; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def delegate(issuer: Credential, service_certificate: x509.Certificate, *,
             lifetime: _dt.timedelta = DEFAULT_LIFETIME, limited: bool = False) -> bytes:
    """A proxy of ``issuer`` for the public key of ``service_certificate``, with ``issuer``'s chain, as PEM.
    ``limited``: a limited proxy (RFC 3820 policy id-ppl-limited, Globus' `grid-proxy-init -limited`), which moves
    data and starts nothing (no job, no deployment, no migration) whoever holds the service's key; a proxy of a
    limited issuer is limited anyway."""
    language = OID_LIMITED if issuer.limited or limited else OID_INHERIT_ALL
    cert = proxy_certificate(issuer, service_certificate.public_key(), lifetime=lifetime, policy_language=language)
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *issuer.certificates))


def accept(pem: bytes, host: Credential, trust: TrustStore, *, expected_dn: str | None = None,
           max_lifetime: _dt.timedelta = MAX_LIFETIME) -> Credential:
    """The credential a client delegated to this service: its proxy (issued for ``host``'s key) with ``host``'s
    private key. Raises DelegationError unless the chain validates, the proxy is for this service's key, its
    identity is ``expected_dn`` (the caller's) and it lives no longer than ``max_lifetime``."""
    if not pem or len(pem) > MAX_PEM:
        raise DelegationError("no delegated proxy, or one far too large")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise DelegationError("the delegated proxy is not a PEM certificate chain") from None
    leaf = certs[0]
    if leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            host.certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo):
        raise DelegationError("the delegated proxy is not issued for this node's key")
    credential = Credential(leaf, host.private_key, tuple(certs[1:]))
    try:
        caller = trust.validate(credential.certificates)
    except ChainError as exc:
        raise DelegationError(f"the delegated proxy is not acceptable: {exc.reason}") from None
    if not caller.is_proxy:
        raise DelegationError("the delegated certificate is not a proxy certificate")
    if expected_dn is not None and caller.dn != expected_dn:
        raise DelegationError(f"the delegated proxy is of {caller.dn}, not of the caller {expected_dn}")
    if leaf.not_valid_after_utc - leaf.not_valid_before_utc > max_lifetime + _dt.timedelta(minutes=10):
        raise DelegationError(f"the delegated proxy lives longer than {max_lifetime}; delegate a short-lived one")
    return credential
