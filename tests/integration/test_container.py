"""The grid container: serves the hand-written contract with its addresses rewritten, refuses what
it cannot dispatch with SOAP faults, never a traceback, and logs one line per call."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager

from lxml import etree

from security.tls import grid_session
from tests.fixtures.repository import signed_call

WSDL = "http://schemas.xmlsoap.org/wsdl/"
XS = "http://www.w3.org/2001/XMLSchema"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"


def test_the_served_wsdl_is_the_hand_written_one_with_this_address(repo_server):
    session = grid_session(repo_server.pki.cert_dir)
    served = etree.fromstring(session.get(repo_server.url + "?wsdl").content)
    original = etree.parse("wsdl/vmrepository.wsdl").getroot()
    addr = served.find(f".//{{{WSDL}}}port/{{http://schemas.xmlsoap.org/wsdl/soap/}}address")
    assert addr.get("location") == repo_server.url
    assert [op.get("name") for op in served.iterfind(f"{{{WSDL}}}portType/{{{WSDL}}}operation")] == \
           [op.get("name") for op in original.iterfind(f"{{{WSDL}}}portType/{{{WSDL}}}operation")]
    base = repo_server.url.rsplit("/wsrf/", 1)[0]
    locations = [i.get("schemaLocation") for i in served.iter(f"{{{XS}}}import")]
    assert locations and all(loc.startswith(base + "/wsrf/share/schema/") for loc in locations)
    for loc in locations:                       # each import resolves, and its own imports too
        schema = etree.fromstring(session.get(loc).content)
        for imp in schema.iter(f"{{{XS}}}import"):
            assert session.get(imp.get("schemaLocation")).status_code == 200


def test_unknown_paths_and_methods_are_refused_plainly(repo_server):
    session = grid_session(repo_server.pki.cert_dir)
    base = repo_server.url.rsplit("/wsrf/", 1)[0]
    assert session.get(base + "/wsrf/services/NoSuchService?wsdl").status_code == 404
    assert session.get(base + "/wsrf/share/schema/../../etc/passwd").status_code == 404
    assert session.get(base + "/wsrf/share/schema/nothere.xsd").status_code == 404
    assert session.put(repo_server.url, data=b"x").status_code == 405
    assert "VMRepositoryService" in session.get(base + "/").text


def test_an_unsigned_request_gets_a_wsse_fault(repo_server):
    body = (b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
            b'<ListVOs xmlns="http://vmgrid.org/ns/vmrepository/1"/></soapenv:Body></soapenv:Envelope>')
    resp = grid_session(repo_server.pki.cert_dir).post(repo_server.url, data=body,
                                                       headers={"Content-Type": "text/xml"})
    assert resp.status_code == 500
    fault = etree.fromstring(resp.content).find(f"{{{SOAP}}}Body/{{{SOAP}}}Fault")
    assert fault.findtext("faultcode").endswith(":InvalidSecurity")


def test_a_signed_request_for_no_operation_gets_a_client_fault(repo_server):
    status, fault = signed_call(repo_server.url, etree.Element("{urn:nothing}Nothing"),
                                repo_server.pki.alice.proxy, repo_server.pki.trust())
    assert status == 500 and fault.findtext("faultcode") == "soapenv:Client"
    assert "no operation" in fault.findtext("faultstring")


def test_a_request_breaking_the_schema_is_an_invalid_argument_fault(repo_server):
    req = etree.Element("{http://vmgrid.org/ns/vmrepository/1}QueryImages")
    etree.SubElement(req, "{http://vmgrid.org/ns/vmrepository/1}limit").text = "5000"
    status, fault = signed_call(repo_server.url, req, repo_server.pki.alice.proxy, repo_server.pki.trust())
    detail = fault.find("detail")[0]
    assert status == 500 and etree.QName(detail).localname == "InvalidArgumentFault"


def test_an_unexpected_error_is_an_internal_fault_with_an_incident_not_a_traceback(repo_server, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(repo_server.service.catalogue, "vo_counts", broken)
    status, fault = signed_call(repo_server.url, etree.Element("{http://vmgrid.org/ns/vmrepository/1}ListVOs"),
                                repo_server.pki.alice.proxy, repo_server.pki.trust())
    text = etree.tostring(fault).decode()
    assert status == 500 and "InternalFault" in text and "incident" in text
    assert "disk on fire" not in text and "Traceback" not in text


def test_one_structured_log_line_per_call(repo_server, caplog):
    with caplog.at_level(logging.INFO, logger="vmgrid.calls"):
        repo_server.client(repo_server.pki.bob).vos()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "vmgrid.calls"]
    assert lines[-1]["operation"] == "ListVOs" and lines[-1]["caller"] == repo_server.pki.bob.dn
    assert lines[-1]["outcome"] == "ok" and lines[-1]["ms"] >= 0


def test_a_signed_list_vos_with_the_action_of_remove_image_is_refused(repo_server):
    """Issue 9.1: wsa:Action must be the dispatched operation's (ListVOs was answered as ListVOs before)."""
    repo = "http://vmgrid.org/ns/vmrepository/1"
    status, fault = signed_call(repo_server.url, etree.Element(f"{{{repo}}}ListVOs"), repo_server.pki.alice.proxy,
                                repo_server.pki.trust(), action=f"{repo}/RemoveImage")
    assert status == 500 and fault.findtext("faultcode") == "wsa:ActionNotSupported"
    assert fault.find("detail/{http://www.w3.org/2005/08/addressing}ProblemAction") is not None
    status, fault = signed_call(repo_server.url, etree.Element(f"{{{repo}}}ListVOs"), repo_server.pki.alice.proxy,
                                repo_server.pki.trust(), to="https://node2.example.org:8443/wsrf/services/"
                                                           "VMRepositoryService")
    assert status == 500 and fault.findtext("faultcode") == "wsa:DestinationUnreachable"


