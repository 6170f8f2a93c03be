"""WS-Security (OASIS WSS 1.1, X.509 token profile) signing and verification of SOAP 1.1 envelopes: the
ds:Signature is written and checked here over lxml's exclusive c14n and `cryptography` (signxml supplies the
algorithm identifiers; its signer cost more than the RSA signature).

Stable API (usable without zeep, e.g. for node-to-node calls and WS-BaseNotification):

    data: bytes = sign_envelope(envelope_root, credential)             # the bytes to send (the tree gets the wsu:Ids)
    sign_in_place(envelope_root, credential)                           # a signed tree (for zeep)
    caller, root = verify_envelope(data_or_root, trust, replay=cache)   # raises WSSecurityError subclasses

A signed message carries in `wsse:Security` (mustUnderstand) a BinarySecurityToken (X509v3 for a certificate,
X509PKIPathv1 for a proxy chain), a `wsu:Timestamp`, and a `ds:Signature` (exclusive c14n, RSA-SHA256 or, for an
EC P-256 key, ECDSA-SHA256; SHA-256 digests) whose references cover the Body, the Timestamp and every other header
block. The verifier refuses signature wrapping: every reference must resolve, by a unique `wsu:Id`, to exactly the
Body, Timestamp and headers that are dispatched.
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import functools
import hashlib
import hmac
import html
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

import cryptography.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from lxml import etree
from signxml.algorithms import DigestAlgorithm, SignatureMethod

from . import safexml
from .pki import Credential, der_items
from .replay import ReplayCache
from .trust import MAX_CHAIN, Caller, ChainError, TrustStore

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
DS = "http://www.w3.org/2000/09/xmldsig#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
X509V3 = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509v3"
X509PKIPATH = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509PKIPathv1"
BASE64 = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-soap-message-security-1.0#Base64Binary"
ACTOR_NEXT = "http://schemas.xmlsoap.org/soap/actor/next"

Q_ENVELOPE, Q_HEADER, Q_BODY = (f"{{{SOAP11}}}{n}" for n in ("Envelope", "Header", "Body"))
Q_MUST_UNDERSTAND, Q_ACTOR = f"{{{SOAP11}}}mustUnderstand", f"{{{SOAP11}}}actor"
Q_SECURITY, Q_BST, Q_STR, Q_REFERENCE = (f"{{{WSSE}}}{n}" for n in
                                         ("Security", "BinarySecurityToken", "SecurityTokenReference", "Reference"))
Q_TIMESTAMP, Q_CREATED, Q_EXPIRES, Q_ID = (f"{{{WSU}}}{n}" for n in ("Timestamp", "Created", "Expires", "Id"))
Q_SIGNATURE, Q_SIGNED_INFO, Q_SIGNATURE_VALUE, Q_KEY_INFO = (f"{{{DS}}}{n}" for n in
                                                             ("Signature", "SignedInfo", "SignatureValue", "KeyInfo"))
Q_X509DATA, Q_X509CERT = f"{{{DS}}}X509Data", f"{{{DS}}}X509Certificate"
NSMAP = {"soap": SOAP11, "wsse": WSSE, "wsu": WSU, "ds": DS}

ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
# Transforms refused by name, with what to use instead (WS-I BSP allows them; vmgrid does not need them).
REFUSED_TRANSFORMS = {
    "http://www.w3.org/TR/1999/REC-xpath-19991116": "XPath",
    "http://www.w3.org/TR/1999/REC-xslt-19991116": "XSLT",
    "http://www.w3.org/2002/06/xmldsig-filter2": "XPath Filter 2.0",
    "http://www.w3.org/TR/2001/REC-xml-c14n-20010315": "inclusive c14n",
    "http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments": "inclusive c14n with comments",
    "http://www.w3.org/2006/12/xml-c14n11": "c14n 1.1",
    "http://www.w3.org/2006/12/xml-c14n11#WithComments": "c14n 1.1 with comments",
    "http://www.w3.org/2001/10/xml-exc-c14n#WithComments": "exclusive c14n with comments",
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-soap-message-security-1.0#STR-Transform":
        "STR-Transform",
}
SHA1_DIGEST = "http://www.w3.org/2000/09/xmldsig#sha1"
RSA_SHA1 = "http://www.w3.org/2000/09/xmldsig#rsa-sha1"
# Elements whose text is a QName (WS-ResourceProperties property names): its prefix must be signed too, by
# listing it in the Body reference's InclusiveNamespaces PrefixList (exclusive c14n leaves a namespace
# declaration that no element or attribute name uses out of the digest, so it could be changed unseen).
WSRF_RP = "http://docs.oasis-open.org/wsrf/rp-2"
QNAME_CONTENT = frozenset({f"{{{WSRF_RP}}}GetResourceProperty", f"{{{WSRF_RP}}}ResourceProperty"})
# Key identifiers naming a certificate the message does not carry.
_KEY_IDENTIFIER_NAMES = {
    "X509SubjectKeyIdentifier": "a SubjectKeyIdentifier", "ThumbprintSHA1": "a SHA-1 thumbprint",
    "X509IssuerSerial": "an IssuerSerial",
}
_ACCEPTED = ("send the certificate (or the proxy chain as an X509PKIPathv1 token) as a wsse:BinarySecurityToken in "
             "wsse:Security and point to it with wsse:Reference (WSS4J: keyIdentifierType=DirectReference; "
             "gSOAP: soap_wsse_add_BinarySecurityTokenX509 + soap_wsse_add_KeyInfo_SecurityTokenReferenceX509)")

_SIGNATURE_METHODS: dict[str, tuple[type, type]] = {
    SignatureMethod.RSA_SHA256.value: (rsa.RSAPublicKey, hashes.SHA256),
    SignatureMethod.RSA_SHA384.value: (rsa.RSAPublicKey, hashes.SHA384),
    SignatureMethod.RSA_SHA512.value: (rsa.RSAPublicKey, hashes.SHA512),
    SignatureMethod.ECDSA_SHA256.value: (ec.EllipticCurvePublicKey, hashes.SHA256),
    SignatureMethod.ECDSA_SHA384.value: (ec.EllipticCurvePublicKey, hashes.SHA384),
    SignatureMethod.ECDSA_SHA512.value: (ec.EllipticCurvePublicKey, hashes.SHA512),
}


# ---------------------------------------------------------------------------------------------
# Errors: each is one WSS fault code

class WSSecurityError(Exception):
    """A message failed WS-Security processing. `faultcode` is the local name of the WSS fault QName (in the
    wsse namespace); `reason` is the faultstring."""
    faultcode: ClassVar[str] = "InvalidSecurity"

    def __init__(self, reason: str):
        super().__init__(f"wsse:{self.faultcode}: {reason}")
        self.reason = reason

    @property
    def qname(self) -> etree.QName:
        return etree.QName(WSSE, self.faultcode)


class InvalidSecurity(WSSecurityError):
    """Unsigned, malformed, wrapped, replayed, or using an unsupported algorithm."""
    faultcode = "InvalidSecurity"


class FailedCheck(WSSecurityError):
    """The signature or a reference digest does not verify: the message was changed."""
    faultcode = "FailedCheck"


class MessageExpired(WSSecurityError):
    """The Timestamp is expired, older than the freshness window, or dated in the future beyond the clock skew."""
    faultcode = "MessageExpired"


class SecurityTokenUnavailable(WSSecurityError):
    """The signing certificate is missing, or the key reference cannot be resolved."""
    faultcode = "SecurityTokenUnavailable"


class FailedAuthentication(WSSecurityError):
    """The signer's certificate chain is not trusted: unknown CA, revoked, expired, bad proxy, or unexpected signer."""
    faultcode = "FailedAuthentication"


