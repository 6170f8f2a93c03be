"""Attacks on the WS-Security middleware, sent to a real cheroot server (HTTPS, loopback, port 0) hosting the
middleware in front of a tiny echo service: signature wrapping, replay, expiry, future dating, tampering, unsigned
headers, forged proxies, untrusted and revoked signers, XML bombs. Each is answered with a signed SOAP fault whose
WSS fault code names the reason, and the service never sees the request."""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
from lxml import etree

from security.pki import Credential, proxy_certificate
from security.tls import grid_session
from security.wssec import (DS, Q_BODY, Q_BST, Q_HEADER, Q_ID, Q_SECURITY, Q_SIGNATURE, Q_SIGNATURE_VALUE,
                            Q_TIMESTAMP, SOAP11, WSSE, sign_envelope, verify_envelope)
from tests.fixtures.pki import ECHO_NS, echo_envelope

WSA = "http://www.w3.org/2005/08/addressing"
REPO = Path(__file__).resolve().parents[3]


def wsa_headers(url: str) -> list[etree._Element]:
    out = []
    for name, text in (("Action", f"{ECHO_NS}/Echo"), ("MessageID", f"urn:uuid:{uuid.uuid4()}"), ("To", url)):
        el = etree.Element(f"{{{WSA}}}{name}", nsmap={"wsa": WSA})
        el.text = text
        out.append(el)
    return out


def signed(server, cred: Credential, text: str = "hello", **kwargs) -> bytes:
    return sign_envelope(echo_envelope(text, wsa_headers(server.url)), cred, **kwargs)


def evil_echo(text: str = "evil") -> etree._Element:
    echo = etree.Element(f"{{{ECHO_NS}}}Echo", nsmap={"tns": ECHO_NS})
    etree.SubElement(echo, f"{{{ECHO_NS}}}text").text = text
    return echo


def post(server, data: bytes | None, session: requests.Session, **kwargs) -> requests.Response:
    return session.post(server.url, data=data, headers={"Content-Type": "text/xml; charset=utf-8",
                                                         "SOAPAction": f'"{ECHO_NS}/Echo"'}, timeout=60, **kwargs)


def fault_of(resp: requests.Response, grid_pki) -> tuple[str, str]:
    """(fault code local name, faultstring) of a signed fault response; checks the host signed it."""
    assert resp.status_code == 500, resp.text[:500]
    assert resp.headers["Content-Type"].startswith("text/xml")
    _, root = verify_envelope(resp.content, grid_pki.trust(), expected_signer=grid_pki.host_dn)
    fault = root.find(f"{Q_BODY}/{{{SOAP11}}}Fault")
    code = fault.findtext("faultcode")
    prefix, _, local = code.partition(":")
    assert fault.nsmap[prefix] in (WSSE, SOAP11)
    return local, fault.findtext("faultstring")


@pytest.fixture
def server(secured_echo_server):
    return secured_echo_server()


@pytest.fixture
def session(grid_pki):
    with grid_session(grid_pki.cert_dir) as s:
        yield s


def test_a_valid_signed_request_is_answered_with_a_signed_response(server, session, grid_pki):
    resp = post(server, signed(server, grid_pki.alice.proxy, "hi"), session)
    assert resp.status_code == 200
    signer, root = verify_envelope(resp.content, grid_pki.trust(), expected_signer=grid_pki.host_dn)
    assert root.findtext(f".//{{{ECHO_NS}}}caller") == grid_pki.alice.dn
    assert server.app.calls == [(grid_pki.alice.dn, "hi")]


# -- signature wrapping ----------------------------------------------------------------------------

def _parts(root):
    header = root.find(Q_HEADER)
    return header, header.find(Q_SECURITY), root.find(Q_BODY)


def w_body_moved_into_new_header(root):
    header, _, body = _parts(root)
    etree.SubElement(header, "{urn:evil}Wrapper").append(body)
    etree.SubElement(root, Q_BODY).append(evil_echo())


def w_body_moved_into_security_header(root):
    _, security, body = _parts(root)
    security.append(body)
    etree.SubElement(root, Q_BODY).append(evil_echo())


