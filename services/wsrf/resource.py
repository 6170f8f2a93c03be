"""Finding the resource a request is addressed to: its key travels as a reference-parameter SOAP
header; a :class:`ResourceHome` turns the key into the resource or a ``ResourceUnknown`` fault."""
from __future__ import annotations

from typing import Generic, Iterable, Protocol, TypeVar

from lxml import etree

from services.faults import ResourceUnknown

R = TypeVar("R", covariant=True)


def resource_key(headers: Iterable[etree._Element], key_tag: str, what: str = "resource") -> str:
    """The text of the ``key_tag`` header; ResourceUnknown when the request carries none."""
    for h in headers:
        if h.tag == key_tag and (h.text or "").strip():
            return h.text.strip()
    local = etree.QName(key_tag).localname
    raise ResourceUnknown(f"this operation is addressed to an {what}: send its EndpointReference's "
                          f"{local} as a SOAP header", resource="(none)")


class ResourceHome(Protocol, Generic[R]):
    """Where a service keeps its WS-Resources (GT4's ResourceHome)."""

    def find(self, key: str) -> R:
        """The live resource ``key``; raises ResourceUnknown (also for one that has ended)."""
        ...
