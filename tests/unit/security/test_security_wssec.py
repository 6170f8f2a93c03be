"""WS-Security signing and verification as functions (no server): token forms, timestamp formats, signer checks,
replay caches and the mustUnderstand rule."""
from __future__ import annotations

import base64
import datetime as dt
import time

import pytest
from lxml import etree

from security.replay import MemoryReplayCache, SQLiteReplayCache
from security.wssec import (DS, Q_BST, Q_CREATED, Q_EXPIRES, Q_HEADER, Q_ID, Q_KEY_INFO, Q_SECURITY, Q_SIGNATURE,
                            SOAP11, WSSE, FailedAuthentication, FailedCheck, InvalidSecurity, MessageExpired,
                            SecurityPolicy, _ids, _raw_signature, _references_from_c14n, c14n,
                            must_understand_violations, sign_envelope, sign_in_place, verify_envelope)
from tests.fixtures.pki import ECHO_NS, echo_envelope


def test_round_trip_returns_caller_and_the_tree_to_dispatch(grid_pki):
    data = sign_envelope(echo_envelope("x"), grid_pki.bob.proxy)
    caller, root = verify_envelope(data, grid_pki.trust())
    assert caller.dn == grid_pki.bob.dn and caller.is_proxy
    assert root.findtext(f".//{{{ECHO_NS}}}text") == "x"
    # an already parsed root (e.g. zeep's) verifies the same way
    caller2, _ = verify_envelope(etree.fromstring(data), grid_pki.trust())
    assert caller2.dn == caller.dn


def test_a_proxy_sent_as_a_lone_x509v3_token_lacks_its_chain(grid_pki):
    data = sign_envelope(echo_envelope(), grid_pki.bob.proxy, token="X509v3")
    with pytest.raises(FailedAuthentication, match="not presented"):
        verify_envelope(data, grid_pki.trust())


def test_x509data_in_key_info_is_accepted(grid_pki):
    """Some stacks put the certificates in ds:X509Data instead of a BinarySecurityToken."""
    root = sign_in_place(echo_envelope(), grid_pki.alice.proxy)
    security = root.find(f"{Q_HEADER}/{Q_SECURITY}")
    security.remove(security.find(Q_BST))
    key_info = security.find(f"{Q_SIGNATURE}/{Q_KEY_INFO}")
    for child in list(key_info):
        key_info.remove(child)
    data = etree.SubElement(key_info, f"{{{DS}}}X509Data")
    for cert in reversed(grid_pki.alice.proxy.certificates):       # any order
        from cryptography.hazmat.primitives.serialization import Encoding
        etree.SubElement(data, f"{{{DS}}}X509Certificate").text = base64.b64encode(
            cert.public_bytes(Encoding.DER)).decode()
    caller, _ = verify_envelope(etree.tostring(root), grid_pki.trust())
    assert caller.subject == grid_pki.alice.proxy.subject


@pytest.mark.parametrize("created,expires", [
    ("{now:%Y-%m-%dT%H:%M:%S}Z", None),
    ("{now:%Y-%m-%dT%H:%M:%S}.123456789Z", "{later:%Y-%m-%dT%H:%M:%S}.1Z"),
    ("{local}", "{later:%Y-%m-%dT%H:%M:%S}+00:00"),
], ids=["no-expires", "long-fraction", "offset"])
def test_timestamp_formats(created, expires, grid_pki):
    now = dt.datetime.now(dt.timezone.utc)
    values = {"now": now, "later": now + dt.timedelta(minutes=5),
              "local": now.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()}
    env = echo_envelope()
    sec = etree.SubElement(etree.Element(Q_HEADER), Q_SECURITY)
    env.insert(0, sec.getparent())
    ts = etree.SubElement(sec, "{http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd}"
                               "Timestamp")
    etree.SubElement(ts, Q_CREATED).text = created.format(**values)
    if expires:
        etree.SubElement(ts, Q_EXPIRES).text = expires.format(**values)
    data = sign_envelope(env, grid_pki.alice.proxy)
    assert verify_envelope(data, grid_pki.trust())[0].dn == grid_pki.alice.dn


def test_garbage_timestamp_and_inverted_window_are_refused(grid_pki):
    now = dt.datetime.now(dt.timezone.utc)
    root = sign_in_place(echo_envelope(), grid_pki.alice.proxy, now=now)
    root.find(f".//{Q_CREATED}").text = "yesterday"
    with pytest.raises(InvalidSecurity, match="xsd:dateTime"):
        verify_envelope(etree.tostring(root), grid_pki.trust())


