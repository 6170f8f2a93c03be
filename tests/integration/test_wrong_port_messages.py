"""A SOAP URL that names a GridFTP port, or http:// for a container that speaks TLS, is one line saying what is
wrong (trial12 T7: `SSLError: [SSL: WRONG_VERSION_NUMBER]` and "Remote end closed connection without response")."""
from __future__ import annotations

import pytest

from gridftp import GridFTPServer
from services.soapclient import GridServiceClient, Unreachable


def message_for(url: str, pki) -> str:
    with pytest.raises(Unreachable) as exc:
        GridServiceClient(url, pki.alice.proxy, pki.trust(), timeout=20)
    return str(exc.value)


def test_https_to_a_gridftp_port_says_it_does_not_answer_tls(grid_pki, tmp_path):
    (tmp_path / "served").mkdir()
    server = GridFTPServer(tmp_path / "served", "127.0.0.1", 0, anonymous=True).start()
    try:
        where = f"127.0.0.1:{server.port}"
        text = message_for(f"https://{where}/wsrf/services/VMManagerService", grid_pki)
    finally:
        server.stop()
    assert text == (f"cannot fetch the WSDL of https://{where}/wsrf/services/VMManagerService: {where} does not "
                    f"answer TLS/HTTPS: is it a SOAP container's port? (GridFTP is gsiftp://; a container without "
                    f"TLS is http://)")
    assert "\n" not in text and "SSL" not in text


def test_http_to_a_container_that_speaks_tls_says_it_may_serve_https(repo_server):
    assert repo_server.url.startswith("https://")
    url = "http://" + repo_server.url.removeprefix("https://")
    where = url.split("/")[2]
    text = message_for(url, repo_server.pki)
    assert text == (f"cannot fetch the WSDL of {url}: {where} closed the connection without an answer: it may "
                    f"serve https://, not http://")
