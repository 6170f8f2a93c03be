"""The published contract: the hand-written WSDL and schemas in ``wsdl/``, loaded, validated against
and served with their addresses rewritten (never a generated stand-in)."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from lxml import etree

from services.common.paths import WSDL_DIR

WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
WSDL_SOAP_NS = "http://schemas.xmlsoap.org/wsdl/soap/"
XSD_NS = "http://www.w3.org/2001/XMLSchema"
SERVICES_PATH = "/wsrf/services/"
SCHEMA_PATH = "/wsrf/share/schema/"


@dataclass(frozen=True)
class Operation:
    name: str
    input: etree.QName
    output: etree.QName
    soap_action: str
    faults: tuple[str, ...]


def _local_parser() -> etree.XMLParser:
    # Our own files, but still: no network, no entities.
    return etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=False)


def schema_files() -> list[str]:
    return sorted(p.name for p in WSDL_DIR.glob("*.xsd"))


class Contract:
    """One service's WSDL: its operations, a validator for its messages, and served copies."""

    def __init__(self, wsdl_file: str):
        self.wsdl_file = wsdl_file
        self.path = WSDL_DIR / wsdl_file
        self.tree = etree.parse(str(self.path), _local_parser())
        root = self.tree.getroot()
        self.target_namespace = root.get("targetNamespace")
        self.operations = self._read_operations(root)
        self.by_input = {op.input.text: op for op in self.operations.values()}
        self.validator = self._build_validator(root)
        self._served: dict[str, bytes] = {}
        self._lock = threading.Lock()

    # -- reading the WSDL ------------------------------------------------------------------
    def _resolve_qname(self, el: etree._Element, value: str) -> etree.QName:
        prefix, _, local = value.rpartition(":")
        return etree.QName(el.nsmap.get(prefix or None), local)

    def _read_operations(self, root: etree._Element) -> dict[str, Operation]:
        ns = {"wsdl": WSDL_NS, "soap": WSDL_SOAP_NS}
        messages = {}
        for m in root.findall("wsdl:message", ns):
            part = m.find("wsdl:part", ns)
            messages[m.get("name")] = self._resolve_qname(part, part.get("element"))
        actions = {}
        for op in root.findall("wsdl:binding/wsdl:operation", ns):
            so = op.find("soap:operation", ns)
            actions[op.get("name")] = so.get("soapAction", "") if so is not None else ""
        ops = {}
        for op in root.findall("wsdl:portType/wsdl:operation", ns):
            name = op.get("name")
            msg_in = op.find("wsdl:input", ns).get("message").rpartition(":")[2]
            msg_out = op.find("wsdl:output", ns).get("message").rpartition(":")[2]
            faults = tuple(f.get("name") for f in op.findall("wsdl:fault", ns))
            ops[name] = Operation(name, messages[msg_in], messages[msg_out], actions.get(name, ""), faults)
        return ops

    def _build_validator(self, root: etree._Element) -> etree.XMLSchema:
        imports = []
        for imp in root.iterfind(f"{{{WSDL_NS}}}types/{{{XSD_NS}}}schema/{{{XSD_NS}}}import"):
            imports.append((imp.get("namespace"), imp.get("schemaLocation")))
        wrapper = etree.Element(f"{{{XSD_NS}}}schema", nsmap={"xs": XSD_NS})
        for namespace, location in imports:
            etree.SubElement(wrapper, f"{{{XSD_NS}}}import", namespace=namespace,
                             schemaLocation=(WSDL_DIR / location).as_uri())
        return etree.XMLSchema(wrapper)

    # -- serving ------------------------------------------------------------------------------
    def served_wsdl(self, base_url: str, service_name: str) -> bytes:
        """The WSDL with soap:address pointing at this container and schema locations absolute."""
        key = f"{base_url}|{service_name}"
        with self._lock:
            if key not in self._served:
                tree = etree.parse(str(self.path), _local_parser())
                for addr in tree.iter(f"{{{WSDL_SOAP_NS}}}address"):
                    addr.set("location", f"{base_url}{SERVICES_PATH}{service_name}")
                _rewrite_locations(tree.getroot(), base_url)
                self._served[key] = etree.tostring(tree, xml_declaration=True, encoding="UTF-8")
            return self._served[key]