def test_clock_skew_policy(grid_pki):
    ahead = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    data = sign_envelope(echo_envelope(), grid_pki.alice.proxy, now=ahead)
    assert verify_envelope(data, grid_pki.trust())            # within the default 60 s skew
    strict = SecurityPolicy(clock_skew=dt.timedelta(seconds=5))
    data = sign_envelope(echo_envelope(), grid_pki.alice.proxy, now=ahead)
    with pytest.raises(MessageExpired, match="future"):
        verify_envelope(data, grid_pki.trust(), policy=strict)


def test_expected_signer(grid_pki):
    data = sign_envelope(echo_envelope(), grid_pki.host)
    assert verify_envelope(data, grid_pki.trust(), expected_signer=grid_pki.host_dn)
    with pytest.raises(FailedAuthentication):
        verify_envelope(data, grid_pki.trust(), expected_signer=grid_pki.alice.dn)


def test_signing_twice_and_non_soap_documents_are_refused(grid_pki):
    root = sign_in_place(echo_envelope(), grid_pki.alice.proxy)
    with pytest.raises(InvalidSecurity, match="already signed"):
        sign_in_place(root, grid_pki.alice.proxy)
    with pytest.raises(InvalidSecurity, match="SOAP 1.1"):
        sign_in_place(etree.Element("{urn:x}NotAnEnvelope"), grid_pki.alice.proxy)
    soap12 = etree.Element("{http://www.w3.org/2003/05/soap-envelope}Envelope")
    etree.SubElement(soap12, "{http://www.w3.org/2003/05/soap-envelope}Body")
    with pytest.raises(InvalidSecurity, match="SOAP 1.1"):
        verify_envelope(etree.tostring(soap12), grid_pki.trust())


def test_comments_in_signed_messages_are_refused(grid_pki):
    data = sign_envelope(echo_envelope("abc"), grid_pki.alice.proxy)
    # a comment does not change the exclusive c14n digest, so it would otherwise slip through
    data = data.replace(b">abc<", b">ab<!-- hidden -->c<")
    with pytest.raises(InvalidSecurity, match="comments"):
        verify_envelope(data, grid_pki.trust())


@pytest.mark.parametrize("make", [MemoryReplayCache, SQLiteReplayCache], ids=["memory", "sqlite"])
def test_replay_cache_forgets_after_the_horizon(make, tmp_path):
    cache = make(tmp_path) if make is SQLiteReplayCache else make()
    assert cache.first_seen(b"a", time.time() + 60)
    assert not cache.first_seen(b"a", time.time() + 60)
    assert cache.first_seen(b"b", time.time() - 1)          # recorded already expired ...
    assert cache.first_seen(b"b", time.time() + 60)         # ... so it is new again
    assert not cache.first_seen(b"b", time.time() + 60)


def test_must_understand_violations():
    env = echo_envelope()
    header = etree.Element(Q_HEADER)
    env.insert(0, header)
    sec = etree.SubElement(header, Q_SECURITY)
    sec.set(f"{{{SOAP11}}}mustUnderstand", "1")
    other = etree.SubElement(header, "{urn:o}Other")
    other.set(f"{{{SOAP11}}}mustUnderstand", "1")
    elsewhere = etree.SubElement(header, "{urn:o}ForSomeoneElse")
    elsewhere.set(f"{{{SOAP11}}}mustUnderstand", "1")
    elsewhere.set(f"{{{SOAP11}}}actor", "urn:another-node")
    assert must_understand_violations(env, []) == ["{urn:o}Other"]
    assert must_understand_violations(env, ["{urn:o}Other"]) == []
    assert WSSE in Q_SECURITY


def test_application_id_attributes_do_not_disturb_verification(grid_pki):
    """Payloads may carry their own (even repeated) id attributes; only references must be unambiguous."""
    env = echo_envelope("x")
    echo = env.find(f".//{{{ECHO_NS}}}Echo")
    for _ in range(2):
        etree.SubElement(echo, "{urn:app}disk", id="1")
    caller, _ = verify_envelope(sign_envelope(env, grid_pki.alice.proxy), grid_pki.trust())
    assert caller.dn == grid_pki.alice.dn


