"""WS-Addressing checks of every dispatched request (issue 9.1): the signed wsa:To must be this
service's own public address and the signed wsa:Action (and a non-empty HTTP SOAPAction) the
dispatched operation's, so a request signed for one endpoint or operation is refused by every other.
Refusals are the WS-Addressing 1.0 SOAP-binding faults (faultcode in the wsa namespace, the offending
header's QName in a wsa:ProblemHeaderQName detail, or the action in wsa:ProblemAction)."""
from __future__ import annotations

from typing import Iterable

from lxml import etree

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
TO, ACTION = f"{{{WSA}}}To", f"{{{WSA}}}Action"


class AddressingFault(Exception):
    """``code``: MessageAddressingHeaderRequired, InvalidAddressingHeader, DestinationUnreachable or
    ActionNotSupported (local names in the WS-Addressing namespace)."""

    def __init__(self, code: str, message: str, *, header: str | None = None, action: str | None = None):
        super().__init__(message)
        self.code, self.header, self.action = code, header, action

    def envelope(self, headers: list[etree._Element] = ()) -> etree._Element:
        env = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soapenv": SOAP_ENV, "wsa": WSA})
        if headers:
            header = etree.SubElement(env, f"{{{SOAP_ENV}}}Header")
            for h in headers:
                header.append(h)
            etree.cleanup_namespaces(header)
        fault = etree.SubElement(etree.SubElement(env, f"{{{SOAP_ENV}}}Body"), f"{{{SOAP_ENV}}}Fault")
        etree.SubElement(fault, "faultcode").text = f"wsa:{self.code}"
        etree.SubElement(fault, "faultstring").text = str(self)
        detail = etree.SubElement(fault, "detail")
        if self.header:
            etree.SubElement(detail, f"{{{WSA}}}ProblemHeaderQName").text = f"wsa:{etree.QName(self.header).localname}"
        if self.action is not None:
            problem = etree.SubElement(detail, f"{{{WSA}}}ProblemAction")
            etree.SubElement(problem, f"{{{WSA}}}Action").text = self.action
        return env


def normalize(url: str) -> str:
    scheme, sep, rest = url.strip().partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower()}{slash}{path}".rstrip("/")


def _one(headers: list[etree._Element], tag: str) -> str:
    found = [h for h in headers if h.tag == tag]
    if not found:
        raise AddressingFault("MessageAddressingHeaderRequired",
                              f"the request needs a signed {etree.QName(tag).localname} header (WS-Addressing)",
                              header=tag)
    if len(found) > 1:
        raise AddressingFault("InvalidAddressingHeader",
                              f"the request has {len(found)} {etree.QName(tag).localname} headers; one is allowed",
                              header=tag)
    return (found[0].text or "").strip()


def check_request(headers: list[etree._Element], addresses: Iterable[str], action: str, soap_action: str | None) -> None:
    """Refuse (AddressingFault) unless wsa:To is one of ``addresses`` (this service) and wsa:Action and the
    HTTP SOAPAction (when not empty) are ``action``. The headers were verified as signed by WS-Security."""
    to = _one(headers, TO)
    if normalize(to) not in {normalize(a) for a in addresses if a}:
        raise AddressingFault("DestinationUnreachable",
                              f"this request is addressed to {to}, not to this service", header=TO)
    asked = _one(headers, ACTION)
    if asked != action:
        raise AddressingFault("ActionNotSupported", f"wsa:Action {asked} is not the action of the operation its "
                                                    f"body asks for ({action})", action=asked)
    http = (soap_action or "").strip().strip('"')
    if http and http != action:
        raise AddressingFault("ActionNotSupported", f"SOAPAction {http} is not the action of the operation its "
                                                    f"body asks for ({action})", action=http)


def request_headers(to: str, action: str, message_id: str) -> list[etree._Element]:
    """The WS-Addressing headers a client puts on a request (before signing)."""
    out = []
    for name, value in (("To", to), ("Action", action), ("MessageID", message_id)):
        h = etree.Element(f"{{{WSA}}}{name}", nsmap={"wsa": WSA})
        h.text = value
        out.append(h)
    return out
