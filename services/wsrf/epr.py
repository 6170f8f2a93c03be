"""WS-Addressing EndpointReferences: a service address plus the reference parameters that name one
resource behind it (vmgrid's resource keys, e.g. ``vmm:InstanceKey``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from services.wsrf.namespaces import IS_REFERENCE_PARAMETER, WSA


@dataclass(frozen=True)
class EndpointReference:
    """``address`` (the service's public URL) and ``parameters``: (Clark-notation tag, text) pairs."""

    address: str
    parameters: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, address: str, key_tag: str, key: str) -> "EndpointReference":
        """The EPR of one resource: its service's address and its key as the one reference parameter."""
        return cls(address, ((key_tag, key),))

    def parameter(self, tag: str) -> str | None:
        for t, v in self.parameters:
            if t == tag:
                return v
        return None

    def to_element(self, tag: str = f"{{{WSA}}}EndpointReference", nsmap: dict | None = None) -> etree._Element:
        """This EPR as an element of type wsa:EndpointReferenceType named ``tag``."""
        el = etree.Element(tag, nsmap={"wsa": WSA, **(nsmap or {})})
        self.fill(el)
        return el

    def fill(self, el: etree._Element) -> etree._Element:
        """Append wsa:Address and wsa:ReferenceParameters to ``el`` (an EPR-typed element)."""
        etree.SubElement(el, f"{{{WSA}}}Address").text = self.address
        if self.parameters:
            params = etree.SubElement(el, f"{{{WSA}}}ReferenceParameters")
            for tag, value in self.parameters:
                etree.SubElement(params, tag).text = value
        return el

    @classmethod
    def from_element(cls, el: etree._Element) -> "EndpointReference":
        """Read an EPR-typed element; ValueError when it has no wsa:Address."""
        address = (el.findtext(f"{{{WSA}}}Address") or "").strip()
        if not address:
            raise ValueError("the EndpointReference has no wsa:Address")
        params = el.find(f"{{{WSA}}}ReferenceParameters")
        pairs = tuple((c.tag, (c.text or "").strip()) for c in (params if params is not None else ())
                      if isinstance(c.tag, str))
        return cls(address, pairs)

    def headers(self) -> list[etree._Element]:
        """The reference parameters as SOAP headers of a request to the resource (WS-Addressing 1.0 §3.3)."""
        out = []
        for tag, value in self.parameters:
            ns = etree.QName(tag).namespace
            h = etree.Element(tag, nsmap={"wsa": WSA, **({"r": ns} if ns else {})})
            h.set(IS_REFERENCE_PARAMETER, "true")
            h.text = value
            out.append(h)
        return out
