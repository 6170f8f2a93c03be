"""The workspace descriptor (wsdl/workspace.xsd): validation with line numbers, a typed view, the
repository-set fields, and the flat (field, value) facts that queries run on."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from lxml import etree

from security.safexml import UnsafeXML, parse
from services.common.paths import WSDL_DIR
from services.common.xsdtime import now_datetime
from services.faults import InvalidDescriptor

_workspace_schema: etree.XMLSchema | None = None


def workspace_schema() -> etree.XMLSchema:
    """The descriptor schema, wsdl/workspace.xsd (loaded once; our own file: no network, no entities)."""
    global _workspace_schema
    if _workspace_schema is None:
        parser = etree.XMLParser(resolve_entities=False, no_network=True)
        _workspace_schema = etree.XMLSchema(etree.parse(str(WSDL_DIR / "workspace.xsd"), parser))
    return _workspace_schema

WS = "http://vmgrid.org/ns/workspace/1"
NSMAP = {"ws": WS}
ROOT = WORKSPACE_TAG = f"{{{WS}}}workspace"
MAX_DESCRIPTOR_BYTES = 256 * 1024
# A stored descriptor, with the fields the repository sets (imageId, owner, created, sha256, size, blake3): the
# catalogue refuses a longer one whatever path it came by (a SOAP request is not read through parse_descriptor).
MAX_STORED_DESCRIPTOR_BYTES = MAX_DESCRIPTOR_BYTES + 4096

# Field kinds: how a query compares values of a field.
TEXT, NUMBER, VERSION, TIME = "text", "number", "version", "time"

# Every leaf of the descriptor, by dotted path of element names, with its kind (docs/query.md).
FIELDS: dict[str, str] = {
    "identity.name": TEXT, "identity.imageId": TEXT, "identity.version": VERSION,
    "identity.owner": TEXT, "identity.vo": TEXT, "identity.description": TEXT, "identity.created": TIME,
    "hardware.architecture": TEXT, "hardware.vcpus": NUMBER, "hardware.memory": NUMBER,
    "hardware.disk.role": TEXT, "hardware.disk.size": NUMBER, "hardware.disk.format": TEXT,
    "hardware.disk.bus": TEXT, "hardware.disk.target": TEXT,
    "hardware.cdrom.bus": TEXT, "hardware.cdrom.purpose": TEXT,
    "hardware.serialPort.type": TEXT, "hardware.serialPort.purpose": TEXT,
    "hardware.parallelPort.type": TEXT,
    "hardware.nic.model": TEXT, "hardware.nic.network": TEXT,
    "software.os": TEXT, "software.distribution.name": TEXT, "software.distribution.version": VERSION,
    "software.kernel.version": VERSION, "software.boot.method": TEXT, "software.boot.kernelSha256": TEXT,
    "software.boot.initrdSha256": TEXT, "software.boot.cmdline": TEXT,
    "software.librarySignature.library.name": TEXT, "software.librarySignature.library.version": VERSION,
    "image.format": TEXT, "image.sha256": TEXT, "image.size": NUMBER, "image.blake3": TEXT,
    "container.command": TEXT, "container.port": NUMBER,
}
LIBRARY_PREFIX = "library."  # library.<name>: the version of that library (VERSION)

# Short names a scientist types; each maps onto a field path above.
ALIASES: dict[str, str] = {
    "name": "identity.name", "id": "identity.imageId", "imageId": "identity.imageId",
    "version": "identity.version", "owner": "identity.owner", "vo": "identity.vo",
    "description": "identity.description", "created": "identity.created",
    "arch": "hardware.architecture", "architecture": "hardware.architecture",
    "vcpus": "hardware.vcpus", "cpus": "hardware.vcpus", "ram": "hardware.memory", "memory": "hardware.memory",
    "disk": "hardware.disk.size", "disk.size": "hardware.disk.size", "disk.role": "hardware.disk.role",
    "disk.format": "hardware.disk.format", "disk.bus": "hardware.disk.bus",
    "cdrom": "hardware.cdrom.bus", "serial": "hardware.serialPort.type", "parallel": "hardware.parallelPort.type",
    "nic": "hardware.nic.model", "network": "hardware.nic.network",
    "os": "software.os", "distribution": "software.distribution.name", "distro": "software.distribution.name",
    "distribution.version": "software.distribution.version", "kernel": "software.kernel.version",
    "library": "software.librarySignature.library.name",
    "format": "image.format", "sha256": "image.sha256", "size": "image.size", "image.size": "image.size",
    "blake3": "image.blake3",
    "container": "container.command",
}
# Units of numeric fields: memory in MiB, sizes in bytes.
FIELD_UNIT = {"hardware.memory": "MiB", "hardware.disk.size": "B", "image.size": "B"}


def resolve_field(name: str) -> tuple[str, str] | None:
    """The canonical path and kind of a field name or alias; None when there is no such field."""
    if name.startswith(LIBRARY_PREFIX) and len(name) > len(LIBRARY_PREFIX):
        return name, VERSION
    path = ALIASES.get(name, name)
    kind = FIELDS.get(path)
    return (path, kind) if kind else None


# -- validation -----------------------------------------------------------------------------

def check_descriptor(element: etree._Element) -> etree._Element:
    """Validate a descriptor element against workspace.xsd; raise InvalidDescriptor with the line
    and column in the descriptor as written out on its own (pretty-printed)."""
    if element.tag != ROOT:
        raise InvalidDescriptor(f"expected a {{{WS}}}workspace element, got {element.tag}",
                                schemaMessage="wrong root element")
    schema = workspace_schema()
    if schema.validate(element):
        return element
    text = etree.tostring(element, pretty_print=True)
    standalone = etree.fromstring(text)
    schema.validate(standalone)
    err = schema.error_log.last_error or schema.error_log[0]
    raise InvalidDescriptor(f"line {err.line}: {err.message}", line=err.line, column=err.column,
                            schemaMessage=err.message)


def parse_descriptor(data: bytes) -> etree._Element:
    """Parse (hardened) and validate a descriptor document; errors carry the document's own line."""
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise InvalidDescriptor(f"descriptor of {len(data)} bytes exceeds {MAX_DESCRIPTOR_BYTES} bytes")
    try:
        root = parse(data)
    except UnsafeXML as exc:
        raise InvalidDescriptor(str(exc), line=exc.line, schemaMessage=exc.reason) from None
    if root.tag != ROOT:
        raise InvalidDescriptor(f"expected a {{{WS}}}workspace element, got {root.tag}",
                                line=root.sourceline, schemaMessage="wrong root element")
    if next(root.iter(etree.Comment), None) is not None:
        # A comment inside a value splits its text: the schema checks the whole value (`x<!-- -->y` is "xy") where
        # `.text` reads "x", and a signed message may not carry comments at all (security/wssec.py). Dropped, with
        # the text around each joined: what was validated is what is used and sent.
        etree.strip_tags(root, etree.Comment)
    schema = workspace_schema()
    if not schema.validate(root):
        err = schema.error_log.last_error
        raise InvalidDescriptor(f"line {err.line}: {err.message}", line=err.line, column=err.column,
                                schemaMessage=err.message)
    return root


