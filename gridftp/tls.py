"""TLS for control and data channels (RFC 4217 AUTH TLS) with grid credentials from :mod:`security`.

A peer is identified by the end-entity DN of its certificate chain (``/O=Grid/OU=vmgrid/CN=Jane
Doe``); a user presenting an RFC 3820 proxy is identified by the user certificate that signed the
proxy. OpenSSL checks the chain during the handshake (proxy certificates allowed), then
:class:`security.trust.TrustStore` applies the grid's policy (CRLs, proxy rules) and names the DN.
"""
from __future__ import annotations

import os
import socket
import ssl
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from security.pki import Credential, default_cert_dir, dn_string, load_credential
from security.tls import bound_peer_chain
from security.trust import Caller, ChainError, TrustStore

from .errors import AuthenticationError

__all__ = ["Credential", "TLSConfig", "DataTLS", "TrustStore", "trust_store", "peer_chain", "load_credential"]


def trust_store(trust: TrustStore | str | os.PathLike | None) -> TrustStore:
    """A :class:`TrustStore` from a store, a CA directory, or None (``X509_CERT_DIR`` and the Globus defaults)."""
    if isinstance(trust, TrustStore):
        return trust
    path = Path(trust) if trust is not None else default_cert_dir()
    if not path.is_dir():
        raise AuthenticationError(f"trusted CA directory {path} does not exist (set X509_CERT_DIR)")
    return TrustStore(path)


def peer_chain(sock: ssl.SSLSocket) -> list[x509.Certificate]:
    """The certificates the peer presented, leaf first (Python 3.11 keeps the accessor private)."""
    sslobj = getattr(sock, "_sslobj", None)
    getter = getattr(sock, "get_unverified_chain", None) or getattr(sslobj, "get_unverified_chain", None)
    if getter is None:
        raise AuthenticationError("this Python cannot read the peer's certificate chain")
    return [x509.load_der_x509_certificate(c.public_bytes(ssl._ssl.ENCODING_DER)) for c in (getter() or [])]


def _context(server_side: bool, credential: Credential | None, trust: TrustStore) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False          # servers are checked by name in the client, peers by DN (DCAU)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    ctx.load_verify_locations(capath=str(trust.cert_dir))
    bound_peer_chain(ctx)               # OpenSSL stops a chain longer than TrustStore's bound in the handshake
    if server_side:
        # no TLS 1.3 session tickets: a data sender never reads, and unread tickets in its receive
        # buffer would turn its close into a reset that destroys the last blocks in flight
        ctx.num_tickets = 0
    if credential is not None:
        # ssl loads credentials from files only: write the chain and key to a private temporary directory
        with tempfile.TemporaryDirectory(prefix="vmgrid-gridftp-") as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(credential.cert_pem(with_chain=True))
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(credential.key_pem())
            try:
                ctx.load_cert_chain(str(cert), str(key))
            except ssl.SSLError as exc:
                raise AuthenticationError(f"cannot use the credential of {credential.subject}: {exc}") from exc
    return ctx


class TLSConfig:
    """One side's TLS set-up: its credential, the trusted CAs, contexts for both roles, and the
    identity check. ``identify(sock) -> dn`` may be injected (tests, other policies); by default it
    validates the presented chain with the :class:`TrustStore`."""

    def __init__(self, credential: Credential | None, trust: TrustStore | str | os.PathLike | None = None, *,
                 identify: Callable[[ssl.SSLSocket], str] | None = None):
        self.credential = credential
        self.trust = trust_store(trust)
        self.server_context = _context(True, credential, self.trust) if credential is not None else None
        self.client_context = _context(False, credential, self.trust)
        self._identify = identify

    @property
    def dn(self) -> str | None:
        """This side's own grid identity."""
        return self.credential.identity if self.credential is not None else None

    def authenticate(self, sock: ssl.SSLSocket) -> Caller:
        """The peer of a handshaken socket as TrustStore validates its presented chain (whatever ``identify``
        says): what a host check judges (security.hostauth)."""
        try:
            return self.trust.validate(peer_chain(sock))
        except ChainError as exc:
            raise AuthenticationError(exc.reason) from exc

    def identify(self, sock: ssl.SSLSocket) -> str:
        """The verified end-entity DN of the peer of a handshaken socket."""
        if self._identify is not None:
            try:
                dn = self._identify(sock)
            except AuthenticationError:
                raise
            except Exception as exc:
                raise AuthenticationError(f"cannot establish the peer's identity: {exc}") from exc
        else:
            chain = peer_chain(sock)
            try:
                dn = self.trust.validate(chain).dn
            except ChainError as exc:
                raise AuthenticationError(exc.reason) from exc
        if not dn:
            raise AuthenticationError("peer has no identity")
        return dn


class DataTLS:
    """PROT P protection of one transfer's data connections, with the DCAU identity check.

    ``expect``: the DN the peer must prove (DCAU A: the session's user or the server; DCAU S: the
    given subject; None: any trusted peer, DCAU N). ``tls_server``: which TLS role this side takes
    whatever the TCP direction; between a user and a server the server is always the TLS server
    (user certificates are client certificates). None: the side that accepted the TCP connection is
    the TLS server (server to server, DCAU S), as the active side initiates in GFD.20 Appendix I.
    """

    def __init__(self, tls: TLSConfig, expect: str | None, tls_server: bool | None = None, *,
                 ragged_eof: bool = False):
        self.tls = tls
        self.expect = expect
        self.tls_server = tls_server
        self.ragged_eof = ragged_eof     # a TCP close without close_notify ends the data (Globus peers)

    def wrap(self, sock: socket.socket, *, server_side: bool) -> socket.socket:
        as_server = server_side if self.tls_server is None else self.tls_server
        ctx = self.tls.server_context if as_server else self.tls.client_context
        if ctx is None:
            sock.close()
            raise AuthenticationError("no credential for the TLS server side of a data connection")
        idle = _kernel_timeout(sock)
        if idle:            # the handshake bounded too: Python's ssl retries a kernel timeout for ever, not its own
            sock.settimeout(idle)
        try:
            wrapped = ctx.wrap_socket(sock, server_side=as_server, suppress_ragged_eofs=self.ragged_eof)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise AuthenticationError(f"data channel authentication failed: {exc}") from exc
        try:
            dn = self.tls.identify(wrapped)
        except AuthenticationError:
            wrapped.close()
            raise
        if self.expect is not None and dn != self.expect:
            wrapped.close()
            raise AuthenticationError(f"data channel peer is {dn!r}, expected {self.expect!r}")
        return wrapped


def _kernel_timeout(sock: socket.socket) -> float | None:
    """The receive timeout the kernel holds for ``sock`` (datachannel.set_idle_timeout), in seconds; None if none."""
    try:
        sec, usec = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("ll")))
    except OSError:
        return None
    return (sec + usec / 1e6) or None


def subject_of(cert: x509.Certificate) -> str:
    return dn_string(cert.subject)
