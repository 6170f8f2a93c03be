"""How the command line shows results: aligned tables for people, JSON and XML for scripts."""
from __future__ import annotations

import json
import sys
from functools import lru_cache
from typing import Iterable, Sequence

from lxml import etree

from services.common.errors import printable
from services.common.paths import WSDL_DIR
from services.descriptor import WS, Descriptor

REPEATED = {"disk", "cdrom", "serialPort", "parallelPort", "nic", "library"}


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], out=None) -> None:
    out = sys.stdout if out is None else out      # bound at call time (tests swap sys.stdout)
    rows = [["" if v is None else printable(v) for v in r] for r in rows]      # a service's words: escaped
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()
    print(line, file=out)
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip(), file=out)


XS = "{http://www.w3.org/2001/XMLSchema}"
XS_INTEGERS = {"integer", "int", "long", "short", "byte", "positiveInteger", "nonNegativeInteger",
               "negativeInteger", "nonPositiveInteger", "unsignedLong", "unsignedInt", "unsignedShort", "unsignedByte"}


@lru_cache(maxsize=1)
def integer_elements() -> frozenset[str]:
    """The local names of wsdl/workspace.xsd's elements whose type is an integer type (through its named or
    inline simple types), and that no element of another type shares: their values are JSON numbers."""
    schema = etree.parse(str(WSDL_DIR / "workspace.xsd"), etree.XMLParser(resolve_entities=False, no_network=True))
    named = {t.get("name"): t for t in schema.iter(f"{XS}simpleType") if t.get("name")}

    def is_integer(type_name: str | None, inline) -> bool:
        for _ in range(20):                       # a restriction's base, its base, ...: a short chain
            if inline is None:
                if not type_name:
                    return False
                prefix, _, local = type_name.rpartition(":")
                if prefix == "xs":
                    return local in XS_INTEGERS
                inline = named.get(local)
                if inline is None:
                    return False                  # a complex type
            restriction = inline.find(f"{XS}restriction")
            if restriction is None:
                return False                      # a list or a union
            type_name, inline = restriction.get("base"), restriction.find(f"{XS}simpleType")
        return False

    kinds: dict[str, set[bool]] = {}
    for element in schema.iter(f"{XS}element"):
        if element.get("name"):
            integer = is_integer(element.get("type"), element.find(f"{XS}simpleType"))
            kinds.setdefault(element.get("name"), set()).add(integer)
    return frozenset(name for name, k in kinds.items() if k == {True})


def element_to_dict(el: etree._Element, *, typed: bool = True):
    """A descriptor (or any simple XML) as JSON-ready data; repeated elements become lists. With ``typed``, the
    values of the schema's integer elements are numbers (`"vcpus": 1`); never inside `extensions`, whose
    elements are a site's own."""
    children = [c for c in el if isinstance(c.tag, str)]
    if not children:
        text = el.text.strip() if el.text and el.text.strip() else (None if len(el) == 0 else "")
        if typed and text and etree.QName(el).localname in integer_elements() and text.lstrip("-").isdigit() \
                and text.isascii() and len(text) <= 40:
            return int(text)
        return text
    out: dict = {}
    for c in children:
        local = etree.QName(c).localname
        value = element_to_dict(c, typed=typed and local != "extensions")
        if local in REPEATED:
            out.setdefault(local, []).append(value)
        elif local in out:
            prev = out[local]
            out[local] = (prev if isinstance(prev, list) else [prev]) + [value]
        else:
            out[local] = value
    return out


def human_size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_row(el: etree._Element) -> list[object]:
    d = Descriptor(el)
    libs = " ".join(f"{k}-{v}" for k, v in d.libraries.items())
    return [d.image_id, f"{d.vo}/{d.name}", d.version, f"{d.memory} MiB", d.vcpus,
            f"{d.distribution} {d.element.findtext('{*}software/{*}distribution/{*}version')}",
            d.kernel_version, human_size(d.size), libs]


SUMMARY_HEADERS = ["id", "image", "version", "ram", "vcpus", "distribution", "kernel", "size", "libraries"]


