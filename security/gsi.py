"""The GSI GSSAPI mechanism of the Globus Toolkit: a security context whose tokens are the records of
a TLS handshake (with X.509 proxy certificates), followed by a delegation flag and, when asked, a
proxy delegated inside the context. Wrapped messages are TLS records of the same session.

The TLS is OpenSSL's, through pyOpenSSL with memory BIOs (no socket: the caller carries the tokens,
base64 in FTP ``ADAT``/``ENC``, raw on a data connection). OpenSSL's own chain check is bypassed on
purpose (it refuses legacy Globus proxies and knows no signing policies): every chain the peer
presents is validated by :class:`security.trust.TrustStore` before the context is complete, and
the TLS handshake proves the peer holds the leaf's key.

Stable API:

    ctx = GSIContext(credential, trust, initiate=True, delegate=True, expect="/O=Grid/.../CN=host/x",
                     authorize=lambda peer: None)   # or the reason the peer is not the server meant
    token = ctx.step(None)                  # first token of the initiator; then step(peer_token) until ctx.complete
    ctx.peer (a security.trust.Caller), ctx.delegated (a Credential the initiator delegated, acceptor side)
    ctx.wrap(data) -> token ; ctx.unwrap(token) -> data
"""
from __future__ import annotations

import datetime as _dt
import threading
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from .pki import OID_INHERIT_ALL, OID_LIMITED, Credential, new_key, proxy_certificate
from .trust import MAX_CHAIN, Caller, ChainError, TrustStore

# the delegated proxy: as long as the initiator's own credential allows, at most this long
DELEGATED_LIFETIME = _dt.timedelta(hours=12)
MAX_TOKEN = 1 << 20          # no handshake or delegation token is anywhere near this
# what an initiator delegates (``delegate=``): a limited proxy (Globus' globus_ftp_control asks for one,
# GSS_C_GLOBUS_LIMITED_DELEG_PROXY_FLAG: enough for a GridFTP server to act for the user on its own files and data
# channels, never to start a job or change a policy as the user), or, asked for by name, a full (inherit-all) one
DELEGATE_LIMITED = "limited"
DELEGATE_FULL = "full"


class GSIError(Exception):
    """The security context failed; ``reason`` says why in words a grid user understands."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


X509_V_ERR_CERT_CHAIN_TOO_LONG = 22


def _accept_any(conn, cert, errno, depth, ok) -> bool:
    """OpenSSL's verdict is replaced by TrustStore's, which runs on the whole chain afterwards; except a chain
    longer than the verify depth (TrustStore's own bound), refused in the handshake before its signatures are
    checked."""
    return errno != X509_V_ERR_CERT_CHAIN_TOO_LONG


def ssl_context(credential: Credential | None, *, server_side: bool) -> SSL.Context:
    """A pyOpenSSL context presenting ``credential`` (leaf, key and chain) and asking for the peer's."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    # Globus' GSI contexts negotiate TLS 1.2 with every toolkit release in use; TLS 1.3 changes who
    # speaks last in the handshake, which the delegation exchange that follows depends on
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if server_side else 0)
    ctx.set_verify(mode, _accept_any)
    ctx.set_verify_depth(MAX_CHAIN - 1)     # see security.tls.MAX_CERT_LIST (pyOpenSSL has no max cert list call)
    if credential is not None:
        ctx.use_certificate(credential.certificate)
        ctx.use_privatekey(credential.private_key)
        for cert in credential.chain:
            ctx.add_extra_chain_cert(cert)
        ctx.check_privatekey()
    return ctx


