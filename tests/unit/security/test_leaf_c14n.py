"""The exclusive c14n of a leaf header block written directly (`wssec._leaf_c14n`) is byte for byte libxml2's, and
every other element is left to libxml2; a signed message whose leaf blocks are canonicalized that way still verifies
with the digests any other signer computes, and a changed block is still caught."""
from __future__ import annotations

import pytest
from lxml import etree

from security.wssec import (Q_ID, WSU, FailedCheck, _leaf_c14n, c14n, sign_envelope, sign_in_place,
                            verify_envelope)
from tests.fixtures.pki import echo_envelope

WSA = "http://www.w3.org/2005/08/addressing"
TEXTS = ["http://vmgrid.org/ns/vmrepository/1/QueryImages", "", "a & b < c > d", 'quote " and \' apostrophe',
         "tab\tnew\nline", "é ünïcode ☃ 𝄞", "  spaced  ", "]]>"]
IDS = ["id-0", "id-&<\"'", "x\ty"]


def _parsed(prefix: str, text_xml: str, id_xml: str = "id-1", extra_ns: str = "") -> etree._Element:
    doc = (f'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" xmlns:wsu="{WSU}"{extra_ns}>'
           f'<s:Header><{prefix}:Action xmlns:{prefix}="{WSA}" wsu:Id="{id_xml}">{text_xml}</{prefix}:Action>'
           f'</s:Header></s:Envelope>')
    return etree.fromstring(doc.encode())[0][0]


@pytest.mark.parametrize("prefix", ["wsa", "a", "zz", "wsv", "wsuu"])
def test_parsed_leaves_match_libxml2(prefix):
    texts = ["plain", "a &amp; b &lt; c &gt; d", "cr&#13;lf", "&#9;tab", "<![CDATA[x < y & z]]>", "é ☃"]
    for text in texts:
        for id_xml in ("id-1", "a&amp;b&quot;c&#9;d&#10;e&#13;f&lt;g&gt;"):
            el = _parsed(prefix, text, id_xml, extra_ns=' xmlns:other="urn:other" xmlns="urn:default"')
            assert _leaf_c14n(el) == c14n(el), (prefix, text, id_xml)


def test_built_leaves_match_libxml2():
    for text in TEXTS:
        for value in IDS:
            env = etree.Element("{http://schemas.xmlsoap.org/soap/envelope/}Envelope", nsmap={"wsu": WSU})
            header = etree.SubElement(env, "{http://schemas.xmlsoap.org/soap/envelope/}Header")
            el = etree.SubElement(header, f"{{{WSA}}}MessageID", nsmap={"wsa": WSA})
            el.text = text
            el.set(Q_ID, value)
            assert _leaf_c14n(el) == c14n(el), (text, value)


@pytest.mark.parametrize("doc", [
    # children, comments, two attributes, no wsu:Id, no prefix, the wsu prefix on the element, wsu under two prefixes
    f'<a:X xmlns:a="urn:a" xmlns:wsu="{WSU}" wsu:Id="i"><a:Y/></a:X>',
    f'<a:X xmlns:a="urn:a" xmlns:wsu="{WSU}" wsu:Id="i">t<!-- c --></a:X>',
    f'<a:X xmlns:a="urn:a" xmlns:wsu="{WSU}" wsu:Id="i" a:b="1">t</a:X>',
    '<a:X xmlns:a="urn:a" Id="i">t</a:X>',
    f'<X xmlns="urn:a" xmlns:wsu="{WSU}" wsu:Id="i">t</X>',
    f'<wsu:X xmlns:wsu="{WSU}" wsu:Id="i">t</wsu:X>',
    f'<a:X xmlns:a="urn:a" xmlns:wsu="{WSU}" xmlns:u2="{WSU}" wsu:Id="i">t</a:X>',
    f'<a:X xmlns:a="urn:a" xmlns:u2="{WSU}" u2:Id="i">t</a:X>',
])
def test_other_elements_are_left_to_libxml2(doc):
    assert _leaf_c14n(etree.fromstring(doc.encode())) is None


def test_a_signed_message_with_leaf_blocks_verifies_and_a_changed_block_is_caught(grid_pki):
    env = echo_envelope("x")
    header = env.find("{http://schemas.xmlsoap.org/soap/envelope/}Header")
    if header is None:
        header = etree.Element("{http://schemas.xmlsoap.org/soap/envelope/}Header")
        env.insert(0, header)
    for name, text in (("Action", "urn:echo & more"), ("MessageID", "urn:uuid:1"), ("To", "https://h/x?a=1&b=<2>")):
        etree.SubElement(header, f"{{{WSA}}}{name}", nsmap={"wsa": WSA}).text = text
    data = sign_envelope(env, grid_pki.bob.proxy)
    root = etree.fromstring(data)
    blocks = [el for el in root[0] if el.tag.startswith(f"{{{WSA}}}")]
    assert len(blocks) == 3 and all(_leaf_c14n(b) == c14n(b) for b in blocks)
    verify_envelope(data, grid_pki.trust())
    # the general signer (libxml2's c14n for every reference: a caller's wsu:Id that needs escaping takes it), checked
    # by the verifier's direct texts
    general = etree.fromstring(etree.tostring(env))
    for el in general[0]:
        el.attrib.pop(Q_ID, None)
    general[0][0].set(Q_ID, 'mine&"1"')
    data2 = etree.tostring(sign_in_place(general, grid_pki.bob.proxy))
    assert b'wsu:Id="mine&amp;&quot;1&quot;"' in data2
    verify_envelope(data2, grid_pki.trust())
    changed = data.replace(b"urn:uuid:1<", b"urn:uuid:2<")
    assert changed != data
    with pytest.raises(FailedCheck, match="MessageID"):
        verify_envelope(changed, grid_pki.trust())
