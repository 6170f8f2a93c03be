"""WS-Security refusals a client developer can act on, and what the WS-I Basic Security Profile allows:
each message here is really signed (re-signed by `resign` after an edit, the way another stack would
sign it) and verified by security.wssec."""
from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from lxml import etree

from security.wssec import (DS, ENVELOPED, EXC_C14N, Q_BODY, Q_BST, Q_KEY_INFO, Q_SIGNATURE, Q_SIGNATURE_VALUE,
                            Q_SIGNED_INFO, WSSE, X509V3, FailedAuthentication, FailedCheck, InvalidSecurity,
                            SecurityTokenUnavailable, sign_in_place, verify_envelope)
from services.container.soap import envelope

RP = "http://docs.oasis-open.org/wsrf/rp-2"
VMM = "http://vmgrid.org/ns/vmmanager/1"
SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
SHA1 = "http://www.w3.org/2000/09/xmldsig#sha1"
RSA_SHA1 = "http://www.w3.org/2000/09/xmldsig#rsa-sha1"
_HASHES = {SHA256: hashlib.sha256, SHA1: hashlib.sha1}


def _targets(root):
    ids = {el.get(f"{{{'http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd'}}}Id"): el
           for el in root.iter() if isinstance(el.tag, str)}
    return ids


def resign(root, credential, *, rsa_sha1: bool = False):
    """Recompute every reference digest (by its DigestMethod, over exclusive c14n with its PrefixList) and the
    SignatureValue after the SignedInfo or the message was edited."""
    ids = _targets(root)
    signature = root.find(f".//{Q_SIGNATURE}")
    signed_info = signature.find(Q_SIGNED_INFO)
    for ref in signed_info.findall(f"{{{DS}}}Reference"):
        target = ids[ref.get("URI")[1:]]
        incl = ref.find(f".//{{{EXC_C14N}}}InclusiveNamespaces")
        prefixes = incl.get("PrefixList").split() if incl is not None else None
        c14n = etree.tostring(target, method="c14n", exclusive=True, inclusive_ns_prefixes=prefixes)
        alg = ref.find(f"{{{DS}}}DigestMethod").get("Algorithm")
        ref.find(f"{{{DS}}}DigestValue").text = base64.b64encode(_HASHES[alg](c14n).digest()).decode()
    if rsa_sha1:
        signed_info.find(f"{{{DS}}}SignatureMethod").set("Algorithm", RSA_SHA1)
    c14n = etree.tostring(signed_info, method="c14n", exclusive=True)
    value = credential.private_key.sign(c14n, padding.PKCS1v15(), hashes.SHA1() if rsa_sha1 else hashes.SHA256())
    signature.find(Q_SIGNATURE_VALUE).text = base64.b64encode(value).decode()
    return etree.fromstring(etree.tostring(root))


def signed(credential, payload=None, **kwargs):
    payload = payload if payload is not None else etree.Element(f"{{{VMM}}}ListInstances")
    root = envelope(payload)
    sign_in_place(root, credential, **kwargs)
    return etree.fromstring(etree.tostring(root))


def body_reference(root):
    body_id = root.find(Q_BODY).get("{http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd}Id")
    return root.find(f".//{{{DS}}}Reference[@URI='#{body_id}']")


def test_an_unedited_resign_verifies(grid_pki):
    root = resign(signed(grid_pki.alice.proxy), grid_pki.alice.proxy)
    caller, _ = verify_envelope(root, grid_pki.trust())
    assert caller.dn == grid_pki.alice.dn


def test_the_enveloped_signature_transform_is_accepted_where_it_removes_nothing(grid_pki):
    root = signed(grid_pki.alice.proxy)
    transforms = body_reference(root).find(f"{{{DS}}}Transforms")
    enveloped = etree.Element(f"{{{DS}}}Transform", Algorithm=ENVELOPED)
    transforms.insert(0, enveloped)                  # node-soap's default: enveloped-signature, then exc-c14n
    caller, _ = verify_envelope(resign(root, grid_pki.alice.proxy), grid_pki.trust())
    assert caller.dn == grid_pki.alice.dn


@pytest.mark.parametrize("algorithm,name", [
    ("http://www.w3.org/TR/1999/REC-xpath-19991116", "XPath"),
    ("http://www.w3.org/TR/1999/REC-xslt-19991116", "XSLT"),
    ("http://www.w3.org/2002/06/xmldsig-filter2", "XPath Filter 2.0"),
    ("http://www.w3.org/TR/2001/REC-xml-c14n-20010315", "inclusive c14n"),
])
def test_other_transforms_are_refused_by_name(grid_pki, algorithm, name):
    root = signed(grid_pki.alice.proxy)
    body_reference(root).find(f"{{{DS}}}Transforms/{{{DS}}}Transform").set("Algorithm", algorithm)
    with pytest.raises(InvalidSecurity) as err:
        verify_envelope(resign(root, grid_pki.alice.proxy), grid_pki.trust())
    assert f"the {name} transform" in err.value.reason and EXC_C14N in err.value.reason


def test_enveloped_signature_alone_is_refused(grid_pki):
    root = signed(grid_pki.alice.proxy)
    body_reference(root).find(f"{{{DS}}}Transforms/{{{DS}}}Transform").set("Algorithm", ENVELOPED)
    with pytest.raises(InvalidSecurity, match="optionally after enveloped-signature"):
        verify_envelope(resign(root, grid_pki.alice.proxy), grid_pki.trust())