class GSIContext:
    """One GSSAPI security context of the GSI mechanism, initiator or acceptor.

    ``expect``: the end-entity DN the peer must have (mutual authentication; None: any trusted
    peer). ``authorize(peer) -> str | None``: a further rule on the authenticated peer (a
    security.trust.Caller), e.g. a host certificate naming the URL's host; a reason it returns
    fails the context. Both are checked as soon as the peer's chain is validated, before the
    initiator sends its delegation flag: a peer that is not the one meant never gets a proxy.
    ``delegate`` (initiator): send a proxy of ``credential`` to the acceptor inside the context:
    False, True or DELEGATE_LIMITED (a limited proxy), DELEGATE_FULL (an inherit-all proxy, a
    limited one when ``credential`` is itself limited). ``accept_limited``: refuse a peer whose
    chain holds a limited proxy when False.
    """

    def __init__(self, credential: Credential | None, trust: TrustStore, *, initiate: bool,
                 delegate: bool | str = False, expect: str | None = None, accept_limited: bool = True,
                 tls_context: SSL.Context | None = None,
                 authorize: Callable[[Caller], str | None] | None = None):
        if initiate and credential is None:
            raise GSIError("an initiator needs a credential (GSI authenticates both sides)")
        if delegate not in (False, True, DELEGATE_LIMITED, DELEGATE_FULL):
            raise ValueError(f"delegate is False, True, {DELEGATE_LIMITED!r} or {DELEGATE_FULL!r}, not {delegate!r}")
        self.credential = credential
        self.trust = trust
        self.initiate = initiate
        self.delegate = (DELEGATE_LIMITED if delegate is True else delegate) if initiate else False
        self.authorize = authorize
        self.expect = expect
        self.accept_limited = accept_limited
        self.conn = SSL.Connection(tls_context or ssl_context(credential, server_side=not initiate), None)
        if initiate:
            self.conn.set_connect_state()
        else:
            self.conn.set_accept_state()
        self.state = "handshake"
        self.peer = None
        self.delegated: Credential | None = None
        self._request_key = None
        self._lock = threading.Lock()

    @property
    def complete(self) -> bool:
        return self.state == "done"

    # -- establishment ----------------------------------------------------------------------------
    def step(self, token: bytes | None) -> bytes:
        """Consume the peer's token (None for the initiator's first call); return the token to send
        (possibly empty). Raises GSIError when the context cannot be established."""
        try:
            return self._step(token or b"")
        except GSIError:
            self.state = "failed"
            raise
        except (SSL.Error, ValueError) as exc:
            self.state = "failed"
            raise GSIError(f"GSI handshake failed: {_ssl_reason(exc)}") from None

    def _step(self, token: bytes) -> bytes:
        if self.state in ("done", "failed"):
            raise GSIError("the security context is already " + ("established" if self.complete else "failed"))
        if len(token) > MAX_TOKEN:
            raise GSIError("security token too large")
        if token:
            self.conn.bio_write(token)
        if self.state == "handshake":
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                return self._drain()
            self._authenticate_peer()
            out = self._drain()
            if self.initiate:
                if out:                      # our last handshake flight first; the flag follows the answer
                    self.state = "flags"
                    return out
                return out + self._send_flag(token_received=bool(token))
            if not out:
                # keep the exchange going: the initiator speaks next only after hearing from us
                self.conn.write(b"\0")
                out = self._drain()
            self.state = "flags"
            return out
        if self.initiate:
            if self.state == "flags":
                return self._send_flag(token_received=bool(token))
            if self.state == "request":
                return self._sign_request()
        else:
            if self.state == "flags":
                return self._read_flag()
            if self.state == "certificate":
                return self._receive_delegated()
        raise GSIError(f"unexpected security token in state {self.state}")

    def _drain(self) -> bytes:
        out = bytearray()
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def _read_app(self) -> bytes:
        data = bytearray()
        while True:
            try:
                chunk = self.conn.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                break
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_TOKEN:
                raise GSIError("security token too large")
        return bytes(data)

    def _send_flag(self, token_received: bool) -> bytes:
        if token_received:
            self._read_app()                 # the acceptor's keep-alive byte, if any: ignored
        if self.delegate:
            self.conn.write(b"D")
            self.state = "request"
        else:
            self.conn.write(b"0")
            self.state = "done"
        return self._drain()

    def _read_flag(self) -> bytes:
        data = self._read_app()
        if not data:
            return self._drain()             # an empty fragment: wait for the flag
        if data[:1] == b"0":
            self.state = "done"
            return self._drain()
        if data[:1] != b"D":
            raise GSIError("the peer sent an unknown delegation flag")
        # delegation: a fresh key, and a certificate request for its public half
        peer_key = self.peer.certificate.public_key()
        bits = getattr(peer_key, "key_size", 2048)
        self._request_key = new_key(max(2048, min(bits, 4096)))
        request = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proxy")]))
                   .sign(self._request_key, hashes.SHA256()))
        self.conn.write(request.public_bytes(serialization.Encoding.DER))
        self.state = "certificate"
        return self._drain()

    def _receive_delegated(self) -> bytes:
        data = self._read_app()
        certs = _der_certificates(data)
        if not certs:
            raise GSIError("no delegated certificate received")
        proxy = certs[0]
        if proxy.public_key().public_numbers() != self._request_key.public_key().public_numbers():
            raise GSIError("the delegated certificate is not for the key this side asked for")
        chain = tuple(certs[1:]) or self.peer.chain
        delegated = Credential(proxy, self._request_key, tuple(chain))
        try:
            caller = self.trust.validate(delegated.certificates)
        except ChainError as exc:
            raise GSIError(f"the delegated proxy is not acceptable: {exc.reason}") from None
        if caller.dn != self.peer.dn:
            raise GSIError("the delegated proxy names another identity than the peer")
        self.delegated = delegated
        self.state = "done"
        return self._drain()

    def _sign_request(self) -> bytes:
        data = self._read_app()
        if not data:
            return self._drain()
        try:
            request = x509.load_der_x509_csr(data)
        except ValueError:
            raise GSIError("the peer's delegation request is not a certificate request") from None
        if not request.is_signature_valid:
            raise GSIError("the peer's delegation request is not signed by its key")
        issuer = self.credential
        lifetime = min(DELEGATED_LIFETIME, issuer.not_after - _dt.datetime.now(_dt.timezone.utc))
        if lifetime <= _dt.timedelta(0):
            raise GSIError("the credential to delegate has expired")
        full = self.delegate == DELEGATE_FULL and not issuer.limited
        language = OID_INHERIT_ALL if full else OID_LIMITED
        cert = proxy_certificate(issuer, request.public_key(), lifetime=lifetime, policy_language=language)
        self.conn.write(cert.public_bytes(serialization.Encoding.DER))
        self.state = "done"
        return self._drain()

    def _authenticate_peer(self) -> None:
        leaf = self.conn.get_peer_certificate()
        if leaf is None:
            raise GSIError("the peer presented no certificate")
        presented = [c.to_cryptography() for c in (self.conn.get_peer_cert_chain() or [])]
        leaf_c = leaf.to_cryptography()
        chain = [leaf_c] + [c for c in presented if c != leaf_c]
        try:
            caller = self.trust.validate(chain)
        except ChainError as exc:
            raise GSIError(exc.reason) from None
        if caller.limited and not self.accept_limited:
            raise GSIError(f"{caller.dn} presented a limited proxy, which is refused here")
        if self.expect is not None and caller.dn != self.expect:
            raise GSIError(f"the peer is {caller.dn}, expected {self.expect}")
        if self.authorize is not None:
            why = self.authorize(caller)
            if why is not None:
                raise GSIError(why)
        self.peer = caller

    # -- protection ---------------------------------------------------------------------------------
    def wrap(self, data: bytes) -> bytes:
        """Protect a message (GSS_Wrap): TLS records of the context's session."""
        if not self.complete:
            raise GSIError("the security context is not established")
        with self._lock:
            if data:
                self.conn.sendall(data)
            return self._drain()

    def unwrap(self, token: bytes) -> bytes:
        """Check and decrypt a message the peer wrapped (GSS_Unwrap)."""
        if not self.complete:
            raise GSIError("the security context is not established")
        with self._lock:
            try:
                self.conn.bio_write(token)
                return self._read_app()
            except SSL.Error as exc:
                raise GSIError(f"a protected message does not verify: {_ssl_reason(exc)}") from None


def _der_certificates(data: bytes) -> list[x509.Certificate]:
    """Certificates written back to back in DER, as Globus sends a delegated proxy."""
    out = []
    pos = 0
    while pos < len(data):
        if data[pos] != 0x30 or pos + 2 > len(data):
            raise GSIError("malformed delegated certificate")
        first = data[pos + 1]
        if first < 0x80:
            length, head = first, 2
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or pos + 2 + n > len(data):
                raise GSIError("malformed delegated certificate")
            length, head = int.from_bytes(data[pos + 2:pos + 2 + n], "big"), 2 + n
        end = pos + head + length
        if end > len(data):
            raise GSIError("truncated delegated certificate")
        try:
            out.append(x509.load_der_x509_certificate(data[pos:end]))
        except ValueError:
            raise GSIError("malformed delegated certificate") from None
        pos = end
    return out


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        parts = [str(e[2]) for e in exc.args[0] if len(e) >= 3]
        if parts:
            return "; ".join(parts)
    return str(exc) or type(exc).__name__