def w_duplicate_ids(root):
    header, _, body = _parts(root)
    etree.SubElement(header, "{urn:evil}Wrapper").append(body)
    new = etree.SubElement(root, Q_BODY)
    new.set(Q_ID, body.get(Q_ID))
    new.append(evil_echo())


def w_id_in_another_namespace(root):
    _, _, body = _parts(root)
    ident = body.get(Q_ID)
    root.remove(body)
    new = etree.SubElement(root, Q_BODY)
    new.set("{urn:evil}Id", ident)
    new.append(evil_echo())


def w_plain_id_attribute(root):
    _, _, body = _parts(root)
    ident = body.get(Q_ID)
    root.remove(body)
    new = etree.SubElement(root, Q_BODY)
    new.set("Id", ident)
    new.append(evil_echo())


def w_signed_element_inside_unknown_header(root):
    header, _, body = _parts(root)
    wrapper = etree.SubElement(header, "{urn:evil}Unknown")
    wrapper.set(f"{{{SOAP11}}}mustUnderstand", "0")
    wrapper.set(f"{{{SOAP11}}}actor", "urn:nobody")
    wrapper.append(body)
    etree.SubElement(root, Q_BODY).append(evil_echo())


def w_signed_body_nested_in_new_body(root):
    _, _, body = _parts(root)
    root.remove(body)
    new = etree.SubElement(root, Q_BODY)
    new.append(evil_echo())
    new.append(body)


def w_second_body(root):
    etree.SubElement(root, Q_BODY).append(evil_echo())


def w_second_header(root):
    header, _, _ = _parts(root)
    extra = etree.Element(Q_HEADER)
    extra.extend(wsa_headers("https://evil.example.org/"))
    header.addnext(extra)


def w_signed_header_moved_and_replaced(root):
    header, _, _ = _parts(root)
    action = header.find(f"{{{WSA}}}Action")
    etree.SubElement(header, "{urn:evil}Wrapper").append(action)
    evil = etree.SubElement(header, f"{{{WSA}}}Action")
    evil.text = "urn:evil/DestroyEverything"


def w_body_in_ds_object(root):
    _, security, body = _parts(root)
    obj = etree.SubElement(security.find(Q_SIGNATURE), f"{{{DS}}}Object")
    obj.append(body)
    etree.SubElement(root, Q_BODY).append(evil_echo())


def w_second_security_header(root):
    header, security, _ = _parts(root)
    header.append(copy.deepcopy(security))


def w_second_timestamp(root):
    _, security, _ = _parts(root)
    ts = copy.deepcopy(security.find(Q_TIMESTAMP))
    del ts.attrib[Q_ID]
    security.insert(0, ts)


def w_body_reference_removed(root):
    _, security, body = _parts(root)
    signed_info = security.find(f"{Q_SIGNATURE}/{{{DS}}}SignedInfo")
    for ref in signed_info.findall(f"{{{DS}}}Reference"):
        if ref.get("URI") == "#" + body.get(Q_ID):
            signed_info.remove(ref)


def w_timestamp_reused_with_new_body(root):
    _, _, body = _parts(root)
    ident = body.get(Q_ID)
    root.remove(body)
    new = etree.SubElement(root, Q_BODY)
    new.set(Q_ID, ident)
    new.append(evil_echo())


WRAPPING = [
    (w_body_moved_into_new_header, "InvalidSecurity"),
    (w_body_moved_into_security_header, "InvalidSecurity"),
    (w_duplicate_ids, "InvalidSecurity"),
    (w_id_in_another_namespace, "InvalidSecurity"),
    (w_plain_id_attribute, "InvalidSecurity"),
    (w_signed_element_inside_unknown_header, "InvalidSecurity"),
    (w_signed_body_nested_in_new_body, "InvalidSecurity"),
    (w_second_body, "InvalidSecurity"),
    (w_second_header, "InvalidSecurity"),
    (w_signed_header_moved_and_replaced, "InvalidSecurity"),
    (w_body_in_ds_object, "InvalidSecurity"),
    (w_second_security_header, "InvalidSecurity"),
    (w_second_timestamp, "InvalidSecurity"),
    (w_body_reference_removed, "InvalidSecurity"),
    (w_timestamp_reused_with_new_body, "FailedCheck"),
]


