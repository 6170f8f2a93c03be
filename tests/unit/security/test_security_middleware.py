"""The WS-Security middleware and the zeep client end to end, on real cheroot servers over HTTPS: signed calls,
signed responses and faults, host authorization, WSDL pass-through, mustUnderstand, TLS trust, and a replay cache
shared by two server processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import zeep
from lxml import etree

from security.client import GridTransport, GridWSSE, grid_client, host_authorizer
from security.pki import make_proxy
from security.tls import grid_session
from security.wssec import (FailedAuthentication, InvalidSecurity, Q_BODY, Q_HEADER, Q_SECURITY, SOAP11, WSSE,
                            sign_envelope, verify_envelope)
from tests.fixtures.pki import ECHO_NS, echo_envelope

REPO = Path(__file__).resolve().parents[3]
WSA = "http://www.w3.org/2005/08/addressing"


def test_zeep_client_signs_and_verifies_a_call_with_ws_addressing(secured_echo_server, grid_pki):
    server = secured_echo_server()
    seen = {}

    class Spy(zeep.Plugin):
        def egress(self, envelope, http_headers, operation, binding_options):
            seen["headers"] = [etree.QName(h).localname for h in envelope.find(Q_HEADER)]
            return envelope, http_headers

    client = grid_client(server.wsdl_url, grid_pki.alice.proxy, grid_pki.trust(), plugins=[Spy()])
    result = client.service.Echo(text="grid")
    assert (result.text, result.caller, result.limited) == ("grid", grid_pki.alice.dn, False)
    assert {"Action", "MessageID", "To"} <= set(seen["headers"])          # WS-Addressing came before signing
    assert client.wsse.last_signer.dn == grid_pki.host_dn


def test_limited_proxy_is_passed_to_the_service(secured_echo_server, grid_pki):
    server = secured_echo_server()
    limited = make_proxy(grid_pki.bob.credential, limited=True, key=grid_pki.keys.take())
    result = grid_client(server.wsdl_url, limited, grid_pki.trust()).service.Echo(text="x")
    assert result.caller == grid_pki.bob.dn and result.limited is True


def test_client_refuses_a_response_signed_by_another_host(secured_echo_server, grid_pki):
    server = secured_echo_server()
    client = grid_client(server.wsdl_url, grid_pki.alice.proxy, grid_pki.trust(),
                         expected_host_dn="/O=Grid/OU=vmgrid/CN=host/elsewhere.example.org")
    with pytest.raises(FailedAuthentication, match="not by the expected party"):
        client.service.Echo(text="x")


def test_host_authorizer_follows_the_url(grid_pki):
    trust = grid_pki.trust()
    host = trust.validate(grid_pki.host.certificates)
    assert host_authorizer("https://localhost:8443/x")(host)
    assert host_authorizer("https://127.0.0.1:8443/x")(host)
    assert not host_authorizer("https://node2.example.org/x")(host)
    alice = trust.validate(grid_pki.alice.credential.certificates)
    assert not host_authorizer("https://localhost/x")(alice)


def test_a_service_certificate_signs_its_hosts_answers_but_is_no_host(grid_pki, tmp_path):
    """`vmgrid ca host localhost --service jobs`: CN=jobs/localhost, TLS for localhost (its subjectAltName). The job
    service serves with one so that it holds no host's rights (a site policy's CN=host/* patterns: nodes,
    enforcement points, migration sources): a client takes its answers from that host, and nothing takes it for the
    host (trial T1: the README's "own credential" of the job service had the site's host DN)."""
    from security.client import answer_authorizer
    from security.hostauth import names_host
    from security.pki import CAError, host_of, service_host_of

    trust = grid_pki.trust()
    cred = grid_pki.ca.issue_host("localhost", service="jobs", key=grid_pki.keys.take(), out_dir=tmp_path)
    assert cred.subject == "/O=Grid/OU=vmgrid/CN=jobs/localhost"
    jobs = trust.validate(cred.certificates)
    assert answer_authorizer("https://localhost:8446/x")(jobs) and answer_authorizer("https://127.0.0.1:8446/x")(jobs)
    assert not answer_authorizer("https://node2.example.org/x")(jobs)
    assert names_host(cred.certificate, "localhost")                          # GridFTP's GSI host check (SAN)
    assert not host_authorizer("https://localhost:8446/x")(jobs)             # no host: no source proof, no staging
    assert host_of(cred.subject) is None and service_host_of(cred.subject) == "localhost"
    host = trust.validate(grid_pki.host.certificates)
    assert answer_authorizer("https://localhost/x")(host) and service_host_of(grid_pki.host.subject) is None
    alice = trust.validate(grid_pki.alice.credential.certificates)
    assert not answer_authorizer("https://localhost/x")(alice)
    for bad in ("host", "Jobs", "jobs/x", ""):
        if bad != "host":
            with pytest.raises(CAError, match="service name"):
                grid_pki.ca.issue_host("localhost", service=bad)


def test_client_refuses_an_unsigned_response(grid_pki):
    """A plain (unsecured) echo server answers unsigned: the client must not accept it."""
    from tests.fixtures.pki import EchoApp, serve_wsgi

    def unsigned(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            from security import safexml
            environ["vmgrid.envelope"] = safexml.parse(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
            environ["vmgrid.caller"] = type("C", (), {"dn": "nobody", "limited": False})()
        return EchoApp()(environ, start_response)

    with serve_wsgi(unsigned, grid_pki.host) as srv:
        url = f"https://localhost:{srv.bind_addr[1]}/echo?wsdl"
        with pytest.raises(InvalidSecurity, match="no SOAP Header"):
            grid_client(url, grid_pki.alice.proxy, grid_pki.trust()).service.Echo(text="x")


def test_security_faults_reach_the_zeep_caller_as_soap_faults(secured_echo_server, grid_pki):
    server = secured_echo_server()
    client = grid_client(server.wsdl_url, grid_pki.revoked.proxy, grid_pki.trust())
    with pytest.raises(zeep.exceptions.Fault) as info:
        client.service.Echo(text="x")
    assert info.value.code.endswith("FailedAuthentication") and "revoked" in info.value.message


def test_application_faults_are_signed_too(secured_echo_server, grid_pki):
    server = secured_echo_server()
    env = echo_envelope()
    body = env.find(Q_BODY)
    body[0].tag = f"{{{ECHO_NS}}}Fail"
    with grid_session(grid_pki.cert_dir) as s:
        resp = s.post(server.url, data=sign_envelope(env, grid_pki.alice.proxy), headers={"Content-Type": "text/xml"})
    assert resp.status_code == 500
    signer, root = verify_envelope(resp.content, grid_pki.trust(), expected_signer=grid_pki.host_dn)
    assert root.findtext(f"{Q_BODY}/{{{SOAP11}}}Fault/faultstring") == "the echo service was asked to fail"


def test_wsdl_get_passes_through_unsigned(secured_echo_server, grid_pki):
    server = secured_echo_server()
    with grid_session(grid_pki.cert_dir) as s:
        resp = s.get(server.wsdl_url)
    assert resp.status_code == 200 and b"<definitions" in resp.content and b"wsse:Security" not in resp.content


def test_must_understand_headers_not_understood_are_refused(secured_echo_server, grid_pki):
    server = secured_echo_server()
    block = etree.Element("{urn:other}Transaction", nsmap={"o": "urn:other"})
    block.set(f"{{{SOAP11}}}mustUnderstand", "1")
    data = sign_envelope(echo_envelope("x", [block]), grid_pki.alice.proxy)
    with grid_session(grid_pki.cert_dir) as s:
        resp = s.post(server.url, data=data, headers={"Content-Type": "text/xml"})
    _, root = verify_envelope(resp.content, grid_pki.trust(), expected_signer=grid_pki.host_dn)
    assert resp.status_code == 500
    assert root.findtext(f".//{{{SOAP11}}}Fault/faultcode") == "soap:MustUnderstand"
    # the same block without mustUnderstand is just another signed header
    block.set(f"{{{SOAP11}}}mustUnderstand", "0")
    data = sign_envelope(echo_envelope("y", [block]), grid_pki.alice.proxy)
    with grid_session(grid_pki.cert_dir) as s:
        assert s.post(server.url, data=data, headers={"Content-Type": "text/xml"}).status_code == 200


def test_requests_carry_a_must_understand_security_header_with_pkipath_for_proxies(grid_pki):
    data = sign_envelope(echo_envelope(), grid_pki.alice.proxy)
    root = etree.fromstring(data)
    security = root.find(f"{Q_HEADER}/{Q_SECURITY}")
    assert security.get(f"{{{SOAP11}}}mustUnderstand") == "1"
    token = security.find(f"{{{WSSE}}}BinarySecurityToken")
    assert token.get("ValueType").endswith("#X509PKIPathv1")
    plain = etree.fromstring(sign_envelope(echo_envelope(), grid_pki.alice.credential))
    assert plain.find(f".//{{{WSSE}}}BinarySecurityToken").get("ValueType").endswith("#X509v3")


def test_tls_refuses_a_server_from_an_untrusted_ca(grid_pki):
    from tests.fixtures.pki import EchoApp, serve_wsgi
    rogue = grid_pki.untrusted_ca.issue_host("localhost", key=grid_pki.keys.take())
    with serve_wsgi(EchoApp(), rogue) as srv:
        with grid_session(grid_pki.cert_dir) as s, pytest.raises(requests.exceptions.SSLError):
            s.get(f"https://localhost:{srv.bind_addr[1]}/echo?wsdl")
    with serve_wsgi(EchoApp(), grid_pki.host) as srv:
        with grid_session(grid_pki.cert_dir) as s:
            assert s.get(f"https://127.0.0.1:{srv.bind_addr[1]}/echo?wsdl").status_code == 200


def test_zeep_transport_screens_responses_with_the_hardened_parser(grid_pki):
    from tests.fixtures.pki import serve_wsgi
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>'

    def evil(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/xml")])
        return [bomb]

    with serve_wsgi(evil, grid_pki.host) as srv:
        wsse = GridWSSE(grid_pki.alice.proxy, grid_pki.trust())
        transport = GridTransport(wsse)
        with pytest.raises(InvalidSecurity, match="DOCTYPE"):
            transport.post_xml(f"https://localhost:{srv.bind_addr[1]}/echo", echo_envelope(), {})


def _spawn_server(grid_pki, state: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.pki", "--cert", str(grid_pki.host_cert_path),
         "--key", str(grid_pki.host_key_path), "--cert-dir", str(grid_pki.cert_dir), "--state", str(state)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc, int(proc.stdout.readline())


def test_replay_cache_is_shared_by_worker_processes(grid_pki, tmp_path):
    """Two server processes on one state directory (as a container's workers): a message accepted by one is a
    replay for the other."""
    first, port1 = _spawn_server(grid_pki, tmp_path)
    second, port2 = _spawn_server(grid_pki, tmp_path)
    try:
        data = sign_envelope(echo_envelope("once"), grid_pki.alice.proxy)
        with requests.Session() as s:
            ok = s.post(f"http://127.0.0.1:{port1}/echo", data=data, headers={"Content-Type": "text/xml"})
            again = s.post(f"http://127.0.0.1:{port2}/echo", data=data, headers={"Content-Type": "text/xml"})
        assert ok.status_code == 200
        assert again.status_code == 500 and b"replayed" in again.content
    finally:
        for p in (first, second):
            p.terminate()
            p.wait(10)
