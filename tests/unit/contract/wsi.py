"""A WS-I Basic Profile 1.1 check of a WSDL 1.1 document (the rules a document-literal SOAP 1.1 contract
meets), returning the violations as readable lines. `schemas` maps each namespace the WSDL may name to
the schema documents defining it, so that references can be resolved (R2102)."""
from __future__ import annotations

from lxml import etree

WSDL = "http://schemas.xmlsoap.org/wsdl/"
SOAPB = "http://schemas.xmlsoap.org/wsdl/soap/"
XS = "http://www.w3.org/2001/XMLSchema"
HTTP_TRANSPORT = "http://schemas.xmlsoap.org/soap/http"
NS = {"wsdl": WSDL, "soap": SOAPB, "xs": XS}


def _qname(el: etree._Element, value: str) -> etree.QName:
    prefix, _, local = value.rpartition(":")
    return etree.QName(el.nsmap.get(prefix or None), local)


def global_elements(schemas: dict[str, list[etree._Element]]) -> set[str]:
    """Clark names of the global elements the schemas declare."""
    out = set()
    for namespace, docs in schemas.items():
        for doc in docs:
            for el in doc.findall("xs:element", NS):
                out.add(f"{{{namespace}}}{el.get('name')}")
    return out


def violations(wsdl: etree._Element, schemas: dict[str, list[etree._Element]]) -> list[str]:
    """The WS-I BP 1.1 rules this WSDL breaks (empty when it conforms)."""
    bad: list[str] = []
    tns = wsdl.get("targetNamespace")
    declared = global_elements(schemas)

    # R2102: a QName a part names is in a namespace the types section's schemas import or define directly.
    direct = set()
    for schema in wsdl.findall("wsdl:types/xs:schema", NS):
        direct.add(schema.get("targetNamespace"))
        direct |= {imp.get("namespace") for imp in schema.findall("xs:import", NS)}

    messages: dict[str, list[etree._Element]] = {}
    for m in wsdl.findall("wsdl:message", NS):
        parts = m.findall("wsdl:part", NS)
        messages[m.get("name")] = parts
        if len(parts) > 1:
            bad.append(f"R2210/R2201: message {m.get('name')} has {len(parts)} parts (document-literal: at most one)")
        for part in parts:
            if part.get("type") is not None or part.get("element") is None:
                bad.append(f"R2204/R2205: message {m.get('name')} part {part.get('name')} must name an element")
                continue
            q = _qname(part, part.get("element"))
            if q.namespace not in direct:
                bad.append(f"R2102: {m.get('name')} names {q.localname} of {q.namespace}, which the types "
                           f"section does not import directly")
            if q.text not in declared:
                bad.append(f"R2102: {m.get('name')} names {q.text}, which no imported schema declares")

    def message_element(ref: str) -> str | None:
        parts = messages.get(ref.rpartition(":")[2])
        return _qname(parts[0], parts[0].get("element")).text if parts else None

    port_ops: dict[str, dict[str, etree._Element]] = {}
    for pt in wsdl.findall("wsdl:portType", NS):
        ops = port_ops.setdefault(pt.get("name"), {})
        for op in pt.findall("wsdl:operation", NS):
            if op.get("name") in ops:
                bad.append(f"R2304: operation {op.get('name')} is overloaded in portType {pt.get('name')}")
            ops[op.get("name")] = op
            for fault in op.findall("wsdl:fault", NS):
                if message_element(fault.get("message")) is None:
                    bad.append(f"R2205: fault {fault.get('name')} of {op.get('name')} has no element part")
            inp = op.find("wsdl:input", NS)
            element = message_element(inp.get("message")) if inp is not None else None
            if element is None or etree.QName(element).localname != op.get("name"):
                bad.append(f"wrapped: the input of {op.get('name')} is {element}, not an element named after it")

    for binding in wsdl.findall("wsdl:binding", NS):
        sb = binding.find("soap:binding", NS)
        if sb is None or sb.get("transport") != HTTP_TRANSPORT:
            bad.append(f"R2702: binding {binding.get('name')} is not SOAP over HTTP")
        style = sb.get("style", "document") if sb is not None else "document"
        ops = port_ops.get(binding.get("type", "").rpartition(":")[2], {})
        seen_inputs: dict[str, str] = {}
        actions: dict[str, str] = {}
        bound = set()
        for op in binding.findall("wsdl:operation", NS):
            name = op.get("name")
            bound.add(name)
            abstract = ops.get(name)
            if abstract is None:
                bad.append(f"R2718: binding operation {name} is not in the portType")
                continue
            so = op.find("soap:operation", NS)
            if so is None or not so.get("soapAction"):
                bad.append(f"soapAction: {name} has no soapAction")
            else:
                action = so.get("soapAction")
                if action in actions:
                    bad.append(f"soapAction: {name} and {actions[action]} share {action}")
                actions[action] = name
                if so.get("style", style) != "document":
                    bad.append(f"R2705: {name} is not document style")
            for soap_el in op.iter(f"{{{SOAPB}}}body", f"{{{SOAPB}}}header", f"{{{SOAPB}}}fault"):
                if soap_el.get("use", "literal") != "literal":
                    bad.append(f"R2706: {name} uses encoded")
                if soap_el.get("namespace") is not None:
                    bad.append(f"R2716/R2717/R2726: {name}: soapbind:{etree.QName(soap_el).localname} has a "
                               f"namespace attribute (document-literal must not)")
                if soap_el.get("parts") not in (None, "parameters", "fault") and etree.QName(soap_el).localname == "body":
                    bad.append(f"R2210: {name} soap:body names parts {soap_el.get('parts')}")
            element = message_element(abstract.find("wsdl:input", NS).get("message"))
            if element in seen_inputs:
                bad.append(f"R2710: {name} and {seen_inputs[element]} have the same wire signature {element}")
            seen_inputs[element] = name
            abstract_faults = {f.get("name") for f in abstract.findall("wsdl:fault", NS)}
            bound_faults = set()
            for f in op.findall("wsdl:fault", NS):
                sf = f.find("soap:fault", NS)
                if sf is None or sf.get("name") != f.get("name"):
                    bad.append(f"R2754: {name}: fault {f.get('name')} needs soap:fault with the same name")
                bound_faults.add(f.get("name"))
            if abstract_faults != bound_faults:
                bad.append(f"R2721/R2754: {name}: portType faults {sorted(abstract_faults)} and binding faults "
                           f"{sorted(bound_faults)} differ")
        for name in set(ops) - bound:
            bad.append(f"R2718: portType operation {name} is not bound")
    if tns is None:
        bad.append("the definitions have no targetNamespace")
    return bad
