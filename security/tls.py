"""TLS with grid credentials: a cheroot SSL adapter from a host credential, and HTTP sessions that check servers
against the trusted CA directory.

Stable API:

    server.ssl_adapter = server_ssl_adapter(host_credential)          # cheroot.wsgi.Server(...)
    session = grid_session(cert_dir)                                  # requests.Session verifying against X509_CERT_DIR
    ctx = client_ssl_context(cert_dir)                                # ssl.SSLContext for other clients
"""
from __future__ import annotations

import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cheroot.ssl.builtin import BuiltinSSLAdapter

from .pki import Credential, write_private

if TYPE_CHECKING:
    import requests

# Cap on a request body cheroot accepts at all (the WS-Security middleware refuses far smaller messages itself).
MAX_REQUEST_BODY = 64 * 1024 * 1024

# What OpenSSL takes of a peer's chain in a handshake, before TrustStore sees it (security.trust.MAX_CHAIN):
# a verify depth of MAX_CHAIN untrusted certificates above the peer's own (so a chain TrustStore accepts, at most
# MAX_CHAIN certificates, passes; a longer one is refused as "certificate chain too long" before its signatures are
# checked), and a Certificate message of at most MAX_CERT_LIST bytes (16 certificates with RSA-8192 keys and their
# extensions are about 40 KB; OpenSSL's default is 100 KB)
MAX_CERT_LIST = 64 * 1024


def _verify_depth() -> int:
    from .trust import MAX_CHAIN
    return MAX_CHAIN - 1


def bound_peer_chain(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Bound what OpenSSL processes of the peer's certificate chain in ``ctx``'s handshakes (see MAX_CERT_LIST).
    Python's ssl module has no call for either setting: they are set with the OpenSSL library the ssl module is
    linked with (ctypes, on the SSL_CTX the context wraps: CPython's PySSLContext holds it first). The pointer is
    checked against the context's verify mode first; a mismatch leaves the context as it is (TrustStore still
    bounds the chain after the handshake) and says so in the log."""
    import ctypes
    import logging

    try:
        lib = _libssl()
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        expected = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}[ctx.verify_mode]
        if not ptr or lib.SSL_CTX_get_verify_mode(ptr) != expected:
            raise RuntimeError("the SSL_CTX of the context was not found")
        lib.SSL_CTX_set_verify_depth(ptr, _verify_depth())
        lib.SSL_CTX_ctrl(ptr, 51, MAX_CERT_LIST, None)           # SSL_CTRL_SET_MAX_CERT_LIST
    except Exception as exc:  # noqa: BLE001 - the bound is defence in depth; TrustStore bounds the chain anyway
        logging.getLogger(__name__).warning("cannot bound the TLS peer chain in OpenSSL: %s", exc)
    return ctx


_LIBSSL = None


def _libssl():
    global _LIBSSL
    if _LIBSSL is None:
        import ctypes
        lib = ctypes.CDLL(ssl._ssl.__file__)     # dlsym on it finds the libssl the ssl module links
        lib.SSL_CTX_get_verify_mode.argtypes, lib.SSL_CTX_get_verify_mode.restype = [ctypes.c_void_p], ctypes.c_int
        lib.SSL_CTX_set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.SSL_CTX_set_verify_depth.restype = None
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        _LIBSSL = lib
    return _LIBSSL


def server_ssl_adapter(credential: Credential, *, cert_dir: Path | str | None = None,
                       client_certs: str = "none") -> BuiltinSSLAdapter:
    """A cheroot SSL adapter serving `credential` (host certificate and chain). client_certs: "none", "optional" or
    "required" (checked against `cert_dir`, user certificates and RFC 3820 proxies alike; message-level
    signatures remain the grid's authentication)."""
    if client_certs not in ("none", "optional", "required"):
        raise ValueError(f"client_certs is {client_certs!r}: none, optional or required")
    if credential.cert_path is not None and credential.key_path is not None and credential.cert_path.exists():
        adapter = BuiltinSSLAdapter(str(credential.cert_path), str(credential.key_path))
    else:
        with tempfile.TemporaryDirectory(prefix="vmgrid-tls-") as tmp:
            cert = Path(tmp) / "hostcert.pem"
            key = Path(tmp) / "hostkey.pem"
            cert.write_bytes(credential.cert_pem())
            write_private(key, credential.key_pem())
            adapter = BuiltinSSLAdapter(str(cert), str(key))
    ctx = adapter.context
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_certs != "none":
        if cert_dir is None:
            raise ValueError("client certificates need the trusted CA directory (cert_dir)")
        ctx.load_verify_locations(capath=str(cert_dir))
        ctx.verify_mode = ssl.CERT_REQUIRED if client_certs == "required" else ssl.CERT_OPTIONAL
        # GT4 transport security: a user's RFC 3820 proxy is a valid client certificate
        ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
        bound_peer_chain(ctx)
    return adapter


def client_ssl_context(cert_dir: Path | str, credential: Credential | None = None) -> ssl.SSLContext:
    """A client context that trusts exactly the CAs of `cert_dir` (OpenSSL capath: `<hash>.0` files) and checks the
    server's host name. With a credential that has files on disk, it also presents it as a TLS client certificate
    (as grid_session does)."""
    cert_dir = Path(cert_dir)
    if not cert_dir.is_dir():
        raise FileNotFoundError(f"trusted CA directory {cert_dir} does not exist")
    ctx = ssl.create_default_context(capath=str(cert_dir))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if credential is not None and credential.cert_path is not None and credential.key_path is not None:
        ctx.load_cert_chain(str(credential.cert_path), str(credential.key_path))
    return ctx


def grid_session(cert_dir: Path | str, credential: Credential | None = None) -> requests.Session:
    """A requests.Session (for zeep's Transport or plain calls) whose TLS checks the server's certificate and host
    name against the trusted CA directory, never the system store. With a credential that has files on disk, it also
    presents it as a TLS client certificate."""
    cert_dir = Path(cert_dir)
    if not cert_dir.is_dir():
        raise FileNotFoundError(f"trusted CA directory {cert_dir} does not exist")
    import requests      # here, not at the top: a container's start (a server) never needs it (0.3 s of CPU)

    session = requests.Session()
    session.verify = str(cert_dir)
    session.trust_env = False      # no proxies or REQUESTS_CA_BUNDLE from the environment
    if credential is not None and credential.cert_path is not None and credential.key_path is not None:
        session.cert = (str(credential.cert_path), str(credential.key_path))
    return session