_FACETS = (("minInclusive", "at least {}"), ("maxInclusive", "at most {}"), ("minExclusive", "more than {}"),
           ("maxExclusive", "less than {}"), ("minLength", "of at least {} characters"),
           ("maxLength", "of at most {} characters"), ("length", "of {} characters"), ("pattern", "matching {}"))
_schemas_by_namespace: dict[str, list[etree._Element]] | None = None


def _schemas(namespace: str) -> list[etree._Element]:
    """The roots of wsdl/*.xsd whose targetNamespace is ``namespace`` (read once)."""
    global _schemas_by_namespace
    if _schemas_by_namespace is None:
        found: dict[str, list[etree._Element]] = {}
        for path in sorted(WSDL_DIR.glob("*.xsd")):
            root = etree.parse(str(path), _local_parser()).getroot()
            found.setdefault(root.get("targetNamespace", ""), []).append(root)
        _schemas_by_namespace = found
    return _schemas_by_namespace.get(namespace, [])


def expected_value(payload_tag: str, element_path: str) -> str | None:
    """What the schema wants in the element at ``element_path`` (``Deploy/lifetime``, local names from the
    payload, positions allowed) when that element's type is an anonymous restriction, whose libxml2 error says
    only "not a valid value of the local atomic type": e.g. "a positiveInteger at most 31536000"; None when
    the declaration is not found this way."""
    namespace = etree.QName(payload_tag).namespace or ""
    names = [re.sub(r"\[\d+\]$", "", step) for step in element_path.split("/") if step]
    for root in _schemas(namespace):
        decl = root.find(f"{{{XSD_NS}}}element[@name='{names[0]}']") if names and re.fullmatch(r"[\w.-]+", names[0]) \
            else None
        for name in names[1:]:
            if decl is None or not re.fullmatch(r"[\w.-]+", name):
                decl = None
                break
            decl = decl.find(f".//{{{XSD_NS}}}element[@name='{name}']")
        restriction = decl.find(f"{{{XSD_NS}}}simpleType/{{{XSD_NS}}}restriction") if decl is not None else None
        if restriction is None:
            continue
        words = [f"a {restriction.get('base', '').rpartition(':')[2] or 'value'}"]
        values = [e.get("value") for e in restriction.iterfind(f"{{{XSD_NS}}}enumeration")]
        if values:
            words = ["one of " + ", ".join(values)]
        for facet, text in _FACETS:
            for e in restriction.iterfind(f"{{{XSD_NS}}}{facet}"):
                words.append(text.format(e.get("value")))
        return " ".join(words)
    return None


_schema_cache: dict[str, bytes] = {}
_schema_lock = threading.Lock()


def _rewrite_locations(root: etree._Element, base_url: str) -> None:
    for tag in ("import", "include"):
        for imp in root.iter(f"{{{XSD_NS}}}{tag}"):
            loc = imp.get("schemaLocation")
            if loc and "/" not in loc:
                imp.set("schemaLocation", f"{base_url}{SCHEMA_PATH}{loc}")


def served_schema(name: str, base_url: str) -> bytes | None:
    """A schema file from wsdl/ with its imports made absolute; None when there is no such schema."""
    if name not in schema_files():
        return None
    key = f"{base_url}|{name}"
    with _schema_lock:
        if key not in _schema_cache:
            tree = etree.parse(str(WSDL_DIR / name), _local_parser())
            _rewrite_locations(tree.getroot(), base_url)
            _schema_cache[key] = etree.tostring(tree, xml_declaration=True, encoding="UTF-8")
        return _schema_cache[key]