@pytest.mark.parametrize("attack,code", WRAPPING, ids=[a.__name__[2:] for a, _ in WRAPPING])
def test_signature_wrapping_is_refused(attack, code, server, session, grid_pki):
    root = etree.fromstring(signed(server, grid_pki.alice.proxy, "legit"))
    attack(root)
    resp = post(server, etree.tostring(root), session)
    assert fault_of(resp, grid_pki)[0] == code
    assert server.app.calls == []


def test_signxml_alone_would_accept_the_classic_wrapping(grid_pki, server):
    """Why the identity checks exist: the digests of the moved Body still verify by Id."""
    from signxml import XMLVerifier
    from signxml.verifier import SignatureConfiguration
    root = etree.fromstring(signed(server, grid_pki.alice.credential, "legit"))
    w_body_moved_into_new_header(root)
    results = XMLVerifier().verify(etree.tostring(root), x509_cert=grid_pki.alice.credential.certificate,
                                   expect_config=SignatureConfiguration(expect_references=5, location=".//"),
                                   id_attribute="Id")
    assert len(results) == 5


# -- freshness and replay ---------------------------------------------------------------------------

def test_replayed_message_is_refused(server, session, grid_pki):
    data = signed(server, grid_pki.alice.proxy)
    assert post(server, data, session).status_code == 200
    code, reason = fault_of(post(server, data, session), grid_pki)
    assert code == "InvalidSecurity" and "replay" in reason
    assert len(server.app.calls) == 1


def _ago(**kw) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(**kw)


@pytest.mark.parametrize("minutes_ago,ttl,words", [
    (10, 300, "expired"),
    (-10, 300, "future"),
    (20, 3600, "freshness window"),
], ids=["expired", "future-dated", "stale-with-long-expiry"])
def test_expired_and_future_dated_messages_are_refused(minutes_ago, ttl, words, server, session, grid_pki):
    # dated when the test runs, not when it is collected (a long run made "10 minutes ahead" the past)
    when = _ago(minutes=minutes_ago)
    code, reason = fault_of(post(server, signed(server, grid_pki.alice.proxy, now=when, ttl=ttl), session), grid_pki)
    assert (code, words in reason) == ("MessageExpired", True)


# -- tampering and unsigned parts -------------------------------------------------------------------

def _tamper_body(root):
    root.find(f".//{{{ECHO_NS}}}text").text = "tampered"


def _tamper_header(root):
    root.find(f".//{{{WSA}}}To").text = "https://evil.example.org/"


def _tamper_signature_value(root):
    sv = root.find(f".//{Q_SIGNATURE_VALUE}")
    sv.text = ("A" if sv.text[0] != "A" else "B") + sv.text[1:]


def _unsigned_wsa_header(root):
    reply = etree.SubElement(root.find(Q_HEADER), f"{{{WSA}}}ReplyTo")
    etree.SubElement(reply, f"{{{WSA}}}Address").text = "https://evil.example.org/steal"


def _strip_security(root):
    root.find(Q_HEADER).remove(root.find(f"{Q_HEADER}/{Q_SECURITY}"))


def _strip_signature(root):
    sec = root.find(f"{Q_HEADER}/{Q_SECURITY}")
    sec.remove(sec.find(Q_SIGNATURE))


def _strip_token(root):
    sec = root.find(f"{Q_HEADER}/{Q_SECURITY}")
    sec.remove(sec.find(Q_BST))


