"""The workspace descriptor schema: the examples validate, bad descriptors are refused with a line,
hostile XML never reaches the validator, and repository-set fields keep the schema order."""
from __future__ import annotations

import pytest
from lxml import etree

from services.descriptor import workspace_schema
from services.descriptor import (FIELDS, WS, Descriptor, check_descriptor, facts, parse_descriptor,
                                 resolve_field, set_field, set_fields)
from services.faults import InvalidDescriptor
from tests.fixtures.repository import EXAMPLES

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.xml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_examples_validate_and_every_leaf_is_a_queryable_field(path):
    ws = parse_descriptor(path.read_bytes())
    for field_path, value in facts(ws):
        assert resolve_field(field_path) is not None, field_path
    assert Descriptor(ws).memory > 0


def test_the_examples_cover_the_poster_hardware():
    text = b"".join(p.read_bytes() for p in EXAMPLE_FILES)
    for tag in (b"<disk>", b"<cdrom>", b"<serialPort>", b"<parallelPort>", b"<nic>", b"<librarySignature>",
                b"<extensions>"):
        assert tag in text


def test_every_schema_leaf_has_a_field():
    """The query field table names every leaf element of workspace.xsd."""
    xs = "{http://www.w3.org/2001/XMLSchema}"
    schema = etree.parse(str(EXAMPLES.parent / "workspace.xsd")).getroot()
    types = {t.get("name"): t for t in schema if t.tag == f"{xs}complexType"}
    leaves: set[str] = set()

    def walk(ctype, prefix):
        for el in ctype.iter(f"{xs}element"):
            if el.getparent() is None:
                continue
            # only direct particles of this type (not of nested anonymous types)
            owner = next(a for a in el.iterancestors() if a.tag == f"{xs}complexType")
            if owner is not ctype:
                continue
            path = f"{prefix}.{el.get('name')}" if prefix else el.get("name")
            t = el.get("type", "")
            nested = el.find(f"{xs}complexType")
            if t.startswith("ws:") and t[3:] in types:
                walk(types[t[3:]], path)
            elif nested is not None:
                if nested.find(f".//{xs}element") is None:
                    leaves.add(path)
                walk(nested, path)
            else:
                leaves.add(path)

    walk(types["WorkspaceType"], "")
    leaves.discard("extensions")
    assert leaves == set(FIELDS)


def test_an_invalid_descriptor_names_its_line():
    text = (EXAMPLES / "debian12-emboss.xml").read_text().replace("<memory>512</memory>", "<memory>-5</memory>")
    with pytest.raises(InvalidDescriptor) as exc:
        parse_descriptor(text.encode())
    line = text.splitlines()[exc.value.line - 1]
    assert "<memory>-5</memory>" in line and "memory" in exc.value.schemaMessage


@pytest.mark.parametrize("doc, why", [
    (b'<?xml version="1.0"?><!DOCTYPE w [<!ENTITY a "aaaa">]><workspace xmlns="http://vmgrid.org/ns/workspace/1">&a;</workspace>',
     "DOCTYPE"),
    (b'<!DOCTYPE w SYSTEM "file:///etc/passwd"><w/>', "DOCTYPE"),
    (b"<workspace", "well-formed"),
    (b"<a>" * 100 + b"</a>" * 100, "deeper"),
    (b"<workspace xmlns='urn:other'/>", "expected a"),
    (b"x" * (300 * 1024), "exceeds"),
])
def test_hostile_or_broken_xml_is_refused_before_validation(doc, why):
    with pytest.raises(InvalidDescriptor) as exc:
        parse_descriptor(doc)
    assert why in exc.value.description


def test_repository_fields_are_inserted_in_schema_order():
    ws = parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes())
    set_field(ws, "identity", "created", "2026-11-25T00:00:00Z")
    set_field(ws, "identity", "imageId", "img-" + "0" * 32)
    set_field(ws, "identity", "owner", "/O=Grid/OU=x/CN=y")
    set_field(ws, "image", "size", "10")
    set_field(ws, "image", "sha256", "f" * 64)
    check_descriptor(ws)
    assert workspace_schema().validate(ws)
    set_field(ws, "identity", "description", None)
    check_descriptor(ws)
    assert Descriptor(ws).description is None


def test_several_fields_of_a_section_are_set_at_once_in_schema_order():
    """set_fields (a bulk import sets three identity fields of a thousand descriptors): the same descriptor as
    set_field one field at a time, new children made in schema order wherever they go, None removes."""
    one, many = (parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes()) for _ in range(2))
    values = {"created": "2026-11-25T00:00:00Z", "imageId": "img-" + "0" * 32, "owner": "/O=Grid/OU=x/CN=y"}
    for name, value in values.items():
        set_field(one, "identity", name, value)
    set_fields(many, "identity", values)
    assert etree.tostring(many) == etree.tostring(one)
    assert [etree.QName(c).localname for c in many.find(f"{{{WS}}}identity")][:4] == ["name", "imageId", "version",
                                                                                       "owner"]
    set_fields(many, "image", {"size": 10, "blake3": "a" * 64, "sha256": "f" * 64})
    assert [etree.QName(c).localname for c in many.find(f"{{{WS}}}image")] == ["format", "sha256", "size", "blake3"]
    check_descriptor(many)
    set_fields(many, "image", {"blake3": None, "size": 11})
    assert many.findtext(f"{{{WS}}}image/{{{WS}}}size") == "11" and many.find(f"{{{WS}}}image/{{{WS}}}blake3") is None
    with pytest.raises(ValueError):
        set_fields(many, "identity", {"colour": "blue"})
    ext = etree.SubElement(many, f"{{{WS}}}extensions")
    if many.find(f"{{{WS}}}container") is not None:
        many.remove(many.find(f"{{{WS}}}container"))
    set_fields(many, "container", {"port": 8443, "command": "/usr/local/bin/grid-container"})
    assert many.index(many.find(f"{{{WS}}}container")) == many.index(ext) - 1
    check_descriptor(many)


def test_a_wrong_root_is_refused():
    with pytest.raises(InvalidDescriptor):
        check_descriptor(etree.Element(f"{{{WS}}}image"))
