"""Data channels of a GSI session, as Globus makes them (globus_ftp_control with the GSI XIO driver).

Every data connection of a session with ``DCAU A`` or ``DCAU S`` carries its own GSI security
context; the side that opened the TCP connection initiates it. With ``PROT C`` that context is the
GSI one (a TLS handshake, then the delegation flag: :class:`security.gsi.GSIContext` over the
socket) and the data then flows in clear on the same connection; with ``PROT S`` or ``P`` the
context is "SSL compatible", i.e. a plain TLS handshake, and the data travels as its TLS records.
A server uses the credential the client delegated, if any (so that ``DCAU A`` finds the user's
own identity on both ends, as globus-url-copy expects), else its host credential.
"""
from __future__ import annotations

import socket
import ssl

from security.gsi import GSIContext, GSIError
from security.pki import Credential
from security.trust import TrustStore

from .errors import AuthenticationError
from .tls import DataTLS, TLSConfig

MAX_RECORD = (1 << 14) + 2048          # a TLS record's body, with room for its MAC and padding


class _GlobusDataSocket(ssl.SSLSocket):
    """A TLS data connection as Globus ends one: the TCP close is the end of the data. A Globus peer
    sends no close_notify and waits for end of file before answering one, so a TLS shutdown that
    waits for the peer's would hang; the file's integrity is checked end to end (CKSM, sha256)."""

    def unwrap(self):
        self.shutdown(socket.SHUT_WR)
        return None


def tls_config(credential: Credential, trust: TrustStore) -> TLSConfig:
    """The TLS contexts of GSI data connections (PROT S/P) with ``credential``."""
    tls = TLSConfig(credential, trust)
    for ctx in (tls.server_context, tls.client_context):
        if ctx is not None:
            ctx.sslsocket_class = _GlobusDataSocket
    # The TCP connector is the TLS client, so a user's proxy can be the TLS *server* certificate,
    # which OpenSSL's purpose check refuses (a user certificate is for clients). The chain is
    # checked all the same: DataTLS validates it with the TrustStore after every handshake.
    tls.client_context.verify_mode = ssl.CERT_NONE
    return tls


def _read_record(sock: socket.socket) -> bytes:
    header = _read_exact(sock, 5)
    if header[0] not in (20, 21, 22, 23) or header[1] != 3:
        raise AuthenticationError("data channel authentication failed: the peer does not speak GSI")
    length = int.from_bytes(header[3:5], "big")
    if length > MAX_RECORD:
        raise AuthenticationError("data channel authentication failed: oversized security token")
    return header + _read_exact(sock, length)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise AuthenticationError("data channel authentication failed: connection closed during "
                                      "the security handshake")
        out += chunk
    return bytes(out)


class GSIData:
    """The :class:`~gridftp.datachannel.Protection` of one transfer in a GSI session.

    ``expect``: the end-entity DN the data peer must prove (DCAU A: the session's user for a
    server, oneself for a client; DCAU S: the subject given); ``private``: PROT S or P.
    """

    def __init__(self, credential: Credential, trust: TrustStore, expect: str | None, *, private: bool,
                 tls: TLSConfig | None = None):
        self.credential = credential
        self.trust = trust
        self.expect = expect
        self.private = private
        self._tls = tls

    def wrap(self, sock: socket.socket, *, server_side: bool) -> socket.socket:
        if self.private:
            if self._tls is None:
                self._tls = tls_config(self.credential, self.trust)
            # "SSL compatible": a TLS connection; the side that accepted the TCP connection serves
            return DataTLS(self._tls, self.expect, tls_server=None, ragged_eof=True).wrap(sock, server_side=server_side)
        context = GSIContext(self.credential, self.trust, initiate=not server_side)
        try:
            out = context.step(None) if not server_side else b""
            while True:
                if out:
                    sock.sendall(out)
                if context.complete:
                    break
                out = context.step(_read_record(sock))
        except GSIError as exc:
            sock.close()
            raise AuthenticationError(f"data channel authentication failed: {exc.reason}") from None
        except (AuthenticationError, OSError):
            sock.close()
            raise
        if self.expect is not None and context.peer.dn != self.expect:
            sock.close()
            raise AuthenticationError(f"data channel peer is {context.peer.dn!r}, expected {self.expect!r}")
        return sock
