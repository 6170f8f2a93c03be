"""TLS for control and data channels (RFC 4217): contexts from grid credentials, identity checks.

The identity of a peer is the distinguished name of its end-entity certificate, in the
OpenSSL/Globus slash form (``/O=Grid/OU=Example/CN=Jane Doe``); a peer presenting an
RFC 3820 proxy certificate is identified by the end-entity certificate that signed the proxy
chain. Chain validation is OpenSSL's, with proxy certificates allowed.
"""
from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .errors import AuthenticationError

PROXY_CERT_INFO_OIDS = ("1.3.6.1.5.5.7.1.14", "1.3.6.1.4.1.3536.1.222")   # RFC 3820, pre-RFC GT3 proxies

_ATTR_NAMES = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID", "1.2.840.113549.1.9.1": "emailAddress",
}


def slash_dn(name: x509.Name) -> str:
    """``/O=Grid/OU=Example/CN=Jane Doe``: the DN form of grid-mapfiles and Globus tools."""
    parts = []
    for rdn in name.rdns:
        for attr in rdn:
            key = _ATTR_NAMES.get(attr.oid.dotted_string, attr.oid.dotted_string)
            parts.append(f"/{key}={attr.value}")
    return "".join(parts)


def is_proxy(cert: x509.Certificate) -> bool:
    return any(ext.oid.dotted_string in PROXY_CERT_INFO_OIDS for ext in cert.extensions)


def end_entity_dn(chain: list[x509.Certificate]) -> str:
    """The DN of the first certificate in a leaf-first chain that is not a proxy certificate."""
    for cert in chain:
        if not is_proxy(cert):
            return slash_dn(cert.subject)
    raise AuthenticationError("certificate chain holds only proxy certificates")


def verified_chain(sock: ssl.SSLSocket) -> list[x509.Certificate]:
    """The peer's chain as OpenSSL verified it, leaf first (Python 3.11 keeps the accessor private)."""
    getter = getattr(sock, "get_verified_chain", None) or getattr(sock._sslobj, "get_verified_chain", None)
    if getter is None:
        raise AuthenticationError("this Python cannot read the verified peer chain")
    chain = getter() or []
    certs = []
    for c in chain:
        der = c.public_bytes(ssl._ssl.ENCODING_DER) if hasattr(c, "public_bytes") else c
        certs.append(x509.load_der_x509_certificate(der))
    if not certs:
        raise AuthenticationError("peer presented no certificate")
    return certs


def default_identify(sock: ssl.SSLSocket) -> str:
    """End-entity DN of an OpenSSL-verified peer chain."""
    return end_entity_dn(verified_chain(sock))


@dataclass
class Credential:
    """A grid credential in PEM files: certificate (and chain, e.g. a proxy's signers) and key.

    A proxy file from ``grid-proxy-init`` holds certificate, key and chain in one file: pass it
    as ``certfile`` with ``keyfile=None``.
    """

    certfile: str
    keyfile: str | None = None

    @classmethod
    def from_environment(cls) -> "Credential":
        """``X509_USER_PROXY``, else ``X509_USER_CERT``/``X509_USER_KEY``, else ``/tmp/x509up_u<uid>``."""
        proxy = os.environ.get("X509_USER_PROXY")
        if proxy:
            return cls(proxy)
        cert, key = os.environ.get("X509_USER_CERT"), os.environ.get("X509_USER_KEY")
        if cert and key:
            return cls(cert, key)
        default = f"/tmp/x509up_u{os.getuid()}"
        if os.path.exists(default):
            return cls(default)
        home = Path.home() / ".globus"
        if (home / "usercert.pem").exists():
            return cls(str(home / "usercert.pem"), str(home / "userkey.pem"))
        raise AuthenticationError("no grid credential: set X509_USER_PROXY or X509_USER_CERT/X509_USER_KEY")


def trust_dir_from_environment() -> str:
    """``X509_CERT_DIR``, else ``~/.globus/certificates``, else ``/etc/grid-security/certificates``."""
    for cand in (os.environ.get("X509_CERT_DIR"), str(Path.home() / ".globus/certificates"),
                 "/etc/grid-security/certificates"):
        if cand and os.path.isdir(cand):
            return cand
    raise AuthenticationError("no trusted CA directory: set X509_CERT_DIR")