def test_a_referenced_value_carried_by_another_id_attribute_is_ambiguous(grid_pki):
    root = sign_in_place(echo_envelope("x"), grid_pki.alice.proxy)
    body_id = root.find("{http://schemas.xmlsoap.org/soap/envelope/}Body").get(
        "{http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd}Id")
    etree.SubElement(root.find(f".//{{{ECHO_NS}}}Echo"), "{urn:app}decoy", ID=body_id)
    with pytest.raises(InvalidSecurity, match="duplicate Id"):
        verify_envelope(etree.tostring(root), grid_pki.trust())


def test_ecdsa_p256_credentials_sign_and_verify(grid_pki):
    """An EC P-256 user and its EC proxy sign with ecdsa-sha256; the verifier checks the signature like RSA's."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from security.pki import make_proxy, new_key
    from security.wssec import ECDSA_SHA256

    user = grid_pki.ca.issue_user("erin-ec", key=new_key(kind="ec"))
    proxy = make_proxy(user, hours=1)
    assert isinstance(proxy.private_key, ec.EllipticCurvePrivateKey)      # the issuer's key type by default
    data = sign_envelope(echo_envelope("ec"), proxy)
    root = etree.fromstring(data)
    assert root.find(f".//{{{DS}}}SignatureMethod").get("Algorithm") == ECDSA_SHA256
    caller, _ = verify_envelope(data, grid_pki.trust())
    assert caller.dn == user.subject and caller.is_proxy
    # the signature value is r || s (64 bytes for P-256); one flipped bit fails the check
    value = root.find(f".//{{{DS}}}SignatureValue")
    raw = bytearray(base64.b64decode(value.text))
    assert len(raw) == 64
    raw[5] ^= 1
    value.text = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(FailedCheck):
        verify_envelope(etree.tostring(root), grid_pki.trust())


def test_an_ecdsa_signature_rewritten_in_another_valid_form_is_still_a_replay(grid_pki):
    """Anyone holding an ECDSA-signed message can write its signature (r, s) as (r, n - s), or in DER: each still
    verifies. The replay cache keys on what was signed, so each form is refused as a replay of the first; a fresh
    cache takes the DER form (what gSOAP's wsse plugin writes) and refuses DER that is not exactly (r, s)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from security.pki import make_proxy, new_key
    from security.wssec import InvalidSecurity

    user = grid_pki.ca.issue_user("erin-ec-replay", key=new_key(kind="ec"))
    data = sign_envelope(echo_envelope("once"), make_proxy(user, hours=1))
    root = etree.fromstring(data)
    value = root.find(f".//{{{DS}}}SignatureValue")
    raw = base64.b64decode(value.text)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551        # the order of P-256
    forms = {"high-s": r.to_bytes(32, "big") + (n - s).to_bytes(32, "big"), "der": encode_dss_signature(r, s)}
    cache = MemoryReplayCache()
    assert verify_envelope(data, grid_pki.trust(), replay=cache)[0].dn == user.subject
    for name, form in forms.items():
        value.text = base64.b64encode(form).decode()
        with pytest.raises(InvalidSecurity, match="replayed"):
            verify_envelope(etree.tostring(root), grid_pki.trust(), replay=cache)
        assert verify_envelope(etree.tostring(root), grid_pki.trust(), replay=MemoryReplayCache())[0].dn \
            == user.subject, name
    value.text = base64.b64encode(forms["der"] + b"\0").decode()                # DER with a byte after it
    with pytest.raises(FailedCheck):
        verify_envelope(etree.tostring(root), grid_pki.trust(), replay=MemoryReplayCache())
    assert isinstance(user.private_key, ec.EllipticCurvePrivateKey)


def test_the_same_signed_info_from_another_key_is_not_a_replay(grid_pki):
    """A client whose Timestamp has whole seconds and whose Ids are fixed (node-soap) signs byte-identical SignedInfo
    for the same request sent twice in one second, with alice's certificate and then with her proxy. The second is
    a new message from another key, not a replay; the same message again from either key is one."""
    from security.wssec import X509PKIPATH, pkipath

    first = sign_in_place(echo_envelope("same"), grid_pki.alice.credential)
    second = etree.fromstring(etree.tostring(first))
    signed_info = second.find(f".//{{{DS}}}SignedInfo")
    second.find(f".//{{{DS}}}SignatureValue").text = base64.b64encode(
        _raw_signature(grid_pki.alice.proxy.private_key, c14n(signed_info))).decode()
    token = second.find(f".//{Q_BST}")
    token.set("ValueType", X509PKIPATH)
    token.text = base64.b64encode(pkipath(reversed(grid_pki.alice.proxy.certificates))).decode()
    cache = MemoryReplayCache()
    assert not verify_envelope(etree.tostring(first), grid_pki.trust(), replay=cache)[0].is_proxy
    assert verify_envelope(etree.tostring(second), grid_pki.trust(), replay=cache)[0].is_proxy
    for again in (first, second):
        with pytest.raises(InvalidSecurity, match="replayed"):
            verify_envelope(etree.tostring(again), grid_pki.trust(), replay=cache)


def test_a_signature_method_that_does_not_match_the_key_fails(grid_pki):
    """An RSA key's signature relabelled as ecdsa-sha256 (or the reverse) is refused, not misread."""
    from security.wssec import ECDSA_SHA256

    root = etree.fromstring(sign_envelope(echo_envelope("x"), grid_pki.bob.proxy))
    root.find(f".//{{{DS}}}SignatureMethod").set("Algorithm", ECDSA_SHA256)
    with pytest.raises(FailedCheck):
        verify_envelope(etree.tostring(root), grid_pki.trust())


@pytest.mark.parametrize("body_id", [None, "body 1&<x>"], ids=["fresh-ids", "caller-id-needing-escaping"])
def test_the_signer_s_canonical_texts_are_lxml_s_c14n(body_id, grid_pki):
    """The common signing path writes the Timestamp and SignedInfo as text and digests/signs that text as their
    exclusive c14n: it must be byte for byte what a verifier computes from the parsed message (an Id that needs
    escaping takes the general path, which canonicalizes with lxml)."""
    import hashlib

    from security.wssec import EXC_C14N, Q_ID, Q_TIMESTAMP, c14n
    env = echo_envelope("x")
    if body_id is not None:
        env.find(f"{{{SOAP11}}}Body").set(Q_ID, body_id)
    root = etree.fromstring(sign_envelope(env, grid_pki.alice.proxy))
    security = root.find(f"{Q_HEADER}/{Q_SECURITY}")
    signed_info = security.find(f"{Q_SIGNATURE}/{{{DS}}}SignedInfo")
    timestamp = security.find(Q_TIMESTAMP)
    ts_ref = signed_info.find(f"{{{DS}}}Reference[@URI='#{timestamp.get(Q_ID)}']")
    assert ts_ref.findtext(f"{{{DS}}}DigestValue") == base64.b64encode(hashlib.sha256(c14n(timestamp)).digest()).decode()
    assert signed_info.find(f"{{{DS}}}CanonicalizationMethod").get("Algorithm") == EXC_C14N
    value = base64.b64decode(security.findtext(f"{Q_SIGNATURE}/{{{DS}}}SignatureValue"))
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    grid_pki.alice.proxy.certificate.public_key().verify(value, c14n(signed_info), padding.PKCS1v15(), hashes.SHA256())
    assert verify_envelope(etree.tostring(root), grid_pki.trust())[0].dn == grid_pki.alice.dn


def test_sign_envelope_writes_the_signature_into_the_bytes_only(grid_pki):
    """sign_envelope serializes once: the Security text goes into the bytes as written, the tree keeps the wsu:Ids it
    was given and no signature, so it can still be signed in place (before, the tree was signed and a second
    signature was refused)."""
    env = echo_envelope("once")
    data = sign_envelope(env, grid_pki.alice.proxy)
    assert verify_envelope(data, grid_pki.trust())[0].dn == grid_pki.alice.dn
    assert env.find(f"{Q_HEADER}/{Q_SECURITY}") is None
    sent_body_id = etree.fromstring(data).find(f"{{{SOAP11}}}Body").get(Q_ID)
    assert env.find(f"{{{SOAP11}}}Body").get(Q_ID) == sent_body_id
    sign_in_place(env, grid_pki.alice.proxy)
    assert verify_envelope(etree.tostring(env), grid_pki.trust())[0].dn == grid_pki.alice.dn


def _resign(root: etree._Element, credential) -> bytes:
    """The message with its SignatureValue computed again over SignedInfo as it now stands."""
    signed_info = root.find(f".//{{{DS}}}SignedInfo")
    value = root.find(f".//{{{DS}}}SignatureValue")
    value.text = base64.b64encode(_raw_signature(credential.private_key, c14n(signed_info))).decode()
    return etree.tostring(root)


def test_signed_info_in_another_form_is_read_from_its_elements(grid_pki):
    """The verifier reads SignedInfo from its canonical bytes when it has the signer's form, and from its elements
    otherwise (other stacks indent it): both verify, and both refuse two references to one element."""
    root = etree.fromstring(sign_envelope(echo_envelope("form"), grid_pki.alice.proxy))
    signed_info = root.find(f".//{{{DS}}}SignedInfo")
    assert _references_from_c14n(c14n(signed_info), _ids(root), SecurityPolicy()) is not None
    for el in signed_info:
        el.tail = "\n  "                     # whitespace between the elements: not the signer's form
    assert _references_from_c14n(c14n(signed_info), _ids(root), SecurityPolicy()) is None
    assert verify_envelope(_resign(root, grid_pki.alice.proxy), grid_pki.trust())[0].dn == grid_pki.alice.dn
    for indented in (False, True):
        root = etree.fromstring(sign_envelope(echo_envelope("twice"), grid_pki.alice.proxy))
        signed_info = root.find(f".//{{{DS}}}SignedInfo")
        refs = signed_info.findall(f"{{{DS}}}Reference")
        refs[0].set("URI", refs[-1].get("URI"))       # two references to the Body
        if indented:
            signed_info[0].tail = "\n"
        with pytest.raises(InvalidSecurity, match="two references to the same element"):
            verify_envelope(_resign(root, grid_pki.alice.proxy), grid_pki.trust())


def test_a_token_is_decoded_and_checked_whenever_its_text_is_new(grid_pki):
    """The trust cache is keyed on the BinarySecurityToken's text, so a chain validated once is not decoded again:
    a changed text (not base64, or another chain) is a miss, decoded and checked as before; whitespace inside the
    text is not part of the key (the same DER)."""
    from security.wssec import SecurityTokenUnavailable
    trust = grid_pki.trust()
    data = sign_envelope(echo_envelope(), grid_pki.alice.proxy)
    assert verify_envelope(data, trust)[0].dn == grid_pki.alice.dn          # the chain is now cached

    root = etree.fromstring(data)
    bst = root.find(f"{Q_HEADER}/{Q_SECURITY}/{Q_BST}")
    text = bst.text
    bst.text = "\n".join(text[i:i + 64] for i in range(0, len(text), 64))    # the same DER, wrapped
    assert verify_envelope(etree.tostring(root), trust)[0].dn == grid_pki.alice.dn

    bst.text = text[:-4] + "!!!!"                                            # not base64: refused, cached or not
    with pytest.raises(SecurityTokenUnavailable, match="not base64"):
        verify_envelope(etree.tostring(root), trust)

    bst.text = base64.b64encode(b"\x30\x03\x02\x01\x00").decode()            # base64, but no certificate
    with pytest.raises(SecurityTokenUnavailable, match="unreadable certificate token"):
        verify_envelope(etree.tostring(root), trust)

    bob = sign_envelope(echo_envelope(), grid_pki.bob.proxy)                 # bob's token, cached too
    verify_envelope(bob, trust)
    bst.text = etree.fromstring(bob).find(f"{Q_HEADER}/{Q_SECURITY}/{Q_BST}").text
    with pytest.raises(FailedCheck):                                          # alice's signature, bob's key
        verify_envelope(etree.tostring(root), trust)


def test_the_token_written_follows_the_credential_s_own_certificates(grid_pki):
    """The signer reuses a credential's token text by the identity of its certificate objects: the same leaf with
    another chain (or none) writes its own token."""
    from security.pki import Credential
    from security.wssec import X509PKIPATH, X509V3, _LazyChain
    proxy = grid_pki.alice.proxy

    def token(cred, **kwargs):
        root = etree.fromstring(sign_envelope(echo_envelope(), cred, **kwargs))
        bst = root.find(f"{Q_HEADER}/{Q_SECURITY}/{Q_BST}")
        return bst.get("ValueType"), _LazyChain(bst.get("ValueType"), None, text=bst.text).certificates()

    assert token(proxy) == (X509PKIPATH, list(proxy.certificates))
    alone = Credential(proxy.certificate, proxy.private_key, ())
    assert token(alone, token="X509PKIPathv1") == (X509PKIPATH, [proxy.certificate])
    assert token(alone) == (X509V3, [proxy.certificate])
    assert token(proxy) == (X509PKIPATH, list(proxy.certificates))
