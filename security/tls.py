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