def _load_trust(ctx: ssl.SSLContext, trust) -> None:
    """Trust anchors: a directory of hashed CA certificates (X509_CERT_DIR), a PEM file, or a list."""
    if trust is None:
        trust = trust_dir_from_environment()
    items = trust if isinstance(trust, (list, tuple)) else [trust]
    for item in items:
        path = os.fspath(getattr(item, "ca_dir", None) or getattr(item, "path", None) or item)
        if os.path.isdir(path):
            # load every CA file rather than relying on hash names (openssl rehash may not have run)
            loaded = False
            for name in sorted(os.listdir(path)):
                if name.endswith((".0", ".1", ".2", ".pem", ".crt")) and not name.endswith(".r0"):
                    try:
                        ctx.load_verify_locations(cafile=os.path.join(path, name))
                        loaded = True
                    except ssl.SSLError:
                        continue
            if not loaded:
                raise AuthenticationError(f"no CA certificate in {path}")
        else:
            ctx.load_verify_locations(cafile=path)


def _context(purpose: ssl.Purpose, credential: Credential | None, trust) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False          # peers are identified by DN (DCAU), not by host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS | ssl.VERIFY_X509_STRICT
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT         # Globus-style proxies are not RFC 5280 strict
    if hasattr(ssl, "VERIFY_X509_PARTIAL_CHAIN"):
        ctx.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN
    _load_trust(ctx, trust)
    if credential is not None:
        try:
            ctx.load_cert_chain(credential.certfile, credential.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise AuthenticationError(f"cannot load credential {credential.certfile}: {exc}") from exc
    return ctx


class TLSConfig:
    """Everything TLS for one side: contexts for both roles and how to name the peer.

    ``identify`` maps a handshaken socket to the peer's DN; the default reads OpenSSL's
    verified chain. A deployment can pass its own (e.g. one that also checks CRLs or a VO).
    """

    def __init__(self, credential: Credential | None, trust=None, *,
                 identify: Callable[[ssl.SSLSocket], str] | None = None):
        self.credential = credential
        self.trust = trust
        self.server_context = _context(ssl.Purpose.CLIENT_AUTH, credential, trust) if credential else None
        self.client_context = _context(ssl.Purpose.SERVER_AUTH, credential, trust)
        self._identify = identify or default_identify

    def identify(self, sock: ssl.SSLSocket) -> str:
        try:
            dn = self._identify(sock)
        except AuthenticationError:
            raise
        except Exception as exc:
            raise AuthenticationError(f"cannot establish the peer's identity: {exc}") from exc
        if not dn:
            raise AuthenticationError("peer has no identity")
        return dn


class DataTLS:
    """PROT P protection of one transfer's data connections, with the DCAU identity check.

    The active side of a data connection is the TLS client, the passive side the TLS server
    (GFD.20, Appendix I). ``expect`` is the DN the peer must prove (DCAU A: the session's user;
    DCAU S: the given subject); None accepts any peer whose chain verifies (DCAU N).
    """

    def __init__(self, tls: TLSConfig, expect: str | None):
        self.tls = tls
        self.expect = expect

    def wrap(self, sock: socket.socket, *, server_side: bool) -> socket.socket:
        ctx = self.tls.server_context if server_side else self.tls.client_context
        if ctx is None:
            raise AuthenticationError("no credential for the TLS server side of a data connection")
        try:
            wrapped = ctx.wrap_socket(sock, server_side=server_side, suppress_ragged_eofs=False)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise AuthenticationError(f"data channel authentication failed: {exc}") from exc
        dn = self.tls.identify(wrapped)
        if self.expect is not None and dn != self.expect:
            wrapped.close()
            raise AuthenticationError(f"data channel peer is {dn!r}, expected {self.expect!r}")
        return wrapped


def peer_dn_of(sock: ssl.SSLSocket, tls: TLSConfig) -> str:
    """The DN of the TLS peer of a control connection."""
    return tls.identify(sock)


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)