# -- a typed view ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Disk:
    role: str
    size: int
    format: str
    bus: str
    target: str | None


@dataclass(frozen=True)
class Descriptor:
    """Read-only view of a validated descriptor element."""

    element: etree._Element

    def _text(self, path: str) -> str | None:
        el = self.element.find(path, NSMAP)
        return el.text if el is not None else None

    @property
    def name(self) -> str: return self._text("ws:identity/ws:name")
    @property
    def image_id(self) -> str | None: return self._text("ws:identity/ws:imageId")
    @property
    def version(self) -> str: return self._text("ws:identity/ws:version")
    @property
    def owner(self) -> str | None: return self._text("ws:identity/ws:owner")
    @property
    def vo(self) -> str: return self._text("ws:identity/ws:vo")
    @property
    def description(self) -> str | None: return self._text("ws:identity/ws:description")
    @property
    def created(self) -> str | None: return self._text("ws:identity/ws:created")
    @property
    def architecture(self) -> str: return self._text("ws:hardware/ws:architecture")
    @property
    def vcpus(self) -> int: return int(self._text("ws:hardware/ws:vcpus"))
    @property
    def memory(self) -> int: return int(self._text("ws:hardware/ws:memory"))
    @property
    def os(self) -> str: return self._text("ws:software/ws:os")
    @property
    def distribution(self) -> str: return self._text("ws:software/ws:distribution/ws:name")
    @property
    def kernel_version(self) -> str: return self._text("ws:software/ws:kernel/ws:version")
    @property
    def image_format(self) -> str: return self._text("ws:image/ws:format")
    @property
    def sha256(self) -> str | None: return self._text("ws:image/ws:sha256")

    @property
    def blake3(self) -> str | None: return self._text("ws:image/ws:blake3")

    @property
    def size(self) -> int | None:
        s = self._text("ws:image/ws:size")
        return int(s) if s is not None else None

    @property
    def container_command(self) -> str | None: return self._text("ws:container/ws:command")

    @property
    def disks(self) -> list[Disk]:
        out = []
        for d in self.element.iterfind("ws:hardware/ws:disk", NSMAP):
            t = d.find("ws:target", NSMAP)
            out.append(Disk(d.findtext("ws:role", namespaces=NSMAP), int(d.findtext("ws:size", namespaces=NSMAP)),
                            d.findtext("ws:format", namespaces=NSMAP), d.findtext("ws:bus", namespaces=NSMAP),
                            t.text if t is not None else None))
        return out

    @property
    def libraries(self) -> dict[str, str]:
        return {lib.findtext("ws:name", namespaces=NSMAP): lib.findtext("ws:version", namespaces=NSMAP)
                for lib in self.element.iterfind("ws:software/ws:librarySignature/ws:library", NSMAP)}


