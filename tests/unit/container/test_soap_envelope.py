"""The container's response envelope (services.container.soap.envelope): every namespace under its conventional
prefix, declared once on the Envelope, except a prefix that QName-valued text uses (``vmm:State``): that
declaration stays as it is, and the namespace is not renamed (text is never rewritten)."""
from __future__ import annotations

from lxml import etree

from services.container import soap

VMM = soap.PREFIXES["vmm"]


def payload(xml: str) -> etree._Element:
    return etree.fromstring(xml)


def test_elements_take_the_conventional_prefixes_on_the_envelope():
    env = soap.envelope(payload(f'<x:GetStateResponse xmlns:x="{VMM}"><x:state>Running</x:state>'
                                f'</x:GetStateResponse>'))
    text = etree.tostring(env).decode()
    assert f'xmlns:vmm="{VMM}"' in text.split(">", 1)[0]              # on the Envelope
    assert "<vmm:GetStateResponse><vmm:state>Running</vmm:state>" in text
    assert "xmlns:x=" not in text


def test_a_prefix_used_by_qname_text_keeps_its_namespace_and_is_not_renamed():
    # the text says x:Running: the namespace x names must stay bound to x (renaming it to vmm would break the
    # QName), and a comment or processing instruction among the elements changes nothing
    env = soap.envelope(payload(f'<x:GetStateResponse xmlns:x="{VMM}"><!-- c --><?pi data?>'
                                f'<x:state>  x:Running </x:state><x:note>see http://example.org/a:b</x:note>'
                                f'</x:GetStateResponse>'))
    text = etree.tostring(env).decode()
    assert f'xmlns:x="{VMM}"' in text
    assert "<x:state>  x:Running </x:state>" in text
    assert f'xmlns:vmm="{VMM}"' not in text                           # the namespace keeps the text's prefix
    reparsed = etree.fromstring(etree.tostring(env))
    state = reparsed.find(f".//{{{VMM}}}state")
    assert state.nsmap["x"] == VMM


def test_text_with_a_colon_that_is_no_qname_renames_nothing():
    env = soap.envelope(payload(f'<x:R xmlns:x="{VMM}"><x:at>2026-11-29T19:07:53Z</x:at>'
                                f'<x:url>gsiftp://h:2811/x</x:url><x:p>y:z</x:p></x:R>'))
    text = etree.tostring(env).decode()
    assert "<vmm:R><vmm:at>2026-11-29T19:07:53Z</vmm:at><vmm:url>gsiftp://h:2811/x</vmm:url><vmm:p>y:z</vmm:p>" in text
