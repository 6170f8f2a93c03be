"""What a guest reports (guestd's ready and status messages) reaches the node's GuestStatus property, the
instance listings and the CLI. A guest is untrusted: its words are shown escaped and cut short, one line, and
no character it chooses can stop the node from building an answer (XML 1.0 cannot carry a C0 control or a lone
surrogate: one in a property made every ListInstances that carried the instance fail)."""
from __future__ import annotations

from lxml import etree

from services.vmmanager.phases import guest_summary
from services.wsrf.properties import sub, xml_text

HOSTILE = "x\n2026-11-29 00:00:00 vmgrid.node INFO instance inst-1 destroyed\x1b[2J\x00\ud800\u202e" + "A" * 60000


def test_a_guests_words_in_its_status_are_one_bounded_escaped_line():
    for status in ({"ready": False, "error": HOSTILE},
                   {"ready": True, "steps": {HOSTILE: {"ok": False}, "network": {"ok": True, "detail": {
                       "address": HOSTILE, "netmask": HOSTILE, "interface": HOSTILE}}},
                    "container": {"running": True, "pid": HOSTILE}},
                   {"ready": True, "steps": {f"s{i}": {"ok": False} for i in range(500)}},
                   {"ready": True, "steps": "not a dict", "container": ["not", "a", "dict"]}):
        line = guest_summary(status)
        assert "\n" not in line and "\x1b" not in line and "\x00" not in line and "\u202e" not in line
        line.encode("utf-8")                                                        # no lone surrogate: storable
        assert len(line) < 2000, len(line)
        etree.SubElement(etree.Element("r"), "GuestStatus").text = xml_text(line)   # builds


def test_any_text_becomes_element_text_xml_carries():
    root = etree.Element("r")
    el = sub(root, "GuestStatus", "a\x01b\x00c\ud800d\ufffe\tkept\nkept")
    assert el.text == "a\\x01b\\x00c\\ud800d\\ufffe\tkept\nkept"
    assert etree.fromstring(etree.tostring(root)).findtext("GuestStatus") == el.text
    assert xml_text("plain: unchanged \u00e9\U0001f600") == "plain: unchanged \u00e9\U0001f600"
