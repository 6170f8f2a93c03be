"""GT4 transport security on the SOAP side (issue 15): a container asking for client certificates
(`[container] tls_client_certs`, security.tls.server_ssl_adapter) accepts a user's RFC 3820 proxy
as TLS client certificate, from curl and from Python (zeep through requests), and refuses a client
without one or with a certificate from an untrusted CA. Messages are signed as always."""
from __future__ import annotations

import shutil
import subprocess
import threading

import pytest
import requests
from cheroot import wsgi

from security.client import grid_client
from security.middleware import WSSecurityMiddleware
from security.pki import load_credential
from security.tls import MAX_REQUEST_BODY, grid_session, server_ssl_adapter

from tests.fixtures.pki import EchoApp, grid_pki  # noqa: F401

pytestmark = pytest.mark.interop


@pytest.fixture
def mutual_tls_echo(grid_pki, tmp_path):  # noqa: F811
    """The signed echo service behind cheroot with client certificates required (what the container
    builds with tls_client_certs = "required")."""
    mw = WSSecurityMiddleware(EchoApp(), grid_pki.host, grid_pki.trust(), state_dir=tmp_path / "state")
    server = wsgi.Server(("127.0.0.1", 0), mw, numthreads=4, timeout=10)
    server.max_request_body_size = MAX_REQUEST_BODY
    server.ssl_adapter = server_ssl_adapter(grid_pki.host, cert_dir=grid_pki.cert_dir, client_certs="required")
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield f"https://localhost:{server.bind_addr[1]}/echo"
    server.stop()
    thread.join(5)


def test_python_client_with_a_proxy_as_client_certificate(mutual_tls_echo, grid_pki):  # noqa: F811
    proxy = load_credential(proxy=grid_pki.alice.proxy_path)
    session = grid_session(grid_pki.cert_dir, proxy)
    client = grid_client(mutual_tls_echo + "?wsdl", proxy, grid_pki.trust(), session=session)
    result = client.service.Echo(text="over mutual TLS")
    assert result.caller == grid_pki.alice.dn
    # without a client certificate the TLS handshake itself is refused
    with pytest.raises(requests.exceptions.RequestException):
        grid_session(grid_pki.cert_dir).get(mutual_tls_echo + "?wsdl", timeout=10)
    stranger = load_credential(proxy=grid_pki.stranger.proxy_path)
    with pytest.raises(requests.exceptions.RequestException):
        grid_session(grid_pki.cert_dir, stranger).get(mutual_tls_echo + "?wsdl", timeout=10)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_proxy_as_client_certificate(mutual_tls_echo, grid_pki):  # noqa: F811
    def curl(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-sS", "--capath", str(grid_pki.cert_dir), *extra,
                               "-o", "/dev/null", "-w", "%{http_code}", mutual_tls_echo + "?wsdl"],
                              capture_output=True, text=True, timeout=60)

    ok = curl("--cert", str(grid_pki.alice.proxy_path))
    assert ok.returncode == 0 and ok.stdout == "200", ok.stderr
    refused = curl()
    assert refused.returncode != 0 and refused.stdout != "200"
    stranger = curl("--cert", str(grid_pki.stranger.proxy_path))
    assert stranger.returncode != 0 and stranger.stdout != "200"