def image_blake3(data: bytes) -> str | None:
    """The ``image/blake3`` of a stored descriptor (the node's record of a deployed one), or None."""
    el = etree.fromstring(data, _STORED).find("ws:image/ws:blake3", NSMAP)
    return el.text if el is not None else None


_STORED = etree.XMLParser(resolve_entities=False, no_network=True)  # descriptors already validated and stored


# -- repository-set fields (kept in schema order) -----------------------------------------------

_IDENTITY_ORDER = ["name", "imageId", "version", "owner", "vo", "description", "created"]
_IMAGE_ORDER = ["format", "sha256", "size", "blake3"]
_HARDWARE_ORDER = ["architecture", "vcpus", "memory"]
_CONTAINER_ORDER = ["command", "port"]


_SECTION_ORDER = {"identity": _IDENTITY_ORDER, "image": _IMAGE_ORDER, "hardware": _HARDWARE_ORDER,
                  "container": _CONTAINER_ORDER}


def _child(parent: etree._Element, tag: str) -> etree._Element | None:
    for c in parent:
        if c.tag == tag:
            return c
    return None


# each section's children by tag, with their place in the schema's order
_RANK = {section: {f"{{{WS}}}{name}": i for i, name in enumerate(order)} for section, order in _SECTION_ORDER.items()}


def set_field(element: etree._Element, section: str, name: str, value: str | None) -> None:
    """Set (or with None remove) a simple child of identity/image/hardware/container, in schema order."""
    set_fields(element, section, {name: value})


def set_fields(element: etree._Element, section: str, values: dict[str, object]) -> None:
    """Set (or with None remove) simple children of one of identity/image/hardware/container, in schema order: the
    section and its children are looked up once (a bulk import sets three fields of a thousand descriptors). New
    children are made inside the document (an element made on its own is a document of its own, moved in)."""
    rank = _RANK[section]
    parent = _child(element, f"{{{WS}}}{section}")
    if parent is None:
        if section != "container":
            raise ValueError(f"descriptor has no {section}")
        ext = _child(element, f"{{{WS}}}extensions")
        parent = etree.SubElement(element, f"{{{WS}}}container")
        if ext is not None:
            ext.addprevious(parent)
    children: dict[str, etree._Element] = {}
    for c in parent:
        children.setdefault(c.tag, c)
    for name, value in values.items():
        tag = f"{{{WS}}}{name}"
        if tag not in rank:
            raise ValueError(f"{section} has no simple field {name}")
        existing = children.get(tag)
        if value is None:
            if existing is not None:
                parent.remove(existing)
                del children[tag]
            continue
        if existing is None:
            place = rank[tag]
            anchor = next((c for c in parent if rank.get(c.tag, -1) > place), None)
            existing = children[tag] = etree.SubElement(parent, tag)
            if anchor is not None:
                anchor.addprevious(existing)
        existing.text = str(value)