FAULTS: dict[str, type[WSSecurityError]] = {c.faultcode: c for c in (
    InvalidSecurity, FailedCheck, MessageExpired, SecurityTokenUnavailable, FailedAuthentication)}


@dataclass(frozen=True)
class SecurityPolicy:
    """Verification settings. `clock_skew`: how far a Created may lie in the future and an Expires in the past;
    `max_age`: the freshness window (older messages are refused even if their Expires is later; the replay cache
    keeps entries this long); `limits`: the hardened parser's limits."""
    clock_skew: _dt.timedelta = _dt.timedelta(seconds=60)
    max_age: _dt.timedelta = _dt.timedelta(seconds=300)
    max_references: int = 32
    limits: safexml.Limits = field(default_factory=safexml.Limits)


DEFAULT_POLICY = SecurityPolicy()


# ---------------------------------------------------------------------------------------------
# Signing

# The ds:Signature is built here directly (the same elements, attributes and order signxml's XMLSigner writes for
# a detached signature with exclusive c14n): signxml resolves each reference with an XPath over the whole document
# and builds its elements through dataclass copies, which cost more than the RSA signature itself.
Q_C14N_METHOD, Q_SIGNATURE_METHOD, Q_REFERENCE_DS = (f"{{{DS}}}{n}" for n in
                                                     ("CanonicalizationMethod", "SignatureMethod", "Reference"))
Q_TRANSFORMS, Q_TRANSFORM, Q_DIGEST_METHOD, Q_DIGEST_VALUE = (
    f"{{{DS}}}{n}" for n in ("Transforms", "Transform", "DigestMethod", "DigestValue"))
Q_INCLUSIVE_NAMESPACES = f"{{{EXC_C14N}}}InclusiveNamespaces"
RSA_SHA256 = SignatureMethod.RSA_SHA256.value
ECDSA_SHA256 = SignatureMethod.ECDSA_SHA256.value
SHA256_DIGEST = DigestAlgorithm.SHA256.value
_DIGESTS = {DigestAlgorithm.SHA256.value: hashlib.sha256, DigestAlgorithm.SHA384.value: hashlib.sha384,
           DigestAlgorithm.SHA512.value: hashlib.sha512}


def c14n(el: etree._Element, inclusive_prefixes: list[str] | None = None) -> bytes:
    """Exclusive XML canonicalization 1.0 (without comments) of `el` and its subtree."""
    return etree.tostring(el, method="c14n", exclusive=True, with_comments=False,
                          inclusive_ns_prefixes=inclusive_prefixes)


@functools.lru_cache(maxsize=16)
def _key_method(key_type: type) -> str | None:
    """The SignatureMethod a private key's class signs with (cached per class: isinstance against the abstract key
    classes costs more than the lookup)."""
    if issubclass(key_type, rsa.RSAPrivateKey):
        return RSA_SHA256
    if issubclass(key_type, ec.EllipticCurvePrivateKey):
        return ECDSA_SHA256
    return None


def _signature_method(key) -> str:
    method = _key_method(type(key))
    if method is None:
        raise InvalidSecurity(f"cannot sign with a {type(key).__name__} (RSA and EC P-256 keys can)")
    return method


def _raw_signature(key, data: bytes) -> bytes:
    """RSA PKCS#1 v1.5 with SHA-256, or ECDSA with SHA-256 as XML DSig writes it (r || s, each the curve's size)."""
    if _signature_method(key) == RSA_SHA256:
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    r, s_ = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s_.to_bytes(size, "big")


def _signature(references: list[tuple[str, list[str] | None]], targets: list[etree._Element], key,
               token_id: str, token_type: str) -> etree._Element:
    """A ds:Signature over `targets` (exclusive c14n, SHA-256 digests) with a KeyInfo pointing to the token.
    Written as text and parsed once (our own text: no untrusted input reaches this parser unescaped), which is
    several times cheaper than building its thirty-odd elements one by one."""
    refs = []
    for (uri, prefixes), target in zip(references, targets):
        digest = base64.b64encode(hashlib.sha256(c14n(target, prefixes)).digest()).decode()
        inclusive = (f'<ns0:InclusiveNamespaces xmlns:ns0="{EXC_C14N}" PrefixList="{_attr(" ".join(prefixes))}"/>'
                     if prefixes else "")
        refs.append(f'<ds:Reference URI="{_attr(uri)}"><ds:Transforms><ds:Transform Algorithm="{EXC_C14N}">'
                    f'{inclusive}</ds:Transform></ds:Transforms><ds:DigestMethod Algorithm="{SHA256_DIGEST}"/>'
                    f'<ds:DigestValue>{digest}</ds:DigestValue></ds:Reference>')
    text = (f'<ds:Signature xmlns:ds="{DS}"><ds:SignedInfo><ds:CanonicalizationMethod Algorithm="{EXC_C14N}"/>'
            f'<ds:SignatureMethod Algorithm="{_signature_method(key)}"/>{"".join(refs)}</ds:SignedInfo>'
            f'<ds:SignatureValue></ds:SignatureValue><ds:KeyInfo><wsse:SecurityTokenReference xmlns:wsse="{WSSE}">'
            f'<wsse:Reference URI="#{_attr(token_id)}" ValueType="{_attr(token_type)}"/>'
            f'</wsse:SecurityTokenReference></ds:KeyInfo></ds:Signature>')
    sig = etree.fromstring(text, _template_parser())
    sig[1].text = base64.b64encode(_raw_signature(key, c14n(sig[0]))).decode()
    return sig


_ESCAPED = re.compile(r'[&<>"\']')


def _attr(value: str) -> str:
    return html.escape(value, quote=True) if _ESCAPED.search(value) else value


_templates = threading.local()


def _template_parser() -> etree.XMLParser:
    parser = getattr(_templates, "parser", None)
    if parser is None:
        parser = _templates.parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return parser


@functools.lru_cache(maxsize=64)
def _token_text(certificates: tuple[x509.Certificate, ...], use_path: bool) -> tuple[str, str]:
    """(ValueType, base64 text) of the BinarySecurityToken for a credential's certificates (leaf first); cached,
    a busy service signs every response with the same certificate."""
    if use_path:
        return X509PKIPATH, base64.b64encode(pkipath(reversed(certificates))).decode()
    return X509V3, base64.b64encode(_der(certificates[0])).decode()


_credential_tokens: dict[tuple[int, bool], tuple[x509.Certificate, tuple, tuple[str, str]]] = {}


def _credential_token(credential: Credential, use_path: bool) -> tuple[str, str]:
    """`_token_text` of a credential, found by the identity of its certificate objects instead of by hashing them
    (the lru_cache's key hashes every certificate of the chain on each message). The entry holds the certificate
    and chain it was made from, so an id is only trusted while those very objects are alive and unchanged."""
    cert, chain = credential.certificate, credential.chain
    hit = _credential_tokens.get((id(cert), use_path))
    if hit is not None and hit[0] is cert and hit[1] is chain:
        return hit[2]
    out = _token_text(credential.certificates if use_path else (cert,), use_path)
    if len(_credential_tokens) >= 64:
        _credential_tokens.clear()
    _credential_tokens[(id(cert), use_path)] = (cert, chain, out)
    return out


def _new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(16).hex()}"   # as unguessable as a uuid4, without building a UUID


def _ensure_id(el: etree._Element, prefix: str) -> str:
    value = el.get(Q_ID)
    if not value:
        value = _new_id(prefix)
        el.set(Q_ID, value)
    return value