def plain_descriptor(el: etree._Element) -> etree._Element:
    """A copy of a descriptor with the workspace namespace as the default one (no ns0: prefixes),
    as a scientist would write the file; extension elements keep their own namespaces."""

    def copy(src: etree._Element, parent: etree._Element | None) -> etree._Element:
        if parent is None:
            dst = etree.Element(src.tag, nsmap={None: WS}, attrib=dict(src.attrib))
        else:
            dst = etree.SubElement(parent, src.tag, attrib=dict(src.attrib))
        dst.text, dst.tail = src.text, src.tail
        for child in src:
            if isinstance(child.tag, str):
                copy(child, dst)
        return dst

    return copy(el, None)


def emit_descriptors(descriptors: list[etree._Element], fmt: str, *, total: int | None = None,
                     offset: int = 0, out=None) -> None:
    out = sys.stdout if out is None else out      # bound at call time (tests swap sys.stdout)
    if fmt == "json":
        data = {"descriptors": [element_to_dict(d) for d in descriptors]}
        if total is not None:
            data = {"total": total, "offset": offset, **data}
        json.dump(data, out, indent=2)
        print(file=out)
    elif fmt == "xml":
        if total is not None:
            print(f'<!-- {total} matching, from {offset} -->', file=out)
        for d in descriptors:
            clean = plain_descriptor(d)
            for node in clean.iter():
                if node.text is not None and not node.text.strip():
                    node.text = None
                node.tail = None
            print(etree.tostring(clean, pretty_print=True, encoding="unicode"), end="", file=out)
    else:
        table(SUMMARY_HEADERS, [summary_row(d) for d in descriptors], out=out)
        if total is not None:
            shown = f"{offset + 1}-{offset + len(descriptors)}" if descriptors else "none"
            print(f"{total} matching; showing {shown}", file=out)


def show_descriptor(el: etree._Element, out=None) -> None:
    """A descriptor in full, readable."""
    out = sys.stdout if out is None else out      # bound at call time (tests swap sys.stdout)
    d = Descriptor(el)
    rows = [
        ("image", f"{d.vo}/{d.name} (version {d.version})"), ("id", d.image_id), ("owner", d.owner),
        ("created", d.created), ("description", d.description),
        ("hardware", f"{d.architecture}, {d.vcpus} vCPU, {d.memory} MiB RAM"),
    ]
    for disk in d.disks:
        rows.append(("disk", f"{disk.role}: {human_size(disk.size)} {disk.format} on {disk.bus}"
                     + (f" as {disk.target}" if disk.target else "")))
    for tag, label in (("cdrom", "cd-rom"), ("serialPort", "serial port"), ("parallelPort", "parallel port"),
                       ("nic", "nic")):
        for dev in el.iterfind(f"{{*}}hardware/{{*}}{tag}"):
            rows.append((label, ", ".join(c.text for c in dev if isinstance(c.tag, str) and c.text)))
    rows += [
        ("os", f"{d.os}, {d.distribution} {el.findtext('{*}software/{*}distribution/{*}version')}, "
               f"kernel {d.kernel_version}, boot from {el.findtext('{*}software/{*}boot/{*}method')}"),
    ]
    for name, version in d.libraries.items():
        rows.append(("library", f"{name} {version}"))
    rows += [("image bytes", f"{d.image_format}, {human_size(d.size)}, sha256 {d.sha256}"),
             ("container", d.container_command)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        if v is not None:
            print(f"{k.rjust(width)}  {printable(v)}", file=out)     # the service's words: escaped


class Waiting:
    """One line while something is awaited: ``vmgrid: waiting for WHAT...`` printed once on the first
    ``tick``; on a terminal a spinner after it (redrawn in place), elsewhere nothing more (no line per retry).
    ``done`` ends the line (on a terminal with ``ready``)."""

    SPIN = "|/-\\"

    def __init__(self, what: str, out=None):
        self.what = what
        self.out = sys.stderr if out is None else out
        self.out = getattr(self.out, "unfiltered", self.out)       # its own backspaces, not escaped
        self.ticks = 0
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())

    def tick(self) -> None:
        if self.ticks == 0:
            self.out.write(f"vmgrid: waiting for {printable(self.what)}..." + (" " if self.tty else "\n"))
        if self.tty:
            self.out.write(("\b" if self.ticks else "") + self.SPIN[self.ticks % len(self.SPIN)])
        self.ticks += 1
        self.out.flush()

    def done(self, outcome: str = "ready") -> None:
        if self.ticks and self.tty:
            self.out.write(f"\b{printable(outcome)}\n")
            self.out.flush()
