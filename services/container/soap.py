"""SOAP 1.1 envelopes: reading requests, writing responses and typed faults, WS-Addressing headers."""
from __future__ import annotations

import re
import uuid

from lxml import etree

from services.faults import VMGridFault, to_detail

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"

class EnvelopeError(Exception):
    """The message is not a SOAP 1.1 envelope we can dispatch (answered as a soapenv:Client fault)."""

    def __init__(self, message: str, code: str = "Client"):
        super().__init__(message)
        self.code = code


def split_envelope(root: etree._Element) -> tuple[list[etree._Element], etree._Element]:
    """The header blocks and the single Body child of an envelope, checked for SOAP 1.1 structure."""
    if root.tag != f"{{{SOAP_ENV}}}Envelope":
        if etree.QName(root).localname == "Envelope":
            raise EnvelopeError(f"not a SOAP 1.1 envelope (namespace {etree.QName(root).namespace})", "VersionMismatch")
        raise EnvelopeError("the request is not a SOAP envelope")
    headers: list[etree._Element] = []
    bodies = []
    for child in root:
        if not isinstance(child.tag, str):
            continue
        if child.tag == f"{{{SOAP_ENV}}}Header":
            if headers or bodies:
                raise EnvelopeError("more than one Header, or Header after Body")
            headers = [h for h in child if isinstance(h.tag, str)]
        elif child.tag == f"{{{SOAP_ENV}}}Body":
            bodies.append(child)
        else:
            raise EnvelopeError(f"unexpected element {child.tag} in the envelope")
    if len(bodies) != 1:
        raise EnvelopeError("the envelope must have exactly one Body")
    payload = [c for c in bodies[0] if isinstance(c.tag, str)]
    if len(payload) != 1:
        raise EnvelopeError("the Body must hold exactly one element (document/literal wrapped)")
    return headers, payload[0]


def wsa_headers(headers: list[etree._Element]) -> dict[str, str]:
    """The simple WS-Addressing values of a request (To, Action, MessageID)."""
    out = {}
    for h in headers:
        q = etree.QName(h)
        if q.namespace == WSA and q.localname in ("To", "Action", "MessageID"):
            out[q.localname] = (h.text or "").strip()
    return out


# The prefixes every response uses, declared once on the Envelope: no automatic ns0, no namespace under two
# prefixes (gSOAP's verifier stumbles on both). A namespace outside this table keeps the prefix its element has.
PREFIXES = {
    "soapenv": SOAP_ENV,
    "wsse": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd",
    "wsu": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd",
    "ds": "http://www.w3.org/2000/09/xmldsig#",
    "wsa": WSA,
    "wsrf-rl": "http://docs.oasis-open.org/wsrf/rl-2",
    "wsrf-rp": "http://docs.oasis-open.org/wsrf/rp-2",
    "wsnt": "http://docs.oasis-open.org/wsn/b-2",
    "f": "http://vmgrid.org/ns/faults/1",
    "ws": "http://vmgrid.org/ns/workspace/1",
    "repo": "http://vmgrid.org/ns/vmrepository/1",
    "vmm": "http://vmgrid.org/ns/vmmanager/1",
    "az": "http://vmgrid.org/ns/authz/1",
}
# Kept on the Envelope even when no element name uses them: the signer adds wsu:Id to the Body and headers and
# wsse:Security to the Header after the envelope is built.
_ALWAYS = ("soapenv", "wsse", "wsu")


def envelope(payload: etree._Element, headers: list[etree._Element] = ()) -> etree._Element:
    """A response envelope whose namespaces all use the conventional prefixes (PREFIXES), declared on the
    Envelope. A prefix QName-valued text uses keeps its declaration (text is never renamed)."""
    env = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={p: PREFIXES[p] for p in _ALWAYS})
    if headers:
        hdr = etree.SubElement(env, f"{{{SOAP_ENV}}}Header")
        for h in headers:
            hdr.append(h)
    body = etree.SubElement(env, f"{{{SOAP_ENV}}}Body")
    body.append(payload)
    in_text = _text_prefixes(payload)
    renamed = {uri for prefix, uri in in_text.items() if PREFIXES.get(prefix) != uri}
    etree.cleanup_namespaces(env, top_nsmap={p: u for p, u in PREFIXES.items() if u not in renamed},
                             keep_ns_prefixes=_ALWAYS + tuple(in_text))
    return env


_QNAME_TEXT = re.compile(r"\s*([A-Za-z_][\w.-]*):[A-Za-z_][\w.-]*\s*")


