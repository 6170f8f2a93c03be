"""client/output.py writes to the sys.stdout of the moment (a CLI run in-process with its output
captured, e.g. contextlib.redirect_stdout, sees every line)."""
from __future__ import annotations

import contextlib
import io

from client.output import table


def test_table_writes_to_the_current_stdout():
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        table(["name", "state"], [["vm1", "Running"], ["vm22", None]])
    assert captured.getvalue().splitlines() == ["NAME  STATE", "vm1   Running", "vm22"]


def test_table_writes_to_the_stream_it_is_given():
    out = io.StringIO()
    table(["a"], [[1]], out=out)
    assert out.getvalue() == "A\n1\n"


def test_descriptor_json_has_the_schemas_integers_as_numbers_and_a_sites_extensions_as_written():
    from lxml import etree

    from client.output import element_to_dict, integer_elements
    from services.container.contract import WSDL_DIR

    assert {"vcpus", "memory", "size", "port"} <= integer_elements()
    assert not {"version", "name", "imageId", "created"} & integer_elements()
    ws = etree.fromstring((WSDL_DIR / "examples" / "debian12-hep.xml").read_bytes())
    ext = ws.find("{*}extensions")
    etree.SubElement(ext, "{http://example.org/grid-site/1}memory").text = "0042"     # a site's own element
    d = element_to_dict(ws)
    assert isinstance(d["hardware"]["vcpus"], int) and isinstance(d["hardware"]["memory"], int)
    assert all(isinstance(disk["size"], int) for disk in d["hardware"]["disk"])
    assert d["extensions"]["memory"] == "0042"                                       # not the schema's memory
    assert isinstance(d["identity"]["version"], str)
    assert element_to_dict(ws, typed=False)["hardware"]["vcpus"] == ws.findtext("{*}hardware/{*}vcpus")