def _utc(dt: _dt.datetime) -> str:
    return dt.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"   # without "+00:00"


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pkipath(certs_root_first: Iterable[x509.Certificate]) -> bytes:
    """DER of an X509PKIPathv1: SEQUENCE OF Certificate, the certificate nearest the trust anchor first."""
    body = b"".join(_der(c) for c in certs_root_first)
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return b"\x30" + length + body


def _security_header(envelope: etree._Element) -> etree._Element:
    header = _child(envelope, Q_HEADER)
    if header is None:
        header = etree.Element(Q_HEADER)
        envelope.insert(0, header)
    for sec in _children(header, Q_SECURITY):
        if sec.get(Q_ACTOR) in (None, ACTOR_NEXT):
            if _child(sec, Q_SIGNATURE) is not None:
                raise InvalidSecurity("the envelope is already signed")
            return sec
    sec = etree.Element(Q_SECURITY, nsmap={"wsse": WSSE, "wsu": WSU})
    sec.set(Q_MUST_UNDERSTAND, "1")
    header.append(sec)  # last, after the WS-Addressing headers it signs (gSOAP's verifier expects that order)
    return sec


def _declaring_wsu(el: etree._Element) -> etree._Element:
    """`el`, or a copy of it put in its place that declares the wsu prefix, so that the wsu:Id the signer adds is
    written `wsu:Id` rather than under an automatic `ns0` (one namespace under two prefixes in one message)."""
    if el.nsmap.get("wsu") == WSU:
        return el
    parent = el.getparent()
    own = {p: u for p, u in el.nsmap.items() if parent.nsmap.get(p) != u and p != "wsu"}
    copy = etree.SubElement(parent, el.tag, nsmap={**own, "wsu": WSU})  # in place: the parent's prefixes hold
    for name, value in el.attrib.items():
        copy.set(name, value)
    copy.text, copy.tail = el.text, el.tail
    copy.extend(list(el))
    parent.replace(el, copy)
    return copy


def sign_in_place(envelope: etree._Element, credential: Credential, *, ttl: float = 300.0,
                  now: _dt.datetime | None = None, token: str = "auto") -> etree._Element:
    """Add wsse:Security (BinarySecurityToken, Timestamp, Signature) to a SOAP 1.1 envelope, in place.

    token: "auto" (X509v3 for a lone certificate, X509PKIPathv1 when there is a chain), "X509v3" or "X509PKIPathv1".
    Never pretty-print the envelope afterwards: whitespace inside signed elements is signed."""
    if envelope.tag != Q_ENVELOPE:
        raise InvalidSecurity(f"not a SOAP 1.1 envelope: {envelope.tag}")
    body = _child(envelope, Q_BODY)
    if body is None:
        raise InvalidSecurity("the envelope has no Body")
    security = _security_header(envelope)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if len(security) == 0 and security.nsmap.get("wsse") == WSSE and security.nsmap.get("wsu") == WSU:
        if _sign_fresh(envelope, body, security, credential, ttl, now, token):
            return envelope
        body = _child(envelope, Q_BODY)

    timestamp = _child(security, Q_TIMESTAMP)
    if timestamp is None:
        timestamp = etree.Element(Q_TIMESTAMP, nsmap={"wsu": WSU})
        etree.SubElement(timestamp, Q_CREATED).text = _utc(now)
        etree.SubElement(timestamp, Q_EXPIRES).text = _utc(now + _dt.timedelta(seconds=ttl))
        security.insert(0, timestamp)
    _ensure_id(timestamp, "TS")

    use_path = bool(token == "X509PKIPathv1" or (token == "auto" and credential.chain))
    bst = etree.Element(Q_BST, nsmap={"wsse": WSSE, "wsu": WSU})
    bst.set("EncodingType", BASE64)
    value_type, bst.text = _token_text(credential.certificates if use_path else (credential.certificate,), use_path)
    bst.set("ValueType", value_type)
    bst_id = _ensure_id(bst, "X509")
    security.insert(security.index(timestamp) + 1, bst)

    targets = [el for el in _child(envelope, Q_HEADER) if isinstance(el.tag, str) and el is not security]
    targets = [_declaring_wsu(el) if el.get(Q_ID) is None else el for el in targets]
    targets += [timestamp, body if body.get(Q_ID) is not None else _declaring_wsu(body)]
    if _qname_prefixes(targets[-1]):
        targets[-1] = _reparsed(targets[-1])
    references = [("#" + _ensure_id(el, "id"), _qname_prefixes(el) or None) for el in targets]

    security.append(_signature(references, targets, credential.private_key, bst_id, bst.get("ValueType")))
    return envelope


# The common case (an empty wsse:Security that this module made): the Timestamp, the BinarySecurityToken and the
# Signature are written as one text and parsed once, and the exclusive c14n of the Timestamp and of SignedInfo are
# that text itself (written in canonical form: attributes in canonical order, no self-closing tags, values checked
# to need no escaping), so neither is built element by element nor canonicalized again. The digests of the header
# blocks and the Body are computed over the live tree as before. The same elements, attributes and order as the
# general path below; `tests/unit/security/test_security_wssec.py` checks the texts against lxml's c14n.
_SAFE_URI = re.compile(r"#[A-Za-z0-9_.\-]+\Z")
_SAFE_PREFIXES = re.compile(r"[A-Za-z0-9_.\- ]*\Z")
_TS_OPEN = f'<wsu:Timestamp xmlns:wsu="{WSU}" wsu:Id="'


def _canonical_reference(uri: str, prefixes: list[str] | None, digest: str) -> str:
    inclusive = (f'<ns0:InclusiveNamespaces xmlns:ns0="{EXC_C14N}" PrefixList="{" ".join(prefixes)}">'
                 f'</ns0:InclusiveNamespaces>' if prefixes else "")
    return (f'<ds:Reference URI="{uri}"><ds:Transforms><ds:Transform Algorithm="{EXC_C14N}">{inclusive}'
            f'</ds:Transform></ds:Transforms><ds:DigestMethod Algorithm="{SHA256_DIGEST}"></ds:DigestMethod>'
            f'<ds:DigestValue>{digest}</ds:DigestValue></ds:Reference>')