def test_the_wsdl_carries_the_configured_address_whatever_host_a_request_names(repo_server):
    """Issue 9.5: the served contract does not depend on (nor is cached per) the request's Host header."""
    session = grid_session(repo_server.pki.cert_dir)
    first = session.get(repo_server.url + "?wsdl").content
    for n in range(20):
        other = session.get(repo_server.url + "?wsdl", headers={"Host": f"attacker-{n}.example.org"}).content
        assert other == first
    assert len(repo_server.service.contract._served) == 1



@contextmanager
def bob_and_alice(repo_server):
    """bob's and alice's clients of the repository; bob's answers as they came, in the list yielded third."""
    from client.soap import GridServiceClient

    pki = repo_server.pki
    bob = GridServiceClient(repo_server.url, pki.bob.proxy, pki.trust())
    alice = GridServiceClient(repo_server.url, pki.alice.proxy, pki.trust())
    captured = []
    real = bob.zeep.transport.post_xml
    bob.zeep.transport.post_xml = lambda *a, **k: captured.append(real(*a, **k)) or captured[-1]
    try:
        yield bob, alice, captured
    finally:
        alice.close()
        bob.close()


def test_a_signed_fault_to_another_request_is_refused_by_the_client(repo_server):
    """The same swap with a fault: bob's UnknownImage fault (a signed answer of the host) handed to alice's call.
    The container's faults name the request in a signed wsa:RelatesTo, and vmgrid's client requires it on faults
    too, except on the security layer's refusals of a request it could not verify (nothing of it was read); those
    still reach the caller as the fault they are. Fails without: alice took bob's fault as the answer to her call."""
    import pytest
    from lxml import etree

    from client.soap import GridServiceClient
    from security.client import _check_relates_to
    from security.middleware import fault_envelope
    from security.wssec import WSSE, InvalidSecurity
    from services.faults import UnknownImage

    with bob_and_alice(repo_server) as (bob, alice, captured):
        with pytest.raises(UnknownImage):
            bob.call("GetDescriptor", image="img-" + "0" * 32)
        fault = etree.fromstring(captured[-1].content)
        assert fault.find(".//{*}Fault") is not None and fault.findtext(".//{*}RelatesTo").startswith("urn:uuid:")
        assert sorted(v.text for v in alice.call("ListVOs").iter("{*}name")) == ["bio"]
        alice.zeep.transport.post_xml = lambda *a, **k: captured[-1]                             # bob's, to her
        with pytest.raises(InvalidSecurity, match="relates to urn:uuid:.*not to this request"):
            alice.call("ListVOs")
    # a fault to a request without a MessageID (a legacy stack's) names no request: not taken as the answer to a call
    # that sent one (without the client's check alice took bob's UnknownImage for hers)
    import requests

    from security.https import Answer
    from security.tls import grid_session
    from security.wssec import sign_envelope
    from services.container.addressing import WSA
    from services.container.soap import envelope

    pki = repo_server.pki
    repo = "http://vmgrid.org/ns/vmrepository/1"
    headers = []
    for name, value in (("To", repo_server.url), ("Action", f"{repo}/GetDescriptor")):
        headers.append(etree.Element(f"{{{WSA}}}{name}", nsmap={"wsa": WSA}))
        headers[-1].text = value
    payload = etree.fromstring(f'<r:GetDescriptor xmlns:r="{repo}"><r:image>img-{"1" * 32}</r:image></r:GetDescriptor>')
    legacy = grid_session(pki.trust().cert_dir).post(
        repo_server.url, data=sign_envelope(envelope(payload, headers), pki.bob.proxy),
        headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}, timeout=30)
    assert legacy.status_code == 500 and b"UnknownImage" in legacy.content and b"RelatesTo" not in legacy.content
    alice = GridServiceClient(repo_server.url, pki.alice.proxy, pki.trust())
    try:
        alice.zeep.transport.post = lambda *a, **k: Answer(           # bob's fault, to her, for her call
            500, requests.structures.CaseInsensitiveDict({"Content-Type": "text/xml"}), legacy.content)
        with pytest.raises(InvalidSecurity, match="relates to no request"):
            alice.call("ListVOs")
    finally:
        alice.close()
    # a refusal before the request was read carries no RelatesTo and is taken as what it is
    refusal = fault_envelope(etree.QName(WSSE, "FailedCheck"), "the signature does not verify")
    _check_relates_to(refusal, "urn:uuid:1", required=True)
    # but a fault of the service without one is not
    service_fault = fault_envelope(etree.QName("http://schemas.xmlsoap.org/soap/envelope/", "Client"), "no such image")
    with pytest.raises(InvalidSecurity):
        _check_relates_to(service_fault, "urn:uuid:1", required=True)


def test_a_signed_answer_to_another_request_is_refused_by_the_client(repo_server):
    """Without TLS (a site may turn it off, never signing) or past a proxy where TLS ends, whoever is on the way
    can answer a call with another signed answer of the same host: here bob's ListVOs answer handed to alice's
    call (another client, so no replay to hers). Refused by alice's client: its signed wsa:RelatesTo names bob's
    MessageID. Fails without the client's RelatesTo check: alice took bob's VOs for hers."""
    import pytest

    from security.wssec import InvalidSecurity

    with bob_and_alice(repo_server) as (bob, alice, captured):
        vos = lambda resp: sorted(v.text for v in resp.iter("{*}name"))                         # noqa: E731
        assert vos(bob.call("ListVOs")) == ["hep"]
        assert vos(alice.call("ListVOs")) == ["bio"]                                             # her own answer
        alice.zeep.transport.post_xml = lambda *a, **k: captured[-1]                             # bob's, to her
        with pytest.raises(InvalidSecurity, match="relates to urn:uuid:.*not to this request"):
            alice.call("ListVOs")