def _text_prefixes(payload: etree._Element) -> dict[str, str]:
    """Prefixes (and their namespaces) that text looking like a QName uses, e.g. ``vmm:State``: their
    declarations stay, and a namespace so named under another prefix is not renamed."""
    out: dict[str, str] = {}
    for el in payload.iter(etree.Element):          # elements only (no comments, no PIs)
        text = el.text
        if text and ":" in text:                    # most texts have no colon: no regex for them (4x faster)
            m = _QNAME_TEXT.fullmatch(text)
            if m and m.group(1) in el.nsmap:
                out.setdefault(m.group(1), el.nsmap[m.group(1)])
    return out


def response_headers(request_wsa: dict[str, str], action: str) -> list[etree._Element]:
    """WS-Addressing headers for a response when the request used WS-Addressing."""
    if "MessageID" not in request_wsa:
        return []
    out = []
    for name, value in (("Action", action), ("MessageID", f"urn:uuid:{uuid.uuid4()}"),
                        ("RelatesTo", request_wsa["MessageID"])):
        el = etree.Element(f"{{{WSA}}}{name}", nsmap={"wsa": WSA})
        el.text = value
        out.append(el)
    return out


# WS-Addressing 1.0 SOAP binding: the action of a fault that has no action of its own
FAULT_ACTION = "http://www.w3.org/2005/08/addressing/soap/fault"


def fault_headers(request_wsa: dict[str, str]) -> list[etree._Element]:
    """WS-Addressing headers for a fault to a request that used WS-Addressing: the request's MessageID in a
    (signed) wsa:RelatesTo, so a captured fault cannot be handed to another request as its answer."""
    return response_headers(request_wsa, FAULT_ACTION)


def fault_envelope(code: str, message: str, detail: etree._Element | None = None,
                   headers: list[etree._Element] = ()) -> etree._Element:
    fault = etree.Element(f"{{{SOAP_ENV}}}Fault", nsmap={"soapenv": SOAP_ENV})
    etree.SubElement(fault, "faultcode").text = f"soapenv:{code}"
    etree.SubElement(fault, "faultstring").text = message
    if detail is not None:
        etree.SubElement(fault, "detail").append(detail)
    return envelope(fault, headers)


def typed_fault_envelope(exc: VMGridFault, headers: list[etree._Element] = ()) -> etree._Element:
    return fault_envelope("Client" if exc.client_error else "Server", exc.description, to_detail(exc), headers)


def serialize(env: etree._Element) -> bytes:
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


_STEP = re.compile(r"^(?P<name>[^\[]+)(?:\[(?P<index>\d+)\])?$")
_LIBXML_SUBJECT = re.compile(r"^(?:Element|Attribute) '[^']*'(?:, attribute '[^']*')?: (?:\[facet '[^']*'\] )?")


def _children_matching(parent: etree._Element, step: str) -> list[etree._Element]:
    elements = [c for c in parent if isinstance(c.tag, str)]
    if step == "*":
        return elements
    prefix, _, local = step.rpartition(":")
    return [c for c in elements if etree.QName(c).localname == local and (c.prefix or "") == prefix]


def element_path(payload: etree._Element, libxml_path: str | None) -> str | None:
    """The element a schema error names, as a path of local names with positions
    (``QueryImages/group[1]/criterion[2]/value``), from libxml2's path relative to the payload
    (``/*/*[1]/*[2]/*``); None when the path cannot be followed."""
    steps = [s for s in (libxml_path or "").split("/") if s]
    if not steps or not _STEP.match(steps[0]):
        return None
    names = [etree.QName(payload).localname]
    node = payload
    for i, step in enumerate(steps[1:], start=2):
        m = _STEP.match(step)
        if m is None or m.group("name").startswith("@") or m.group("name") == "text()":
            break
        candidates = _children_matching(node, m.group("name"))
        index = int(m.group("index") or 1) - 1
        if not 0 <= index < len(candidates):
            return None
        node = candidates[index]
        same = [c for c in node.getparent() if isinstance(c.tag, str) and c.tag == node.tag]
        last = i == len(steps)
        local = etree.QName(node).localname
        names.append(local if last and len(same) == 1 else f"{local}[{same.index(node) + 1}]")
    return "/".join(names)


def schema_message(message: str) -> str:
    """libxml2's schema error text without its subject prefix (the path names the element instead)."""
    # a namespace in Clark notation ({urn:...}name: a URI, so a colon, no space) goes; a pattern's quantifiers
    # ({0,127}) and an enumeration's set ({'Running', 'Paused'}) stay
    text = re.sub(r"\{[^}\s']*:[^}\s']*\}", "", _LIBXML_SUBJECT.sub("", (message or "").strip()))
    return text[:1].lower() + text[1:] if text else "does not match the schema"