def _fresh_texts(envelope: etree._Element, body: etree._Element, security: etree._Element, credential: Credential,
                 ttl: float, now: _dt.datetime, token: str) -> str | None:
    """The children of an empty wsse:Security (declaring wsse and wsu) as one text: Timestamp (in canonical form),
    BinarySecurityToken and Signature. Sets the wsu:Ids of the header blocks and the Body. None (nothing signed yet,
    the Ids set so far kept) when a value the caller chose would need escaping."""
    seed = os.urandom(16).hex()          # one random value per message; each wsu:Id adds its own suffix
    header = security.getparent()
    blocks = [el for el in header if isinstance(el.tag, str) and el is not security]
    if any(el.get(Q_ID) is None for el in blocks) and header.nsmap.get("wsu") != WSU:
        header = _declaring_wsu(header)  # one copy of the Header declaring wsu, instead of one per block
        blocks = [el for el in header if isinstance(el.tag, str) and el is not security]
    targets = blocks + [body if body.get(Q_ID) is not None else _declaring_wsu(body)]
    body_prefixes = _qname_prefixes(targets[-1]) or None
    if body_prefixes:
        targets[-1] = _reparsed(targets[-1])
    refs = []
    chosen = False                      # a wsu:Id or a QName prefix the caller chose (ours need no escaping)
    last = len(targets) - 1
    for n, el in enumerate(targets):
        value = el.get(Q_ID)
        if value is None:
            value = f"id-{seed}-{n}"
            el.set(Q_ID, value)
        else:
            chosen = True
        prefixes = body_prefixes if n == last else (_qname_prefixes(el) or None)
        chosen = chosen or prefixes is not None
        refs.append(("#" + value, prefixes, base64.b64encode(hashlib.sha256(c14n(el, prefixes)).digest()).decode()))
    ts_id = f"TS-{seed}"
    timestamp = (f'{_TS_OPEN}{ts_id}"><wsu:Created>{_utc(now)}</wsu:Created><wsu:Expires>'
                 f'{_utc(now + _dt.timedelta(seconds=ttl))}</wsu:Expires></wsu:Timestamp>')
    refs.insert(len(blocks), ("#" + ts_id, None, base64.b64encode(hashlib.sha256(timestamp.encode()).digest()).decode()))
    if chosen and not all(_SAFE_URI.match(uri) and _SAFE_PREFIXES.match(" ".join(p or ())) for uri, p, _ in refs):
        return None      # a caller's wsu:Id or prefix that would need escaping: the general path
    key = credential.private_key
    signed_info = (f'<ds:SignedInfo xmlns:ds="{DS}"><ds:CanonicalizationMethod Algorithm="{EXC_C14N}">'
                   f'</ds:CanonicalizationMethod><ds:SignatureMethod Algorithm="{_signature_method(key)}">'
                   f'</ds:SignatureMethod>{"".join(_canonical_reference(*r) for r in refs)}</ds:SignedInfo>')
    value = base64.b64encode(_raw_signature(key, signed_info.encode())).decode()
    use_path = bool(token == "X509PKIPathv1" or (token == "auto" and credential.chain))
    value_type, token_text = _credential_token(credential, use_path)
    bst_id = f"X509-{seed}"
    text = (f'{timestamp}<wsse:BinarySecurityToken EncodingType="{BASE64}" ValueType="{value_type}" wsu:Id="{bst_id}">'
            f'{token_text}</wsse:BinarySecurityToken><ds:Signature xmlns:ds="{DS}">{signed_info}'
            f'<ds:SignatureValue>{value}</ds:SignatureValue><ds:KeyInfo><wsse:SecurityTokenReference>'
            f'<wsse:Reference URI="#{bst_id}" ValueType="{value_type}"/></wsse:SecurityTokenReference></ds:KeyInfo>'
            f'</ds:Signature>')
    return text


def _sign_fresh(envelope: etree._Element, body: etree._Element, security: etree._Element, credential: Credential,
                ttl: float, now: _dt.datetime, token: str) -> bool:
    """Sign an envelope whose wsse:Security is empty and declares wsse and wsu; False (nothing signed yet, the
    Ids set so far kept) when a value the caller chose would need escaping."""
    inner = _fresh_texts(envelope, body, security, credential, ttl, now, token)
    if inner is None:
        return False
    text = f'<wsse:Security xmlns:wsse="{WSSE}" xmlns:wsu="{WSU}">{inner}</wsse:Security>'
    security.extend(list(etree.fromstring(text, _template_parser())))
    return True


def _signed_bytes(envelope: etree._Element, credential: Credential, ttl: float, now: _dt.datetime | None,
                  token: str) -> bytes | None:
    """The bytes of the signed envelope, serialized once: the envelope is written with an empty wsse:Security into
    which the Security's text is put as written (not parsed into the tree and written out again). The tree keeps its
    new wsu:Ids, not the Security content. None when the envelope is not one this path handles (an existing
    wsse:Security, values that need escaping): the caller signs in place.
    (Writing the Body as its digested c14n too, to serialize it once, saved 3-5% of the non-RSA work of a
    QueryImages20 round trip, made the message larger and moved every namespace declaration into the Body: not done.)"""
    if envelope.tag != Q_ENVELOPE:
        return None
    body = _child(envelope, Q_BODY)
    header = _child(envelope, Q_HEADER)
    if body is None or (header is not None and _child(header, Q_SECURITY) is not None):
        return None
    security = _security_header(envelope)
    nsmap = security.nsmap                              # built anew on each read: read once
    if nsmap.get("wsse") != WSSE or nsmap.get("wsu") != WSU:
        security.getparent().remove(security)
        return None
    inner = _fresh_texts(envelope, body, security, credential, ttl, now or _dt.datetime.now(_dt.timezone.utc), token)
    if inner is None:
        security.getparent().remove(security)
        return None
    marker = f"vmgrid-{os.urandom(16).hex()}"       # unpredictable: it cannot occur in the envelope's own text
    security.text = marker
    try:
        data = etree.tostring(envelope, encoding="utf-8", xml_declaration=True)
    finally:
        security.getparent().remove(security)
    return data.replace(marker.encode(), inner.encode(), 1)


def _reparsed(el: etree._Element) -> etree._Element:
    """`el` replaced in place by a parsed copy of itself. libxml2's exclusive c14n leaves out an InclusiveNamespaces
    prefix declared by a tree built in memory (zeep's QName values) but renders it once parsed, as the receiver
    does: without this the digest would not match."""
    copy = etree.fromstring(etree.tostring(el), _own_parser())
    el.getparent().replace(el, copy)
    return copy


def _own_parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def _qname_prefixes(el: etree._Element) -> list[str]:
    """The prefixes the QName-valued text inside `el` uses (QNAME_CONTENT), in document order."""
    out: list[str] = []
    if len(el) == 0:                    # a leaf (WS-Addressing headers): no tag matcher to build
        return _qname_prefix_list(el) if el.tag in QNAME_CONTENT else out
    for node in el.iter(*QNAME_CONTENT):
        prefix = (node.text or "").strip().rpartition(":")[0]
        if prefix and prefix not in out:
            out.append(prefix)
    return out


def _qname_prefix_list(node: etree._Element) -> list[str]:
    prefix = (node.text or "").strip().rpartition(":")[0]
    return [prefix] if prefix else []


def sign_envelope(envelope: etree._Element, credential: Credential, *, ttl: float = 300.0,
                  now: _dt.datetime | None = None, token: str = "auto") -> bytes:
    """Sign a SOAP 1.1 envelope (lxml root) and return the bytes to send (UTF-8, no pretty-printing). The envelope
    gets the wsu:Ids of its signed parts; the signature itself is in the bytes only when the envelope had no
    wsse:Security (written once, `_signed_bytes`); otherwise it is signed in place too. Use sign_in_place for a
    signed tree."""
    data = _signed_bytes(envelope, credential, ttl, now, token)
    if data is not None:
        return data
    sign_in_place(envelope, credential, ttl=ttl, now=now, token=token)
    return etree.tostring(envelope, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------------------------------------
# Verification

_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def _verify_signature(public_key, algorithm: tuple[type, type], raw: bytes, data: bytes) -> None:
    """Raise InvalidSignature (or ValueError/TypeError) unless `raw` signs `data` with `public_key` under
    `algorithm` (the key type it needs, the hash). ECDSA values are r || s, each the curve's size (XML DSig 1.1), or
    the DER that gSOAP writes."""
    key_type, hash_type = algorithm
    if not _is_instance(type(public_key), key_type):
        raise TypeError("the signing certificate's key does not match the SignatureMethod")
    if key_type is rsa.RSAPublicKey:
        public_key.verify(raw, data, padding.PKCS1v15(), hash_type())
        return
    if not isinstance(public_key.curve, _CURVES):
        raise TypeError(f"ECDSA on {public_key.curve.name} is not accepted (P-256, P-384 and P-521 are)")
    size = (public_key.curve.key_size + 7) // 8
    if len(raw) == 2 * size:
        der = encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
    else:
        # gSOAP's wsse plugin (2.8, smdevp.c) writes the DER ECDSA-Sig-Value OpenSSL gives it instead of r || s:
        # taken too when it is exactly that DER (the replay cache keys on SignedInfo, not on these bytes, so a
        # second form of one signature is still the same message)
        r, s = decode_dss_signature(raw)
        if encode_dss_signature(r, s) != raw:
            raise ValueError("ECDSA signature value neither r || s nor DER")
        der = raw
    public_key.verify(der, data, ec.ECDSA(hash_type()))


@functools.lru_cache(maxsize=32)
def _is_instance(key_class: type, key_type: type) -> bool:
    return issubclass(key_class, key_type)


_certificate_keys: dict[int, tuple[x509.Certificate, object, bytes]] = {}


def _certificate_key(certificate: x509.Certificate) -> tuple[object, bytes]:
    """A certificate's public key and the SHA-256 of its SubjectPublicKeyInfo, computed once per certificate object
    (the trust store hands back the same Caller, and so the same certificate object, for every message of a chain).
    Found by the object's identity, not by hashing it (an lru_cache hashed the whole certificate twice a message);
    an entry holds its certificate, so an id is only trusted while that very object is alive."""
    hit = _certificate_keys.get(id(certificate))
    if hit is not None and hit[0] is certificate:
        return hit[1], hit[2]
    key = certificate.public_key()
    digest = hashlib.sha256(key.public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)).digest()
    if len(_certificate_keys) >= 256:
        _certificate_keys.clear()
    _certificate_keys[id(certificate)] = (certificate, key, digest)
    return key, digest


