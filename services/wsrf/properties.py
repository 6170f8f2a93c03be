"""WS-ResourceProperties: one class per resource property, and a :class:`PropertySet` that serves
GetResourceProperty, GetMultipleResourceProperties and QueryResourceProperties for any resource.

A service declares its properties once::

    class State(ResourceProperty[Instance]):
        qname = f"{{{VMM}}}State"
        def value(self, inst): return inst.state

    INSTANCE_PROPERTIES = PropertySet([Identifier(), State(), ...], what="an instance")

and its handlers answer with ``INSTANCE_PROPERTIES.get(resource, request)`` (and ``get_multiple``,
``query``). A client reads the same names back: ``State.read(response)``. Adding a property is one class
and one entry in the set (and its element in the WSDL's resource-property document).
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Generic, Iterable, TypeVar

from lxml import etree

from services.faults import InvalidArgument
from services.wsrf.namespaces import RP, XPATH_DIALECT

R = TypeVar("R")

# what XML 1.0 cannot carry (Char production): the C0 controls but tab and line breaks, lone surrogates, U+FFFE/FFFF
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value: object) -> str:
    """``value`` as element text XML 1.0 can carry: each character it cannot written as an escape (``\\x01``,
    ``\\ud800``). A property's value may hold words a guest or a peer chose (a guest's status); one control
    character in it made every answer that carries the property fail (lxml refuses to build the element)."""
    text = str(value)
    if _NOT_XML.search(text) is None:
        return text
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


def element(qname: str, text: object | None = None, prefix: str | None = None) -> etree._Element:
    """An element named ``qname`` (Clark notation) with ``text``; ``prefix`` for its namespace if given."""
    ns = etree.QName(qname).namespace
    el = etree.Element(qname, nsmap={prefix: ns} if prefix and ns else None)
    if text is not None:
        el.text = xml_text(text)
    return el


def sub(parent: etree._Element, qname: str, text: object | None = None) -> etree._Element:
    """A child ``qname`` of ``parent`` with ``text``."""
    el = etree.SubElement(parent, qname)
    if text is not None:
        el.text = xml_text(text)
    return el


class ResourceProperty(Generic[R]):
    """One resource property (GT4's ``RP_...`` classes). Subclasses set ``qname`` and override either
    :meth:`value` (a simple value written as the element's text; None: no value now, no element) or
    :meth:`elements` (structured content). Clients read it with :meth:`read` (override :meth:`parse`)."""

    qname: ClassVar[str] = ""
    prefix: ClassVar[str | None] = None   # the namespace prefix the rendered element declares

    def value(self, resource: R) -> object | None:
        raise NotImplementedError(f"{type(self).__name__} renders neither value() nor elements()")

    def text(self, value: object) -> str:
        return str(value)

    def elements(self, resource: R) -> list[etree._Element]:
        """The property's elements for ``resource`` (zero or more)."""
        v = self.value(resource)
        return [] if v is None else [element(self.qname, self.text(v), self.prefix)]

    # -- the client's side ------------------------------------------------------------------------
    @classmethod
    def parse(cls, el: etree._Element) -> Any:
        """One rendered element back as a value (default: its text)."""
        return el.text or ""

    @classmethod
    def read(cls, container: etree._Element, default: Any = None) -> Any:
        """The property's value among ``container``'s children (a GetMultipleResourceProperties response, a
        resource-property document, an instance element); ``default`` when it is absent."""
        el = container.find(cls.qname)
        return default if el is None else cls.parse(el)

    @classmethod
    def local(cls) -> str:
        return etree.QName(cls.qname).localname


def parse_qname(el: etree._Element, argument: str = "ResourceProperty") -> str:
    """The QName an element's text names (``prefix:local``, the prefix declared in scope), in Clark notation."""
    text = (el.text or "").strip()
    prefix, _, local = text.rpartition(":")
    ns = el.nsmap.get(prefix or None)
    if ns is None:
        raise InvalidArgument(f"cannot resolve the prefix of {text!r}", argument=argument)
    return etree.QName(ns, local).text


class PropertySet(Generic[R]):
    """The resource properties of one kind of resource, in document order."""

    def __init__(self, properties: Iterable[ResourceProperty[R]], *, what: str = "a resource",
                 document: str | None = None):
        self.properties = tuple(properties)
        self.by_name = {p.qname: p for p in self.properties}
        if len(self.by_name) != len(self.properties):
            raise ValueError("two properties of one set have the same QName")
        self.what = what
        self.document_tag = document

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.qname for p in self.properties)

    def __contains__(self, qname: str) -> bool:
        return qname in self.by_name

    def values(self, resource: R, qname: str) -> list[etree._Element]:
        """The elements of one property; InvalidArgument naming the known ones when there is no such property."""
        prop = self.by_name.get(qname)
        if prop is None:
            known = ", ".join(sorted(etree.QName(q).localname for q in self.by_name))
            raise InvalidArgument(f"no resource property {qname}; {self.what} has: {known}",
                                  argument="ResourceProperty")
        return prop.elements(resource)

    def all(self, resource: R, *, skip: Iterable[str] = ()) -> list[etree._Element]:
        """Every property's elements in order, except the QNames in ``skip``."""
        skip = set(skip)
        return [el for p in self.properties if p.qname not in skip for el in p.elements(resource)]

    def document(self, resource: R) -> etree._Element:
        """The resource-property document (``document`` tag given to the set)."""
        if not self.document_tag:
            raise ValueError("this property set has no document element")
        doc = etree.Element(self.document_tag)
        doc.extend(self.all(resource))
        return doc

    # -- the three WS-ResourceProperties operations ------------------------------------------------------
    def get(self, resource: R, request: etree._Element) -> etree._Element:
        """GetResourceProperty: ``request`` is the wsrf-rp:GetResourceProperty element (a QName as text)."""
        resp = etree.Element(f"{{{RP}}}GetResourcePropertyResponse", nsmap={"wsrf-rp": RP})
        resp.extend(self.values(resource, parse_qname(request)))
        return resp

    def get_multiple(self, resource: R, request: etree._Element) -> etree._Element:
        """GetMultipleResourceProperties: the properties named by the request's wsrf-rp:ResourceProperty children."""
        resp = etree.Element(f"{{{RP}}}GetMultipleResourcePropertiesResponse", nsmap={"wsrf-rp": RP})
        for el in request.iterfind(f"{{{RP}}}ResourceProperty"):
            resp.extend(self.values(resource, parse_qname(el)))
        return resp

    def query(self, resource: R, request: etree._Element, namespaces: dict[str, str] | None = None) -> etree._Element:
        """QueryResourceProperties with the XPath 1.0 dialect, evaluated over the resource-property document
        (``namespaces``: the prefixes the expression may use besides those in scope of the expression)."""
        expr_el = request.find(f"{{{RP}}}QueryExpression")
        if expr_el is None:
            raise InvalidArgument("QueryResourceProperties needs a QueryExpression", argument="QueryExpression")
        dialect = (expr_el.get("Dialect") or "").strip()
        if dialect != XPATH_DIALECT:
            raise InvalidArgument(f"unknown query dialect {dialect!r}; supported: {XPATH_DIALECT}",
                                  argument="Dialect")
        prefixes = {k: v for k, v in expr_el.nsmap.items() if k}
        prefixes.update(namespaces or {})
        try:
            result = self.document(resource).xpath((expr_el.text or "").strip(), namespaces=prefixes)
        except etree.XPathError as exc:
            raise InvalidArgument(f"the XPath expression does not evaluate: {exc}", argument="QueryExpression") from None
        resp = etree.Element(f"{{{RP}}}QueryResourcePropertiesResponse", nsmap={"wsrf-rp": RP})
        if isinstance(result, list):
            for item in result:
                if isinstance(item, etree._Element):
                    resp.append(_copy(item))
                else:
                    resp.text = (resp.text or "") + str(item)
        elif isinstance(result, bool):
            resp.text = "true" if result else "false"
        else:
            resp.text = str(result) if not isinstance(result, float) or not result.is_integer() else str(int(result))
        return resp


def _copy(el: etree._Element) -> etree._Element:
    from copy import deepcopy

    return deepcopy(el)
