"""GT4 transport security on a real vmgrid container (issue 15): a configuration file with
`[container] tls_client_certs = "required"`, loaded and assembled the way `vmgrid serve` does
(services.container.assemble.build_service / build_container, the uvloop + httptools front end), hosting the
Authorization service. A user's proxy is the TLS client certificate: curl `--cert $X509_USER_PROXY` (a vmgrid
proxy, and one from grid-proxy-init when the Globus tools are there) and the zeep client over
`security.tls.grid_session` get through, the signed call answered as the proxy's end-entity DN; a client
without a certificate, or with one from a CA the container does not trust, is refused in the TLS handshake."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import requests
import zeep

from security.client import grid_client
from security.pki import load_credential
from security.tls import grid_session
from services.container.assemble import build_container, build_service
from services.container.config import load_config
from services.soapclient import _Capture

from tests.fixtures.pki import grid_pki  # noqa: F401

pytestmark = pytest.mark.interop

SERVICE = "/wsrf/services/AuthorizationService"


@pytest.fixture
def mutual_tls_container(grid_pki, tmp_path):  # noqa: F811
    config = tmp_path / "vmgrid.toml"
    config.write_text(f"""
[container]
host = "127.0.0.1"
port = 0
state_dir = "{tmp_path / 'state'}"
tls_client_certs = "required"

[security]
cert_dir = "{grid_pki.cert_dir}"
host_cert = "{grid_pki.host_cert_path}"
host_key = "{grid_pki.host_key_path}"
""")
    cfg = load_config(config)
    assert cfg.container.tls and cfg.container.tls_client_certs == "required"
    container = build_container(cfg, [build_service("authz", cfg)]).start()
    yield container, f"https://localhost:{container.port}{SERVICE}"
    container.stop()


def test_python_client_with_a_proxy_as_client_certificate(mutual_tls_container, grid_pki):  # noqa: F811
    container, url = mutual_tls_container
    proxy = load_credential(proxy=grid_pki.alice.proxy_path)
    assert proxy.certificate != grid_pki.alice.credential.certificate      # a proxy, not the user certificate
    # the service's WSDL imports its schemas from the same origin (as services.soapclient allows them)
    settings = zeep.Settings(strict=True, xml_huge_tree=False, forbid_dtd=True, forbid_entities=True,
                             forbid_external=False)
    # _Capture: the signed WS-Addressing headers vmgrid's services require (services.soapclient adds them)
    client = grid_client(url + "?wsdl", proxy, grid_pki.trust(), session=grid_session(grid_pki.cert_dir, proxy),
                         settings=settings, plugins=[_Capture(url)])
    client.service.GetGroups(dn=grid_pki.alice.dn)      # signed both ways; a refusal would be a typed fault
    # the service acted as alice (the signed identity): asking about another DN is refused, as for alice
    with pytest.raises(zeep.exceptions.Fault, match="enforcement points"):
        client.service.GetGroups(dn=grid_pki.bob.dn)
    handshakes_refused = container.refused["handshake"]
    with pytest.raises(requests.exceptions.RequestException):
        grid_session(grid_pki.cert_dir).get(url + "?wsdl", timeout=30)
    stranger = load_credential(proxy=grid_pki.stranger.proxy_path)
    with pytest.raises(requests.exceptions.RequestException):
        grid_session(grid_pki.cert_dir, stranger).get(url + "?wsdl", timeout=30)
    # the client may see the refusal (the server's alert) before the server's event loop has counted it
    deadline = time.monotonic() + 60
    while container.refused["handshake"] < handshakes_refused + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert container.refused["handshake"] == handshakes_refused + 2


def test_a_refused_handshake_does_not_stop_the_container(mutual_tls_container, grid_pki):  # noqa: F811
    _, url = mutual_tls_container
    proxy = load_credential(proxy=grid_pki.alice.proxy_path)
    for _ in range(3):
        with pytest.raises(requests.exceptions.RequestException):
            grid_session(grid_pki.cert_dir).get(url + "?wsdl", timeout=30)
        ok = grid_session(grid_pki.cert_dir, proxy).get(url + "?wsdl", timeout=30)
        assert ok.status_code == 200 and b"definitions" in ok.content


def _grid_proxy_init_proxy(grid_pki, tmp_path):  # noqa: F811
    if not shutil.which("grid-proxy-init"):
        return None
    from tests.interop.test_gsi_globus import grid_proxy_init

    return grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "x509up_gpi", "-rfc")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_proxy_as_client_certificate(mutual_tls_container, grid_pki, tmp_path):  # noqa: F811
    _, url = mutual_tls_container

    def curl(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-sS", "--capath", str(grid_pki.cert_dir), *extra,
                               "-o", "/dev/null", "-w", "%{http_code}", url + "?wsdl"],
                              capture_output=True, text=True, timeout=60)

    proxies = [grid_pki.alice.proxy_path]                       # vmgrid proxy-init's kind
    made = _grid_proxy_init_proxy(grid_pki, tmp_path)
    if made is not None:
        proxies.append(made)                                    # and grid-proxy-init's
    for proxy in proxies:
        ok = curl("--cert", str(proxy))
        assert ok.returncode == 0 and ok.stdout == "200", (proxy, ok.stderr)
    refused = curl()
    assert refused.returncode != 0 and refused.stdout != "200"
    stranger = curl("--cert", str(grid_pki.stranger.proxy_path))
    assert stranger.returncode != 0 and stranger.stdout != "200"


def test_vmgrid_clients_present_their_signing_credential_as_client_certificate(mutual_tls_container,
                                                                               grid_pki):  # noqa: F811
    """services.soapclient (behind the CLI and the services' calls to each other) gets through a container that
    requires client certificates: its signing proxy is also its TLS client certificate."""
    from services.authz.client import AuthorizationClient

    container, url = mutual_tls_container
    proxy = load_credential(proxy=grid_pki.alice.proxy_path)
    handshakes_refused = container.refused["handshake"]
    client = AuthorizationClient.connect(url, proxy, grid_pki.trust())
    groups = client.groups(grid_pki.alice.dn)
    assert isinstance(groups, tuple) and len(groups) == 2
    assert container.refused["handshake"] == handshakes_refused