@pytest.mark.parametrize("change,code", [
    (_tamper_body, "FailedCheck"), (_tamper_header, "FailedCheck"), (_tamper_signature_value, "FailedCheck"),
    (_unsigned_wsa_header, "InvalidSecurity"), (_strip_security, "InvalidSecurity"),
    (_strip_signature, "InvalidSecurity"), (_strip_token, "SecurityTokenUnavailable"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else v)
def test_tampered_or_unsigned_parts_are_refused(change, code, server, session, grid_pki):
    root = etree.fromstring(signed(server, grid_pki.alice.proxy))
    change(root)
    assert fault_of(post(server, etree.tostring(root), session), grid_pki)[0] == code
    assert server.app.calls == []


# -- who signed ---------------------------------------------------------------------------------------

def test_proxy_signed_by_another_users_key_is_refused(server, session, grid_pki):
    alice, bob = grid_pki.alice.credential, grid_pki.bob.credential
    key = grid_pki.keys.take()
    forged_cert = proxy_certificate(Credential(alice.certificate, bob.private_key, ()), key.public_key(),
                                    lifetime=dt.timedelta(hours=1))
    forged = Credential(forged_cert, key, (alice.certificate,))
    code, reason = fault_of(post(server, signed(server, forged), session), grid_pki)
    assert code == "FailedAuthentication" and "not signed by the key" in reason


def test_token_of_one_user_with_signature_of_another_is_refused(server, session, grid_pki):
    mixed = Credential(grid_pki.alice.credential.certificate, grid_pki.bob.credential.private_key, ())
    assert fault_of(post(server, signed(server, mixed), session), grid_pki)[0] == "FailedCheck"


@pytest.mark.parametrize("who", ["stranger", "revoked"])
def test_untrusted_and_revoked_signers_are_refused(who, server, session, grid_pki):
    code, reason = fault_of(post(server, signed(server, getattr(grid_pki, who).proxy), session), grid_pki)
    assert code == "FailedAuthentication"
    assert ("revoked" if who == "revoked" else "trusted CA") in reason


# -- XML bombs and oversized bodies ----------------------------------------------------------------------

BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                             for i in range(1, 10))
                  + b']><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
                    b'&lol9;</soap:Body></soap:Envelope>')
QUADRATIC = (b'<?xml version="1.0"?><!DOCTYPE q [<!ENTITY a "' + b"x" * 50_000 + b'">]>'
             b'<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
             + b"&a;" * 20_000 + b"</soap:Body></soap:Envelope>")
EXTERNAL_ENTITY = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
                   b'<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>&xxe;'
                   b'</soap:Body></soap:Envelope>')
