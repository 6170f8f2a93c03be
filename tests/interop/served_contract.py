"""The WSDLs a live grid serves, mirrored to local files for the code generators of other SOAP stacks (gSOAP's
wsdl2h, Axis's WSDL2Java): every schema they import saved beside them, schemaLocations made local, and a fixed
service address, so a client generated from them stays cached across runs while the contract is unchanged (the
grid's port changes every run; the clients take the endpoint as an argument)."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from lxml import etree

XS = "http://www.w3.org/2001/XMLSchema"


def mirror_contract(wsdls: dict[str, str], session, into: Path) -> Path:
    """The served WSDLs (file name: URL) and every schema they import, saved side by side with local
    schemaLocations and a fixed service address; returns the directory."""
    into.mkdir(parents=True, exist_ok=True)
    todo, seen = [(url, name) for name, url in wsdls.items()], set()
    while todo:
        url, name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        doc = etree.fromstring(session.get(url, timeout=30).content)
        for imp in doc.iter(f"{{{XS}}}import", f"{{{XS}}}include"):
            loc = imp.get("schemaLocation")
            if loc:
                local = Path(urlsplit(loc).path).name
                imp.set("schemaLocation", local)
                todo.append((loc, local))
        for addr in doc.iter("{http://schemas.xmlsoap.org/wsdl/soap/}address"):
            addr.set("location", "https://grid.invalid" + urlsplit(addr.get("location")).path)
        (into / name).write_bytes(etree.tostring(doc, xml_declaration=True, encoding="UTF-8"))
    return into