def _public_key(certificate: x509.Certificate):
    return _certificate_key(certificate)[0]


def _key_digest(certificate: x509.Certificate) -> bytes:
    """SHA-256 of a certificate's SubjectPublicKeyInfo (once per certificate, as _public_key)."""
    return _certificate_key(certificate)[1]


_FRACTION = re.compile(r"(\.\d{1,6})\d*")


def _parse_time(text: str | None, what: str) -> _dt.datetime:
    if not text:
        raise InvalidSecurity(f"the Timestamp has an empty {what}")
    try:
        dt = _dt.datetime.fromisoformat(text)       # the common case: what vmgrid and WSS4J write
    except ValueError:
        value = _FRACTION.sub(r"\1", text.strip())
        if value.endswith("Z"):
            value = value[:-1] + "+00:00"
        try:
            dt = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise InvalidSecurity(f"the Timestamp's {what} is not an xsd:dateTime: {text!r}") from None
    return dt.replace(tzinfo=_dt.timezone.utc) if dt.tzinfo is None else dt.astimezone(_dt.timezone.utc)


def _b64(text: str) -> bytes:
    """Strict base64 (what base64.b64decode(validate=True) accepts, without its wrapper); raises binascii.Error."""
    return binascii.a2b_base64(text, strict_mode=True)


def _only_elements(parent: etree._Element) -> list[etree._Element]:
    return [c for c in parent[:] if isinstance(c.tag, str)]


def _child(parent: etree._Element, tag: str) -> etree._Element | None:
    """The first child element named `tag` (what find(tag) returns, without ElementPath). A loop over the children
    compares tag strings: lxml's iterchildren(tag) builds a tag matcher per call, which costs more for the few
    children a SOAP element has."""
    for c in parent[:]:
        if c.tag == tag:
            return c
    return None


def _children(parent: etree._Element, tag: str) -> list[etree._Element]:
    """The child elements named `tag` (what iterchildren(tag) yields), as `_child` finds one."""
    return [c for c in parent[:] if c.tag == tag]


@dataclass
class _Parts:
    header: etree._Element | None
    body: etree._Element
    security: etree._Element
    timestamp: etree._Element
    signature: etree._Element
    dispatched: list[etree._Element]     # the elements that must be signed: header blocks, Timestamp, Body


def _structure(root: etree._Element) -> _Parts:
    if root.tag != Q_ENVELOPE:
        raise InvalidSecurity(f"not a SOAP 1.1 Envelope: {etree.QName(root).localname!r} in "
                              f"{etree.QName(root).namespace!r}")
    for _ in root.iter(etree.Comment):
        raise InvalidSecurity("comments are not allowed in a signed message")
    children = _only_elements(root)
    if [c.tag for c in children] == [Q_HEADER, Q_BODY]:
        header, body = children
    elif [c.tag for c in children] == [Q_BODY]:
        raise InvalidSecurity("unsigned message: there is no SOAP Header with wsse:Security")
    else:
        raise InvalidSecurity("the Envelope must hold exactly one Header then one Body")
    if (root.text or "").strip() or any((c.tail or "").strip() for c in children):
        raise InvalidSecurity("text outside the Header and Body")
    blocks = _only_elements(header)
    ours = [b for b in blocks if b.tag == Q_SECURITY and b.get(Q_ACTOR) in (None, "", ACTOR_NEXT)]
    if not ours:
        raise InvalidSecurity("unsigned message: no wsse:Security header")
    if len(ours) > 1:
        raise InvalidSecurity("more than one wsse:Security header for this recipient")
    security = ours[0]
    sec_children = _only_elements(security)
    timestamps = [c for c in sec_children if c.tag == Q_TIMESTAMP]
    signatures = [c for c in sec_children if c.tag == Q_SIGNATURE]
    if not signatures:
        raise InvalidSecurity("unsigned message: no ds:Signature in wsse:Security")
    if len(signatures) > 1:
        raise InvalidSecurity("more than one ds:Signature in wsse:Security")
    if len(timestamps) != 1:
        raise InvalidSecurity("wsse:Security must hold exactly one wsu:Timestamp")
    dispatched = [b for b in blocks if b is not security] + [timestamps[0], body]
    return _Parts(header, body, security, timestamps[0], signatures[0], dispatched)


# per Reference: (its DigestMethod algorithm, its DigestValue text or None, the element it resolves to, its PrefixList)
_Ref = tuple["str | None", "str | None", etree._Element, "list[str] | None"]


_ID_ATTRIBUTES = etree.XPath("//@*[local-name()='Id' or local-name()='ID' or local-name()='id']")


def _ids(root: etree._Element) -> dict[str, etree._Element]:
    """Map each Id-like attribute value in the document (Id, ID, id in any namespace, and xml:id) to the element
    carrying it. A value carried twice maps to None (ambiguous: a reference to it is refused); two wsu:Id
    attributes with one value are refused outright."""
    found: dict[str, etree._Element | None] = {}
    wsu_ids: set[str] = set()
    for attr in _ID_ATTRIBUTES(root):
        value = str(attr)
        if attr.attrname == Q_ID:
            if value in wsu_ids:
                raise InvalidSecurity(f"duplicate wsu:Id {value!r}: ambiguous references are refused")
            wsu_ids.add(value)
        found[value] = None if value in found else attr.getparent()
    return found


def _resolve(ids: dict[str, etree._Element | None], uri: str) -> etree._Element | None:
    """The element a same-document reference `#value` names, or raise if it is ambiguous or not a wsu:Id."""
    value = uri[1:]
    if value not in ids:
        return None
    target = ids[value]
    if target is None:
        raise InvalidSecurity(f"duplicate Id {value!r}: ambiguous references are refused")
    if target.get(Q_ID) != value:
        raise InvalidSecurity(f"reference {uri} resolves through an Id outside the wsu namespace")
    return target


