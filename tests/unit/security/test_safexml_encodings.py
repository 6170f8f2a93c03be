"""safexml refuses a DOCTYPE before libxml2 reads it, whatever encoding the document declares: UTF-32 too
(before, a UTF-32 internal subset reached libxml2, whose own amplification cap was all that stopped a
billion-laughs document)."""
from __future__ import annotations

import pytest

from security.safexml import UnsafeXML, parse

LAUGHS = ('<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
          + "".join(f'<!ENTITY {chr(98 + i)} "' + f"&{chr(97 + i)};" * 10 + '">' for i in range(9))
          + "]><r>&j;</r>")


@pytest.mark.parametrize("encoding", ["utf-32", "utf-32-le", "utf-32-be", "utf-16", "utf-8"])
def test_a_doctype_is_refused_as_such_in_every_encoding(encoding):
    data = (f'<?xml version="1.0" encoding="{encoding.upper()}"?>' + LAUGHS).encode(encoding)
    with pytest.raises(UnsafeXML) as refused:
        parse(data)
    assert refused.value.reason == "DOCTYPE declarations are not allowed"


@pytest.mark.parametrize("codec", ["cp037", "cp500"])
def test_a_doctype_in_ebcdic_is_refused_and_the_reason_is_one_line(codec):
    """EBCDIC hides "<!DOCTYPE" from the byte scan; libxml2 (without iconv's EBCDIC) refuses the document, and the
    reason is one line (libxml2's message ended in a newline, which split a fault string and a log line)."""
    data = f'<?xml version="1.0" encoding="{codec.upper()}"?>'.encode(codec) + LAUGHS.encode(codec)
    with pytest.raises(UnsafeXML) as refused:
        parse(data)
    assert "\n" not in str(refused.value) and "&j;" not in str(refused.value)