def test_sha1_digests_and_signatures_are_refused_saying_what_is_accepted(grid_pki):
    root = signed(grid_pki.alice.proxy)
    body_reference(root).find(f"{{{DS}}}DigestMethod").set("Algorithm", SHA1)
    with pytest.raises(InvalidSecurity) as err:
        verify_envelope(resign(root, grid_pki.alice.proxy), grid_pki.trust())
    assert "SHA-1 digests are refused" in err.value.reason and SHA256 in err.value.reason
    with pytest.raises(InvalidSecurity) as err:
        verify_envelope(resign(signed(grid_pki.alice.proxy), grid_pki.alice.proxy, rsa_sha1=True), grid_pki.trust())
    assert "RSA-SHA1 signatures are refused" in err.value.reason and "rsa-sha256" in err.value.reason


def test_a_proxy_sent_alone_is_told_to_send_the_chain(grid_pki):
    with pytest.raises(FailedAuthentication) as err:
        verify_envelope(signed(grid_pki.alice.proxy, token="X509v3"), grid_pki.trust())
    assert "X509PKIPathv1" in err.value.reason and "useSingleCertificate=false" in err.value.reason


def _str_with(root, build):
    """Replace the KeyInfo's SecurityTokenReference content by `build(str_el)` (the BST stays unreferenced)."""
    key_info = root.find(f".//{Q_KEY_INFO}")
    str_el = key_info[0]
    for child in list(str_el):
        str_el.remove(child)
    build(str_el)
    return root


@pytest.mark.parametrize("value_type,what", [
    ("http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509SubjectKeyIdentifier",
     "SubjectKeyIdentifier"),
    ("http://docs.oasis-open.org/wss/oasis-wss-soap-message-security-1.1#ThumbprintSHA1", "thumbprint"),
])
def test_key_identifiers_pointing_outside_the_message_are_told_to_send_a_token(grid_pki, value_type, what):
    def build(str_el):
        ki = etree.SubElement(str_el, f"{{{WSSE}}}KeyIdentifier", ValueType=value_type)
        ki.text = base64.b64encode(b"\x01" * 20).decode()

    with pytest.raises(SecurityTokenUnavailable) as err:
        verify_envelope(_str_with(signed(grid_pki.alice.credential), build), grid_pki.trust())
    assert what in err.value.reason and "outside the message" in err.value.reason
    assert "BinarySecurityToken" in err.value.reason


def test_an_issuer_serial_is_told_to_send_a_token(grid_pki):
    def build(str_el):
        data = etree.SubElement(str_el, f"{{{DS}}}X509Data")
        ids = etree.SubElement(data, f"{{{DS}}}X509IssuerSerial")
        etree.SubElement(ids, f"{{{DS}}}X509IssuerName").text = "CN=Example Grid CA"
        etree.SubElement(ids, f"{{{DS}}}X509SerialNumber").text = "7"

    with pytest.raises(SecurityTokenUnavailable, match="IssuerSerial.*outside the message"):
        verify_envelope(_str_with(signed(grid_pki.alice.credential), build), grid_pki.trust())


def test_a_key_identifier_carrying_the_certificate_is_accepted(grid_pki):
    cred = grid_pki.alice.credential

    def build(str_el):
        ki = etree.SubElement(str_el, f"{{{WSSE}}}KeyIdentifier", ValueType=X509V3)
        ki.text = base64.b64encode(cred.certificate.public_bytes(serialization.Encoding.DER)).decode()

    root = _str_with(signed(cred), build)
    bst = root.find(f".//{Q_BST}")
    bst.getparent().remove(bst)
    caller, _ = verify_envelope(root, grid_pki.trust())
    assert caller.dn == grid_pki.alice.dn


def _get_property(prefix: str = "vmm") -> etree._Element:
    el = etree.Element(f"{{{RP}}}GetResourceProperty", nsmap={"wsrf-rp": RP, prefix: VMM})
    el.text = f"{prefix}:State"
    return el


def test_qname_content_is_signed_through_the_prefix_list(grid_pki):
    root = signed(grid_pki.alice.proxy, _get_property())
    incl = body_reference(root).find(f".//{{{EXC_C14N}}}InclusiveNamespaces")
    assert incl is not None and incl.get("PrefixList").split() == ["vmm"]
    verify_envelope(root, grid_pki.trust())
    # the declaration the QName depends on is covered: rebinding vmm breaks the digest
    changed = etree.tostring(root).replace(f'xmlns:vmm="{VMM}"'.encode(), b'xmlns:vmm="urn:evil"')
    with pytest.raises(FailedCheck):
        verify_envelope(etree.fromstring(changed), grid_pki.trust())


def test_qname_content_declared_outside_the_body_and_not_listed_is_refused(grid_pki):
    root = signed(grid_pki.alice.proxy, _get_property())   # vmm is declared on the Envelope
    assert root.nsmap.get("vmm") == VMM
    incl = body_reference(root).find(f".//{{{EXC_C14N}}}InclusiveNamespaces")
    incl.getparent().remove(incl)
    with pytest.raises(InvalidSecurity) as err:
        verify_envelope(resign(root, grid_pki.alice.proxy), grid_pki.trust())
    assert "'vmm'" in err.value.reason and "PrefixList" in err.value.reason


def test_qname_content_declared_inside_the_body_is_accepted_without_a_prefix_list(grid_pki):
    payload = _get_property("p")                # a prefix no convention moves to the Envelope
    root = signed(grid_pki.alice.proxy, payload)
    assert root.find(Q_BODY)[0].nsmap.get("p") == VMM and "p" not in root.nsmap
    incl = body_reference(root).find(f".//{{{EXC_C14N}}}InclusiveNamespaces")
    incl.getparent().remove(incl)
    verify_envelope(resign(root, grid_pki.alice.proxy), grid_pki.trust())