def _check_timestamp(ts: etree._Element, policy: SecurityPolicy, now: _dt.datetime) -> _dt.datetime:
    """Check freshness; return the time until which the message could be accepted (the replay cache horizon)."""
    created_els = _children(ts, Q_CREATED)
    expires_els = _children(ts, Q_EXPIRES)
    if len(created_els) != 1 or len(expires_els) > 1:
        raise InvalidSecurity("the Timestamp needs exactly one Created and at most one Expires")
    created = _parse_time(created_els[0].text, "Created")
    if created > now + policy.clock_skew:
        raise MessageExpired(f"the message is dated in the future (Created {created.isoformat()}, beyond the "
                             f"allowed clock skew of {policy.clock_skew.total_seconds():g} s)")
    horizon = created + policy.max_age + policy.clock_skew
    if expires_els:
        expires = _parse_time(expires_els[0].text, "Expires")
        if expires < created:
            raise InvalidSecurity("the Timestamp expires before it was created")
        if expires + policy.clock_skew <= now:
            raise MessageExpired(f"the message expired at {expires.isoformat()}")
        horizon = min(horizon, expires + policy.clock_skew)
    if horizon <= now:
        raise MessageExpired(f"the message is older than the freshness window of "
                             f"{policy.max_age.total_seconds():g} s (Created {created.isoformat()})")
    return horizon


def _token_chain(parts: _Parts, ids: dict[str, etree._Element | None]) -> tuple[list[x509.Certificate] | None, bytes]:
    """The signer's certificates (leaf first) and a cache key, from the KeyInfo. The chain is parsed lazily
    (None) when the trust store already knows the token."""
    key_info = _child(parts.signature, Q_KEY_INFO)
    if key_info is None:
        raise SecurityTokenUnavailable("the Signature has no KeyInfo")
    str_el = _child(key_info, Q_STR)
    holder = key_info
    if str_el is not None:
        ref = _child(str_el, Q_REFERENCE)
        if ref is not None:
            uri = ref.get("URI") or ""
            if not uri.startswith("#"):
                raise SecurityTokenUnavailable(f"security token reference {uri!r} is not a local #Id")
            bst = _resolve(ids, uri)
            if bst is None or bst.tag != Q_BST or bst.getparent() is not parts.security or bst.get(Q_ID) != uri[1:]:
                raise SecurityTokenUnavailable(f"security token {uri} is not a BinarySecurityToken of wsse:Security")
            encoding = bst.get("EncodingType")
            if encoding not in (None, BASE64):
                raise SecurityTokenUnavailable(f"unsupported token encoding {encoding}")
            value_type = bst.get("ValueType")
            text = "".join((bst.text or "").split())
            # keyed on the token's text (whitespace removed): decoded only on a trust cache miss. One text decodes
            # to one DER, so a hit is the chain validated before; the tag keeps these keys apart from the others.
            key = hashlib.sha256(b"bst\0" + (value_type or "").encode() + b"\0" + text.encode()).digest()
            return _LazyChain(value_type, None, text=text), key
        key_id = _child(str_el, f"{{{WSSE}}}KeyIdentifier")
        if key_id is not None and key_id.get("ValueType") == X509V3:
            # WSS4J's X509KeyIdentifier: the whole certificate inside the reference (it is in the message)
            try:
                der = base64.b64decode("".join((key_id.text or "").split()), validate=True)
            except (binascii.Error, ValueError):
                raise SecurityTokenUnavailable("the X509v3 KeyIdentifier is not base64") from None
            return _LazyChain(X509V3, der), hashlib.sha256(X509V3.encode() + b"\0" + der).digest()
        holder = str_el
    data = _child(holder, Q_X509DATA)
    certs_text = [c.text or "" for c in _children(data, Q_X509CERT)] if data is not None else []
    if len(certs_text) > MAX_CHAIN:
        raise FailedAuthentication(f"the X509Data holds {len(certs_text)} certificates; at most {MAX_CHAIN} are "
                                   f"accepted")
    if not certs_text:
        raise SecurityTokenUnavailable(_key_reference_problem(key_info))
    try:
        ders = [base64.b64decode("".join(t.split()), validate=True) for t in certs_text]
    except (binascii.Error, ValueError):
        raise SecurityTokenUnavailable("an X509Certificate is not base64") from None
    return _LazyChain(X509V3, b"", ders), hashlib.sha256(b"\0".join(ders)).digest()


def _key_reference_problem(key_info: etree._Element) -> str:
    """Why a KeyInfo without a usable certificate cannot be resolved, and what to send instead."""
    key_id = key_info.find(f".//{{{WSSE}}}KeyIdentifier")
    if key_id is not None:
        kind = (key_id.get("ValueType") or "").rpartition("#")[2]
        what = _KEY_IDENTIFIER_NAMES.get(kind, f"a {kind or 'KeyIdentifier'} key identifier")
        return f"the signing key is named by {what}, which points to a certificate outside the message; {_ACCEPTED}"
    if key_info.find(f".//{{{DS}}}X509IssuerSerial") is not None:
        return f"the signing key is named by an IssuerSerial, which points to a certificate outside the message; {_ACCEPTED}"
    if key_info.find(f".//{{{WSSE}}}Embedded") is not None:
        return f"an embedded security token reference is not accepted; {_ACCEPTED}"
    return f"no X.509 certificate in the KeyInfo; {_ACCEPTED}"


def _is_proxy(cert: x509.Certificate) -> bool:
    """Whether a certificate carries an RFC 3820 ProxyCertInfo extension."""
    return any(ext.oid.dotted_string == "1.3.6.1.5.5.7.1.14" for ext in cert.extensions)


