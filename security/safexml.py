"""Hardened XML parsing: the one place where vmgrid turns untrusted bytes into an lxml tree.

No DTDs (a DOCTYPE is refused outright), no entity expansion, no network or
file access, no XInclude, a bounded input size, a bounded element depth and a bounded
number of markup items (elements and attributes: the tree's memory).
Every service, the WS-Security verifier, the descriptor validator and the
client parse through :func:`parse`.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

from lxml import etree

_DOCTYPE = b"<!DOCTYPE"
_DOCTYPE16LE = "<!DOCTYPE".encode("utf-16-le")
_DOCTYPE16BE = "<!DOCTYPE".encode("utf-16-be")
_DOCTYPE32 = ("<!DOCTYPE".encode("utf-32-le"), "<!DOCTYPE".encode("utf-32-be"))   # libxml2 reads UTF-32 too
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_DEPTH = 64
# Markup items: each "<" (a tag, an end tag, a comment, CDATA) and each "=" (an attribute, a namespace declaration).
# libxml2 spends some 130-250 bytes per node: 16 MiB of "<b/>" or of 'a="" ' took 550-850 MiB of a process for one
# message, before its signature was looked at; 16 MiB of real descriptors hold 1.3 million items (167 MiB). A
# million items bounds one message's tree to about 250 MiB and is eight times the 120,000 of an ImportImages of 1,000
# descriptors.
DEFAULT_MAX_NODES = 1_000_000


class UnsafeXML(ValueError):
    """The document is not well-formed, or breaks one of the hardening limits."""

    def __init__(self, reason: str, line: int | None = None):
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.reason = reason
        self.line = line


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    max_nodes: int = DEFAULT_MAX_NODES


DEFAULT_LIMITS = Limits()


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        load_dtd=False,
        dtd_validation=False,
        no_network=True,
        huge_tree=False,
        remove_pis=True,
        collect_ids=False,
    )


_local = threading.local()  # an lxml parser must not be shared by concurrent threads


def _thread_parser() -> etree.XMLParser:
    p = getattr(_local, "parser", None)
    if p is None:
        p = _local.parser = _parser()
    return p


def markup_items(data: bytes) -> int:
    """The markup items of a document as the limits count them: its '<' and '=' bytes (elements and attributes;
    an upper bound in any encoding, counted before libxml2 builds a node). The container's budget of parse
    trees (security.middleware.MarkupBudget) counts the same way."""
    return data.count(b"<") + data.count(b"=")


def parse(data: bytes | str, limits: Limits = DEFAULT_LIMITS) -> etree._Element:
    """Parse untrusted XML and return its root element, or raise :class:`UnsafeXML`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > limits.max_bytes:
        raise UnsafeXML(f"document of {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    if not data.strip():
        raise UnsafeXML("empty document")
    # counted on the bytes (an upper bound in any encoding) before libxml2 builds a node
    nodes = markup_items(data) if len(data) > limits.max_nodes else 0
    if nodes > limits.max_nodes:
        raise UnsafeXML(f"document of {nodes} markup items ('<' and '=': elements, attributes) exceeds the limit "
                        f"of {limits.max_nodes}")
    # every form of "<!DOCTYPE" above holds the byte 0x21 ("!"): one scan for it spares the five on most messages
    if b"!" in data and (_DOCTYPE in data or _DOCTYPE16LE in data or _DOCTYPE16BE in data
                         or any(d in data for d in _DOCTYPE32)):
        # Refused before libxml2 sees it: no internal subset, no external DTD fetch.
        raise UnsafeXML("DOCTYPE declarations are not allowed")
    try:
        root = etree.fromstring(data, _thread_parser())
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if exc.lineno else None
        if "Excessive depth" in exc.msg:   # libxml2's own cap (256) met before ours
            raise UnsafeXML(f"elements nested deeper than {min(limits.max_depth, 256)} levels", line) from None
        raise UnsafeXML(f"not well-formed XML: {' '.join(exc.msg.split())}", line) from None   # libxml2's has newlines
    if root is None:
        raise UnsafeXML("empty document")
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise UnsafeXML("DOCTYPE declarations are not allowed")
    _check_depth(root, limits.max_depth)
    return root


def _check_depth(root: etree._Element, max_depth: int) -> None:
    deeper = _deeper_than(max_depth)(root)
    if deeper:
        raise UnsafeXML(f"elements nested deeper than {max_depth} levels", deeper[0].sourceline)


@functools.lru_cache(maxsize=16)
def _deeper_than(max_depth: int) -> etree.XPath:
    """An XPath selecting the elements at depth max_depth + 1 (the root element is at depth 1): libxml2 walks the
    tree in C, some fifteen times faster than a Python walk over every element."""
    return etree.XPath("/" + "/".join(["*"] * (max_depth + 1)))