_SIMPLE_SECTIONS = {f"{{{WS}}}{s}": s for s in ("identity", "hardware", "image")}


def simple_fields(element: etree._Element) -> dict[str, str]:
    """The text of each simple child of identity, hardware and image (``"identity.name"``, ``"image.sha256"``,
    ...), in one pass: what :class:`Descriptor`'s properties read one search at a time (a bulk import reads
    a thousand descriptors)."""
    out: dict[str, str] = {}
    skip = len(WS) + 2
    for section in element:
        top = _SIMPLE_SECTIONS.get(section.tag)
        if top is None:
            continue
        for c in section:
            if isinstance(c.tag, str) and c.text is not None and not len(c):
                out.setdefault(f"{top}.{c.tag[skip:]}", c.text)
    return out


def utc_now() -> str:
    return now_datetime(fraction=False)


# -- facts for queries --------------------------------------------------------------------------

def facts(element: etree._Element) -> list[tuple[str, str]]:
    """Every (field path, value) of a descriptor, plus (library.<name>, version) per library.
    Extensions are left to the XPath dialect."""
    out: list[tuple[str, str]] = []
    for section in element:
        if not isinstance(section.tag, str):
            continue
        top = etree.QName(section).localname
        if top == "extensions":
            continue
        _walk(section, top, out)
    for lib in element.iterfind("ws:software/ws:librarySignature/ws:library", NSMAP):
        out.append((LIBRARY_PREFIX + lib.findtext("ws:name", namespaces=NSMAP),
                    lib.findtext("ws:version", namespaces=NSMAP)))
    return out


def _walk(el: etree._Element, path: str, out: list[tuple[str, str]]) -> None:
    leaf = True
    for c in el:
        tag = c.tag
        if not isinstance(tag, str):
            continue
        leaf = False
        _walk(c, path + "." + tag.rpartition("}")[2], out)
    if leaf and el.text is not None and path in FIELDS:
        out.append((path, el.text.strip()))


# -- comparing values -----------------------------------------------------------------------------

_SEGMENT = re.compile(r"\d+|[A-Za-z]+")


@functools.lru_cache(maxsize=65536)
def version_key(version: str) -> str:
    """A text key whose byte order is version order: numeric segments compare as numbers
    (6.6 < 6.10), letters below numbers (1.0rc1 < 1.0.1), trailing zero segments ignored (6.6 == 6.6.0)."""
    segments = _SEGMENT.findall(version)
    while segments and segments[-1].isdigit() and int(segments[-1]) == 0:
        segments.pop()
    parts = []
    for s in segments:
        if s.isdigit():
            digits = s.lstrip("0") or "0"
            parts.append(f"n{len(digits):02d}{digits}")
        else:
            parts.append("a" + s.lower())
    return " ".join(parts)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)
_FACTOR = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def number_value(path: str, text: str) -> float:
    """A query's numeric value in the field's unit: memory in MiB, sizes in bytes; suffixes
    K/M/G/T (powers of 1024, optional iB) are accepted, e.g. ``ram >= 1G`` is 1024 MiB."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a number")
    number, prefix = float(m.group(1)), m.group(2).upper()
    if m.group(3) and not prefix and m.group(3).lower() != "b":
        raise ValueError(f"{text!r} is not a number")
    value = number * _FACTOR[prefix]
    if prefix and FIELD_UNIT.get(path) == "MiB":
        value /= 1024**2
    elif prefix and path not in FIELD_UNIT:
        raise ValueError(f"{path} is a count, not a size: {text!r}")
    return value