DEEP = (b'<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
        + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</soap:Body></soap:Envelope>")
BIG_BODY_SIZE = 50 * 1024 * 1024


def big_body() -> bytes:
    head = b'<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><x>'
    tail = b"</x></soap:Body></soap:Envelope>"
    return head + b"A" * (BIG_BODY_SIZE - len(head) - len(tail)) + tail


@pytest.mark.parametrize("payload,words", [
    (BILLION_LAUGHS, "DOCTYPE"), (QUADRATIC, "DOCTYPE"), (EXTERNAL_ENTITY, "DOCTYPE"), (DEEP, "nested deeper"),
    (b"this is not XML", "not well-formed"), (b"", "empty"),
], ids=["billion-laughs", "quadratic-blowup", "external-entity", "deep-nesting", "garbage", "empty"])
def test_xml_bombs_are_refused_by_the_parser(payload, words, server, session, grid_pki):
    code, reason = fault_of(post(server, payload, session), grid_pki)
    assert code == "InvalidSecurity" and words in reason


def test_50mb_body_is_refused_with_and_without_content_length(server, session, grid_pki):
    data = big_body()
    code, reason = fault_of(post(server, data, session), grid_pki)
    assert code == "InvalidSecurity" and "exceeds the limit" in reason
    chunks = (data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20))      # chunked transfer encoding
    code, reason = fault_of(post(server, chunks, session), grid_pki)
    assert code == "InvalidSecurity" and "exceeds the limit" in reason


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@contextlib.contextmanager
def _echo_server_process(grid_pki, tmp_path, session):
    """The signed echo server in a process of its own (its peak resident memory read from /proc), answering one
    signed call before it is handed over; terminated at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.pki", "--cert", str(grid_pki.host_cert_path),
         "--key", str(grid_pki.host_key_path), "--cert-dir", str(grid_pki.cert_dir), "--state", str(tmp_path),
         "--tls"], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        port = int(proc.stdout.readline())

        class S:
            url = f"https://localhost:{port}/echo"
        assert post(S, signed(S, grid_pki.alice.proxy), session).status_code == 200
        yield proc, S
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_bombs_do_not_blow_up_the_server_process_memory(grid_pki, tmp_path, session):
    """The server runs in its own process so its peak resident memory can be read from /proc."""
    with _echo_server_process(grid_pki, tmp_path, session) as (proc, S):
        before = _peak_rss_kib(proc.pid)
        data = big_body()
        for payload in (BILLION_LAUGHS, QUADRATIC, EXTERNAL_ENTITY, DEEP, data, data):
            assert fault_of(post(S, payload, session), grid_pki)[0] == "InvalidSecurity"
        growth_mib = (_peak_rss_kib(proc.pid) - before) / 1024
        assert growth_mib < 40, f"server peak memory grew by {growth_mib:.0f} MiB"
        assert post(S, signed(S, grid_pki.alice.proxy), session).status_code == 200


def _dense_body(item: bytes) -> bytes:
    """A message just under the 16 MiB limit that is nothing but markup: ``item`` over and over in the Body."""
    head = b'<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><x>'
    tail = b"</x></soap:Body></soap:Envelope>"
    room = 16 * 1024 * 1024 - 4096 - len(head) - len(tail)
    return head + item * (room // len(item)) + tail


def test_messages_of_millions_of_elements_or_attributes_are_refused_before_a_tree_is_built(grid_pki, tmp_path,
                                                                                          session):
    """16 MiB of empty elements (``<b/> ``) or of one element's attributes, unsigned: each within the size limit,
    each was parsed into a tree of 3 million nodes (550-850 MiB of the server process, per message, kept by the
    allocator afterwards) before the missing signature was noticed. Refused by their count of markup items before
    libxml2 sees them: the server's peak memory grows by about the bodies themselves."""
    import string

    with _echo_server_process(grid_pki, tmp_path, session) as (proc, S):
        before = _peak_rss_kib(proc.pid)
        names = [a + b for a in string.ascii_letters for b in string.ascii_letters][:2000]
        attributes = b"<b " + b" ".join(n.encode() + b'=""' for n in names) + b"/>"
        for payload in (_dense_body(b"<b/> "), _dense_body(attributes)):
            code, reason = fault_of(post(S, payload, session), grid_pki)
            assert code == "InvalidSecurity" and "markup items" in reason, reason
        growth_mib = (_peak_rss_kib(proc.pid) - before) / 1024
        assert growth_mib < 200, f"server peak memory grew by {growth_mib:.0f} MiB"
        assert post(S, signed(S, grid_pki.alice.proxy), session).status_code == 200


# -- bounded work before the signature is checked ------------------------------------------------------

def test_a_token_of_hundreds_of_certificates_is_refused_unread(server, session, grid_pki):
    """A PKIPath of 300 proxies (alice's own, valid): refused by its count before one certificate is decoded (a
    chain is validated before the message's signature, so anyone can send one; 200 proxies cost a second per
    message). Fails without the bound: the message was answered after the whole walk."""
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    cred = grid_pki.alice.credential
    for _ in range(300):
        cred = Credential(proxy_certificate(cred, key.public_key(), lifetime=dt.timedelta(hours=1)), key,
                          cred.certificates)
    code, reason = fault_of(post(server, signed(server, cred), session), grid_pki)
    assert code == "FailedAuthentication" and "more than 16 certificates" in reason
    assert server.app.calls == []
    assert post(server, signed(server, grid_pki.alice.proxy), session).status_code == 200


def test_a_fault_does_not_echo_a_huge_qname_whole(server, session, grid_pki):
    """A GetResourceProperty whose text is 2,000,000 characters (an unprefixed "QName") was refused with a
    faultstring quoting all of it: a 2 MB answer to a 2 MB request (attack F16). The reason is cut, the rest counted."""
    env = echo_envelope("x", wsa_headers(server.url))
    echo = env.find(f"{Q_BODY}/{{{ECHO_NS}}}Echo")
    etree.SubElement(echo, "{http://docs.oasis-open.org/wsrf/rp-2}GetResourceProperty").text = "A" * 2_000_000
    resp = post(server, sign_envelope(env, grid_pki.alice.proxy), session)
    code, text = fault_of(resp, grid_pki)
    assert code == "InvalidSecurity" and text.startswith("GetResourceProperty holds the QName 'AAAA")
    assert len(text) < 1100 and "more characters)" in text
    assert len(resp.content) < 20_000