class _LazyChain:
    """Certificates decoded only on a trust cache miss."""

    def __init__(self, value_type: str | None, der: bytes | None, ders: list[bytes] | None = None,
                 text: str | None = None):
        self.value_type, self.der, self.ders, self.text = value_type, der, ders, text

    def certificates(self) -> list[x509.Certificate]:
        if self.der is None:
            try:
                self.der = _b64(self.text or "")
            except (binascii.Error, ValueError):
                raise SecurityTokenUnavailable("the BinarySecurityToken is not base64") from None
        try:
            if self.ders is not None:
                certs = [x509.load_der_x509_certificate(d) for d in self.ders]
                return _leaf_first(certs)
            if self.value_type == X509V3:
                return [x509.load_der_x509_certificate(self.der)]
            if self.value_type == X509PKIPATH:
                (tag, body), = list(der_items(self.der))
                if tag != 0x30:
                    raise ValueError("PKIPath is not a SEQUENCE")
                items = []
                for item in der_items(body):          # counted before any is decoded (trust.MAX_CHAIN)
                    items.append(item)
                    if len(items) > MAX_CHAIN:
                        raise FailedAuthentication(f"the X509PKIPathv1 token holds more than {MAX_CHAIN} "
                                                   f"certificates; at most {MAX_CHAIN} are accepted")
                certs = [x509.load_der_x509_certificate(bytes([t]) + _len(len(v)) + v) for t, v in items]
                if not certs:
                    raise ValueError("empty PKIPath")
                return list(reversed(certs))
        except ValueError as exc:
            raise SecurityTokenUnavailable(f"unreadable certificate token: {exc}") from None
        raise SecurityTokenUnavailable(f"unsupported token type {self.value_type!r} (X509v3 and X509PKIPathv1 are)")


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _leaf_first(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """Order X509Data certificates: the one that issued no other first."""
    issuers = {c.issuer.public_bytes() for c in certs}
    leaves = [c for c in certs if c.subject.public_bytes() not in issuers]
    leaf = leaves[0] if leaves else certs[0]
    return [leaf] + [c for c in certs if c is not leaf]


def _references(parts: _Parts, signed_info: etree._Element, ids: dict[str, etree._Element | None],
                policy: SecurityPolicy) -> tuple[str | None, list[_Ref]]:
    """The SignatureMethod's algorithm and, per Reference, (its DigestMethod algorithm, its DigestValue text (None
    when it has none), the element it resolves to, its InclusiveNamespaces prefixes), read from the elements."""
    c14n_method = _child(signed_info, Q_C14N_METHOD)
    if c14n_method is None or c14n_method.get("Algorithm") != EXC_C14N:
        raise InvalidSecurity("SignedInfo must use exclusive c14n (http://www.w3.org/2001/10/xml-exc-c14n#)")
    refs = _children(signed_info, Q_REFERENCE_DS)
    if not refs:
        raise InvalidSecurity("the Signature has no Reference")
    if len(refs) > policy.max_references:
        raise InvalidSecurity(f"more than {policy.max_references} signature references")
    resolved = []
    seen: set[int] = set()
    for ref in refs:
        target = _resolve_reference(ids, ref.get("URI") or "", seen)
        uri = ref.get("URI") or ""
        first: dict[str, etree._Element] = {}          # the first child of each name (what find() returns)
        transforms: list[etree._Element] = []         # the Transform children of every Transforms, in order
        for child in ref[:]:                                                     # one pass
            tag = child.tag
            if tag not in first:
                first[tag] = child
            if tag == Q_TRANSFORMS:
                transforms.extend(_children(child, Q_TRANSFORM))
        prefixes = _inclusive_prefixes(_check_transforms(uri, transforms, target, parts.signature))
        digest_method, digest_value = first.get(Q_DIGEST_METHOD), first.get(Q_DIGEST_VALUE)
        resolved.append((digest_method.get("Algorithm") if digest_method is not None else None,
                         (digest_value.text or "") if digest_value is not None else None, target, prefixes))
    method = _child(signed_info, f"{{{DS}}}SignatureMethod")
    return (method.get("Algorithm") if method is not None else None), resolved


# SignedInfo as vmgrid's signer writes it, read from its exclusive c14n (the bytes the signature covers) instead of
# element by element: the same facts, checked the same way (`_resolve_reference`). Any other form (other prefixes,
# whitespace, other transforms, values that c14n escapes) takes the element path, `_references`.
_FAST_SIGNED_INFO = re.compile(
    (f'<ds:SignedInfo xmlns:ds="{re.escape(DS)}"><ds:CanonicalizationMethod Algorithm="{re.escape(EXC_C14N)}">'
     f'</ds:CanonicalizationMethod><ds:SignatureMethod Algorithm="([^"<>&]*)"></ds:SignatureMethod>').encode())
_FAST_END = b"</ds:SignedInfo>"
_FAST_REFERENCE = re.compile(
    (f'<ds:Reference URI="([^"<>&]*)"><ds:Transforms><ds:Transform Algorithm="{re.escape(EXC_C14N)}">'
     f'(?:<ns0:InclusiveNamespaces xmlns:ns0="{re.escape(EXC_C14N)}" PrefixList="([^"<>&]*)"></ns0:InclusiveNamespaces>)?'
     f'</ds:Transform></ds:Transforms><ds:DigestMethod Algorithm="([^"<>&]*)"></ds:DigestMethod>'
     f'<ds:DigestValue>([A-Za-z0-9+/=]*)</ds:DigestValue></ds:Reference>').encode())


def _references_from_c14n(signed_info_c14n: bytes, ids: dict[str, etree._Element | None],
                          policy: SecurityPolicy) -> tuple[str | None, list[_Ref]] | None:
    """What `_references` returns, read from SignedInfo's canonical bytes when they are in the signer's form; None
    otherwise."""
    head = _FAST_SIGNED_INFO.match(signed_info_c14n)      # one pass, left to right: no backtracking
    if head is None:
        return None
    refs, at, end = [], head.end(), len(signed_info_c14n) - len(_FAST_END)
    while at < end:
        m = _FAST_REFERENCE.match(signed_info_c14n, at, end)
        if m is None:
            return None
        refs.append(m)
        at = m.end()
    if at != end or not refs or not signed_info_c14n.endswith(_FAST_END):
        return None
    if len(refs) > policy.max_references:
        raise InvalidSecurity(f"more than {policy.max_references} signature references")
    resolved = []
    seen: set[int] = set()
    for m in refs:
        target = _resolve_reference(ids, m.group(1).decode(), seen)
        prefixes = m.group(2).decode().split() if m.group(2) else None
        resolved.append((m.group(3).decode(), m.group(4).decode(), target, prefixes or None))
    return head.group(1).decode(), resolved


def _resolve_reference(ids: dict[str, etree._Element | None], uri: str, seen: set[int]) -> etree._Element:
    """The element a Reference URI names, refused unless it is a same-document #Id naming one element that no
    other reference names."""
    if not uri.startswith("#") or uri.startswith("#xpointer("):
        raise InvalidSecurity(f"reference {uri!r}: only same-document #Id references are accepted")
    target = _resolve(ids, uri)
    if target is None:
        raise InvalidSecurity(f"reference {uri} resolves to no element")
    if id(target) in seen:
        raise InvalidSecurity(f"two references to the same element ({uri})")
    seen.add(id(target))
    return target


def _check_transforms(uri: str, transforms: list[etree._Element], target: etree._Element,
                      signature: etree._Element) -> etree._Element:
    """The reference's exclusive c14n transform, after refusing anything else by name. The enveloped-signature
    transform (node-soap's default) is accepted before it on a reference that does not contain the Signature,
    where it removes nothing."""
    algorithms = [t.get("Algorithm") or "" for t in transforms]
    for alg in algorithms:
        if alg in REFUSED_TRANSFORMS:
            raise InvalidSecurity(f"reference {uri}: the {REFUSED_TRANSFORMS[alg]} transform ({alg}) is refused; "
                                  f"use one exclusive c14n transform ({EXC_C14N})")
        if alg not in (EXC_C14N, ENVELOPED):
            raise InvalidSecurity(f"reference {uri}: unknown transform {alg!r}; use one exclusive c14n transform "
                                  f"({EXC_C14N})")
    if algorithms == [ENVELOPED, EXC_C14N]:
        if any(el is target for el in signature.iterancestors()):
            raise InvalidSecurity(f"reference {uri}: the enveloped-signature transform is refused on an element "
                                  f"that contains the Signature")
        return transforms[1]
    if algorithms != [EXC_C14N]:
        raise InvalidSecurity(f"reference {uri}: transforms {algorithms} are refused; use one exclusive c14n "
                              f"transform ({EXC_C14N}), optionally after enveloped-signature")
    return transforms[0]


def _check_qname_content(body: etree._Element, prefixes: list[str] | None) -> None:
    """QName-valued text in the Body must use a prefix declared inside the signed Body or listed in the Body
    reference's PrefixList. A declaration outside the Body (on the Envelope) is not signed at all; one inside it
    stays where it was signed but exclusive c14n leaves its URI out of the digest, so only the PrefixList signs
    the namespace itself (vmgrid's client lists it; a changed URI here can only name an unknown property)."""
    listed = set(prefixes or ())
    for node in body.iter(*QNAME_CONTENT):
        text = (node.text or "").strip()
        prefix = text.rpartition(":")[0] or None
        if not text or prefix in listed or _declared_inside(node, body, prefix):
            continue
        shown = prefix or "#default"
        raise InvalidSecurity(
            f"{etree.QName(node).localname} holds the QName {text!r}, whose prefix {shown!r} is declared outside "
            f"the signed Body: declare it inside the Body or list {shown!r} in the Body reference's "
            f"InclusiveNamespaces PrefixList (WSS4J: addInclusivePrefixes=true; gSOAP: soap_wsse_set_InclusiveNamespaces)")


def _declared_inside(node: etree._Element, body: etree._Element, prefix: str | None) -> bool:
    """Whether the declaration of `prefix` in scope at `node` sits on `node`, the Body or an element between."""
    el = node
    while el is not None:
        parent = el.getparent()
        if prefix in el.nsmap and (parent is None or parent.nsmap.get(prefix) != el.nsmap[prefix]):
            return True
        if el is body:
            return False
        el = parent
    return False


def _inclusive_prefixes(node: etree._Element) -> list[str] | None:
    incl = _child(node, f"{{{EXC_C14N}}}InclusiveNamespaces")
    if incl is None or not incl.get("PrefixList"):
        return None
    return incl.get("PrefixList").split()


def verify_envelope(message: bytes | etree._Element, trust: TrustStore, *, replay: ReplayCache | None = None,
                    policy: SecurityPolicy = DEFAULT_POLICY, now: _dt.datetime | None = None,
                    expected_signer: str | Callable[[Caller], bool] | None = None
                    ) -> tuple[Caller, etree._Element]:
    """Verify a signed SOAP 1.1 message (raw bytes, parsed here with safexml; or a root parsed with safexml) and
    return the verified caller and the envelope root to dispatch from.

    `expected_signer`: a DN the signer's identity must equal, or a predicate (clients check the host this way).
    Raises InvalidSecurity, FailedCheck, MessageExpired, SecurityTokenUnavailable or FailedAuthentication."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        try:
            root = safexml.parse(bytes(message), policy.limits)
        except safexml.UnsafeXML as exc:
            raise InvalidSecurity(f"refused by the XML parser: {exc}") from None
    else:
        root = message
    now = now or _dt.datetime.now(_dt.timezone.utc)
    parts = _structure(root)
    ids = _ids(root)
    signed_info = _child(parts.signature, Q_SIGNED_INFO)
    if signed_info is None:
        raise InvalidSecurity("the Signature has no SignedInfo")
    signed_info_c14n = c14n(signed_info, _inclusive_prefixes(signed_info[0]) if len(signed_info) else None)
    read = _references_from_c14n(signed_info_c14n, ids, policy)
    method_uri, references = read if read is not None else _references(parts, signed_info, ids, policy)

    # Anti-wrapping: the references must cover exactly what is dispatched (Body, Timestamp, each header block).
    covered = {id(target) for _, _, target, _ in references}
    for el in parts.dispatched:
        if id(el) not in covered:
            name = etree.QName(el)
            raise InvalidSecurity(f"{name.localname} ({name.namespace}) is not covered by the signature")
    allowed = {id(el) for el in parts.dispatched}
    allowed |= {id(el) for el in parts.security if el.tag == Q_BST}
    for _, _, target, _ in references:
        if id(target) not in allowed:
            raise InvalidSecurity(f"the signature covers {etree.QName(target).localname}, which is not a header "
                                  f"block, the Timestamp or the Body: refused as a wrapping attempt")

    for _, _, target, prefixes in references:
        if target is parts.body:
            _check_qname_content(parts.body, prefixes)

    horizon = _check_timestamp(parts.timestamp, policy, now)

    # The signer: its chain, validated against the trusted CAs (cached by token bytes).
    lazy, cache_key = _token_chain(parts, ids)
    caller = trust.lookup(cache_key)
    if caller is None:
        certificates = lazy.certificates()
        try:
            caller = trust.validate(certificates, cache_key=cache_key)
        except ChainError as exc:
            reason = exc.reason
            if len(certificates) == 1 and _is_proxy(certificates[0]):
                reason += ("; the message carries the proxy certificate alone: send the chain as an X509PKIPathv1 "
                           "token (WSS4J: useSingleCertificate=false), or sign with the end-entity certificate")
            raise FailedAuthentication(reason) from None
    if expected_signer is not None:
        ok = expected_signer(caller) if callable(expected_signer) else caller.dn == expected_signer
        if not ok:
            raise FailedAuthentication(f"signed by {caller.dn}, not by the expected party")

    # The signature over SignedInfo, then each reference's digest.
    got = method_uri
    algorithm = _SIGNATURE_METHODS.get(got)
    if algorithm is None:
        if got == RSA_SHA1:
            raise InvalidSecurity(f"RSA-SHA1 signatures are refused (SHA-1 is broken); sign with RSA-SHA256 "
                                  f"({RSA_SHA256}), RSA-SHA384 or RSA-SHA512")
        raise InvalidSecurity(f"unsupported SignatureMethod {got!r}: RSA-SHA256/384/512 and ECDSA-SHA256/384/512 "
                              f"are accepted ({RSA_SHA256})")
    value_el = _child(parts.signature, Q_SIGNATURE_VALUE)
    try:
        raw = _b64("".join((value_el.text or "").split()))
    except (AttributeError, binascii.Error, ValueError):
        raise InvalidSecurity("the SignatureValue is missing or not base64") from None
    try:
        _verify_signature(_public_key(caller.certificate), algorithm, raw, signed_info_c14n)
    except (cryptography.exceptions.InvalidSignature, ValueError, TypeError):
        raise FailedCheck(f"the signature does not verify with the key of {caller.subject}") from None
    for got, digest_text, target, prefixes in references:
        digest_alg = _DIGESTS.get(got)
        if digest_alg is None:
            if got == SHA1_DIGEST:
                raise InvalidSecurity(f"SHA-1 digests are refused (SHA-1 is broken); digest with SHA-256 "
                                      f"({SHA256_DIGEST}), SHA-384 or SHA-512")
            raise InvalidSecurity(f"unsupported DigestMethod {got!r}: SHA-256/384/512 are accepted "
                                  f"({SHA256_DIGEST})")
        try:
            if digest_text is None:
                raise ValueError("no DigestValue")
            expected = _b64("".join(digest_text.split()))
        except (binascii.Error, ValueError):
            raise InvalidSecurity("a DigestValue is missing or not base64") from None
        if not hmac.compare_digest(digest_alg(c14n(target, prefixes)).digest(), expected):
            raise FailedCheck(f"the digest of {etree.QName(target).localname} does not match: the message was "
                              f"changed after signing")

    if replay is not None:
        # keyed on what was signed and the key that signed it, not on the SignatureValue's bytes: an ECDSA signature
        # (r, s) verifies as (r, n - s) too, and in DER as in r || s, so anyone holding a signed message could make
        # "new" values of it. The key is part of it because two signers can sign byte-identical SignedInfo (a client
        # whose Timestamp has whole seconds and whose Ids are fixed, as node-soap's, signing the same request with
        # a certificate and then with a proxy): the second is not a replay of the first.
        if not replay.first_seen(hashlib.sha256(_key_digest(caller.certificate) + signed_info_c14n).digest(),
                                 horizon.timestamp()):
            raise InvalidSecurity("replayed message: this signature was already accepted")
    return caller, root


def must_understand_violations(root: etree._Element, understood: Iterable[str]) -> list[str]:
    """Header blocks addressed to us with soap:mustUnderstand="1" whose QName ('{ns}local') is not understood."""
    header = _child(root, Q_HEADER)
    if header is None:
        return []
    understood = set(understood) | {Q_SECURITY}
    bad = []
    for block in _only_elements(header):
        if block.get(Q_MUST_UNDERSTAND, "0").strip() in ("1", "true") and block.get(Q_ACTOR) in (None, "", ACTOR_NEXT):
            if block.tag not in understood:
                bad.append(block.tag)
    return bad
