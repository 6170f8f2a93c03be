"""Write the SoapUI project for vmgrid's four services from the WSDLs in wsdl/ (stdout):

    python wsdl/soapui/build_project.py > wsdl/soapui/vmgrid-soapui-project.xml

Every operation gets a request whose Body is a minimal valid instance of its input element (descriptors
from wsdl/examples), the outgoing WS-Security configuration vmgrid accepts (SETTINGS), incoming
signature verification against the grid CA, and a test suite with assertions."""
from __future__ import annotations

import sys
from pathlib import Path

from lxml import etree

WSDL_DIR = Path(__file__).resolve().parents[1]
XS = "http://www.w3.org/2001/XMLSchema"
WSDL = "http://schemas.xmlsoap.org/wsdl/"
SOAPB = "http://schemas.xmlsoap.org/wsdl/soap/"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
CON = "http://eviware.com/soapui/config"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
VMM = "http://vmgrid.org/ns/vmmanager/1"
JOB = "http://vmgrid.org/ns/jobs/1"
WS = "http://vmgrid.org/ns/workspace/1"

# (WSDL, service, port): the ports of the README's site (the central container 8443, node1 8444, the job service 8446)
SERVICES = [("authz.wsdl", "AuthorizationService", 8443), ("vmrepository.wsdl", "VMRepositoryService", 8443),
            ("vmmanager.wsdl", "VMManagerService", 8444), ("jobs.wsdl", "JobService", 8446)]
# The outgoing WS-Security vmgrid accepts, as SoapUI (WSS4J underneath) names it. keyIdentifierType 1 is WSS4J's
# BST_DIRECT_REFERENCE; useSingleCert false sends a proxy with its chain (X509PKIPathv1).
SETTINGS = {
    "keyIdentifierType": "1",
    "signatureAlgorithm": "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
    "signatureCanonicalization": "http://www.w3.org/2001/10/xml-exc-c14n#",
    "digestAlgorithm": "http://www.w3.org/2001/04/xmlenc#sha256",
    "useSingleCert": "false",
    "timeToLive": "300",
}
SIGNED_PARTS = [("Body", SOAP), ("Timestamp", "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"),
                ("To", WSA), ("Action", WSA), ("MessageID", WSA), ("ReplyTo", WSA), ("InstanceKey", VMM), ("JobKey", JOB)]
# Operations addressed to an instance carry its InstanceKey header (vmmanager.wsdl's InstanceKeyHeader), those
# addressed to a job its JobKey (jobs.wsdl's JobKeyHeader): the value is a project property.
KEY_PROPERTIES = {f"{{{VMM}}}InstanceKey": "instanceKey", f"{{{JOB}}}JobKey": "jobKey"}


def endpoint(service: str, port: int) -> str:
    return f"https://localhost:{port}/wsrf/services/{service}"
STRING_OVERRIDES = {"ActionType": "vm.deploy", "MigrationFileNameType": "state.save", "Sha256Type": "0" * 64,
                    "InstanceKeyType": "inst-" + "0" * 32}
DESCRIPTOR = WSDL_DIR / "examples" / "debian12-emboss.xml"


class Samples:
    """Minimal valid instances of global elements, from the schemas in wsdl/."""

    def __init__(self):
        self.elements: dict[str, etree._Element] = {}
        self.types: dict[str, etree._Element] = {}
        for path in WSDL_DIR.glob("*.xsd"):
            root = etree.parse(str(path)).getroot()
            ns = root.get("targetNamespace")
            for el in root.findall(f"{{{XS}}}element"):
                self.elements[f"{{{ns}}}{el.get('name')}"] = el
            for t in root.findall(f"{{{XS}}}complexType") + root.findall(f"{{{XS}}}simpleType"):
                self.types[f"{{{ns}}}{t.get('name')}"] = t

    @staticmethod
    def _q(el: etree._Element, value: str) -> str:
        prefix, _, local = value.rpartition(":")
        return f"{{{el.nsmap.get(prefix or None)}}}{local}"

    def element(self, tag: str) -> etree._Element:
        if tag == f"{{{WS}}}workspace":
            return etree.parse(str(DESCRIPTOR)).getroot()
        decl = self.elements[tag]
        out = etree.Element(tag, nsmap={None: etree.QName(tag).namespace})
        self._fill(out, decl)
        return out

    def _fill(self, out: etree._Element, decl: etree._Element) -> None:
        type_ref = decl.get("type")
        if type_ref:
            q = self._q(decl, type_ref)
            if q.startswith(f"{{{XS}}}"):
                out.text = self._builtin(q.split("}")[1], out)
            else:
                self._type(out, self.types[q])
            return
        for t in decl:
            if t.tag in (f"{{{XS}}}complexType", f"{{{XS}}}simpleType"):
                self._type(out, t)

    def _type(self, out: etree._Element, t: etree._Element) -> None:
        if t.tag == f"{{{XS}}}simpleType":
            out.text = self._simple(t, out)
            return
        for attr in t.iter(f"{{{XS}}}attribute"):
            if attr.get("use") == "required":
                out.set(attr.get("name"), self._value(attr, out))
        for child in t:
            tag = etree.QName(child).localname
            if tag in ("sequence", "choice", "all"):
                self._group(out, child)
            elif tag == "complexContent":
                ext = child[0]
                self._type(out, self.types[self._q(ext, ext.get("base"))])
                for part in ext:
                    if etree.QName(part).localname in ("sequence", "choice", "all"):
                        self._group(out, part)
            elif tag == "simpleContent":
                ext = child[0]
                out.text = self._builtin(self._q(ext, ext.get("base")).split("}")[1], out)

    def _group(self, out: etree._Element, group: etree._Element) -> None:
        particles = [p for p in group if isinstance(p.tag, str) and etree.QName(p).localname != "annotation"]
        if etree.QName(group).localname == "choice":
            particles = particles[:1]
        for p in particles:
            if p.get("minOccurs") == "0":
                continue
            kind = etree.QName(p).localname
            if kind == "element":
                if p.get("ref"):
                    out.append(self.element(self._q(p, p.get("ref"))))
                else:
                    ns = p.getroottree().getroot().get("targetNamespace")   # elementFormDefault="qualified"
                    child = etree.SubElement(out, f"{{{ns}}}{p.get('name')}")
                    self._fill(child, p)
            elif kind in ("sequence", "choice"):
                self._group(out, p)

    def _value(self, decl: etree._Element, out: etree._Element) -> str:
        type_ref = decl.get("type")
        if type_ref:
            q = self._q(decl, type_ref)
            if q.startswith(f"{{{XS}}}"):
                return self._builtin(q.split("}")[1], out)
            return self._simple(self.types[q], out)
        return self._simple(decl.find(f"{{{XS}}}simpleType"), out)

    def _simple(self, t: etree._Element, out: etree._Element) -> str:
        if t.get("name") in STRING_OVERRIDES:
            return STRING_OVERRIDES[t.get("name")]
        r = t.find(f"{{{XS}}}restriction")
        if r is None:
            union = t.find(f"{{{XS}}}union")
            first = (union.get("memberTypes") or "xs:string").split()[0] if union is not None else "xs:string"
            return self._builtin(first.rpartition(":")[2], out)
        enum = r.find(f"{{{XS}}}enumeration")
        if enum is not None:
            return enum.get("value")
        base = self._q(r, r.get("base"))
        if base.startswith(f"{{{XS}}}"):
            return self._builtin(base.split("}")[1], out)
        return self._simple(self.types[base], out)

    @staticmethod
    def _builtin(name: str, out: etree._Element) -> str:
        if name == "QName":
            return "vmm:State"
        return {"boolean": "true", "dateTime": "2030-01-01T00:00:00Z", "duration": "PT1H",
                "anyURI": "https://localhost:8443/wsrf/services/Consumer", "base64Binary": "AA==",
                "hexBinary": "00"}.get(name, "1" if any(k in name.lower() for k in ("int", "long", "short", "decimal",
                                                                                  "double", "float", "byte"))
                                            else "sample")


def _c(tag: str, parent=None, text: str | None = None, **attrs) -> etree._Element:
    el = etree.Element(f"{{{CON}}}{tag}", attrs) if parent is None else etree.SubElement(parent, f"{{{CON}}}{tag}", attrs)
    if text is not None:
        el.text = text
    return el


def request_xml(samples: Samples, input_tag: str, key_header: str | None) -> str:
    """The request for an operation whose body is ``input_tag``, carrying the resource key header ``key_header``
    (a QName: vmm:InstanceKey, job:JobKey) when it is addressed to one."""
    env = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"soapenv": SOAP, "vmm": VMM, "job": JOB})
    header = etree.SubElement(env, f"{{{SOAP}}}Header")
    if key_header:
        etree.SubElement(header, key_header).text = f"${{#Project#{KEY_PROPERTIES[key_header]}}}"
    body = etree.SubElement(env, f"{{{SOAP}}}Body")
    body.append(samples.element(input_tag))
    job = key_header == f"{{{JOB}}}JobKey"
    for el in body.iter() if job else ():       # a job's resource property is the job service's State
        if el.text == "vmm:State":
            el.text = "job:State"
    etree.cleanup_namespaces(env, keep_ns_prefixes=["job"] if job else ["vmm"])
    return etree.tostring(env, pretty_print=True).decode()


def operations(wsdl_file: str) -> tuple[str, str, list[tuple[str, str, str, bool]]]:
    """(binding name, binding QName, [(operation, soapAction, input element, the resource key header's QName or
    None)])."""
    root = etree.parse(str(WSDL_DIR / wsdl_file)).getroot()
    ns = {"wsdl": WSDL, "soap": SOAPB}
    tns = root.get("targetNamespace")
    parts = {}
    for m in root.findall("wsdl:message", ns):
        part = m.find("wsdl:part", ns)
        parts[m.get("name")] = Samples._q(part, part.get("element"))
    pt_inputs = {op.get("name"): op.find("wsdl:input", ns).get("message").rpartition(":")[2]
                 for op in root.findall("wsdl:portType/wsdl:operation", ns)}
    binding = root.find("wsdl:binding", ns)
    out = []
    for op in binding.findall("wsdl:operation", ns):
        name = op.get("name")
        action = op.find("soap:operation", ns).get("soapAction")
        header = op.find("wsdl:input/soap:header", ns)
        key_header = parts[header.get("message").rpartition(":")[2]] if header is not None else None
        out.append((name, action, parts[pt_inputs[name]], key_header))
    return binding.get("name"), f"{{{tns}}}{binding.get('name')}", out


def outgoing_wss(container: etree._Element) -> None:
    out = _c("outgoing", container)
    _c("name", out, "vmgrid-signature")
    ts = _c("entry", out, type="Timestamp")
    conf = _c("configuration", ts)
    etree.SubElement(conf, "timeToLive").text = SETTINGS["timeToLive"]
    etree.SubElement(conf, "strictTimestamp").text = "true"
    sig = _c("entry", out, type="Signature", username="${#Project#keyAlias}", password="${#Project#keyPassword}")
    conf = _c("configuration", sig)
    etree.SubElement(conf, "crypto").text = "vmgrid-user.p12"
    for key in ("keyIdentifierType", "signatureAlgorithm", "signatureCanonicalization", "digestAlgorithm",
                "useSingleCert"):
        etree.SubElement(conf, key).text = SETTINGS[key]
    etree.SubElement(conf, "prependSignature").text = "false"
    parts = etree.SubElement(conf, "signatureParts")
    for name, namespace in SIGNED_PARTS:
        entry = etree.SubElement(parts, "entry")
        etree.SubElement(entry, "id")
        etree.SubElement(entry, "name").text = name
        etree.SubElement(entry, "namespace").text = namespace
        etree.SubElement(entry, "encodingType").text = "Element" if name != "Body" else "Content"


def build() -> etree._Element:
    samples = Samples()
    project = etree.Element(f"{{{CON}}}soapui-project", nsmap={"con": CON, "xsi": XSI},
                            name="vmgrid", resourceRoot="${projectDir}", soapui_version="5.7.0")
    project.attrib.pop("soapui_version")
    project.set("soapui-version", "5.7.0")
    _c("description", project, "vmgrid's Authorization, VMRepository, VMManager and job services (docs/soapui.md)")
    _c("settings", project)
    suite_calls = []
    for wsdl_file, service, port in SERVICES:
        binding, binding_q, ops = operations(wsdl_file)
        iface = _c("interface", project, name=binding, type="wsdl", bindingName=binding_q, soapVersion="1_1",
                   anonymous="optional", wsaVersion="2005/08", definition=f"{endpoint(service, port)}?wsdl")
        iface.set(f"{{{XSI}}}type", "con:WsdlInterface")
        _c("settings", iface)
        endpoints = _c("endpoints", iface)
        _c("endpoint", endpoints, endpoint(service, port))
        for name, action, input_tag, key_header in ops:
            op = _c("operation", iface, isOneWay="false", action=action, name=name, bindingOperationName=name,
                    type="Request-Response", inputName="", receivesAttachments="false", sendsAttachments="false",
                    anonymous="optional")
            _c("settings", op)
            call = _c("call", op, name=f"{name} request", outgoingWss="vmgrid-signature", incomingWss="vmgrid-verify")
            _c("settings", call)
            _c("encoding", call, "UTF-8")
            _c("endpoint", call, endpoint(service, port))
            req = request_xml(samples, input_tag, key_header)
            _c("request", call).text = etree.CDATA(req)
            _c("wsaConfig", call, mustUnderstand="NONE", version="200508", action=action, addDefaultTo="true",
               addDefaultAction="true", generateMessageId="true")
            if name in ("ListVOs", "QueryImages", "GetGroups", "ListInstances", "ListJobs"):
                suite_calls.append((binding, name, endpoint(service, port), req))
    suite = _c("testSuite", project, name="vmgrid contract")
    _c("settings", suite)
    case = _c("testCase", suite, name="read-only calls", failOnError="true", keepSession="false")
    _c("settings", case)
    for binding, name, url, req in suite_calls:
        step = _c("testStep", case, type="request", name=name)
        config = _c("config", step)
        config.set(f"{{{XSI}}}type", "con:RequestStep")
        _c("interface", config, binding)
        _c("operation", config, name)
        r = _c("request", config, name=name, outgoingWss="vmgrid-signature", incomingWss="vmgrid-verify")
        _c("settings", r)
        _c("encoding", r, "UTF-8")
        _c("endpoint", r, url)
        _c("request", r).text = etree.CDATA(req)
        for kind, aname in (("SOAP Response", "SOAP Response"), ("Schema Compliance", "Schema Compliance"),
                            ("SOAP Fault Assertion", "Not SOAP Fault")):
            _c("assertion", r, type=kind, name=aname)
        _c("wsaConfig", r, mustUnderstand="NONE", version="200508", addDefaultTo="true", addDefaultAction="true",
           generateMessageId="true")
    props = _c("properties", project)
    for key, value in (("keystore", "vmgrid-user.p12"), ("keyAlias", "vmgrid-user"), ("keyPassword", "changeit"),
                       ("truststore", "vmgrid-ca.jks"), ("instanceKey", "inst-00000000000000000000000000000000"),
                       ("jobKey", "job-00000000000000000000000000000000")):
        p = _c("property", props)
        _c("name", p, key)
        _c("value", p, value)
    wss = _c("wssContainer", project)
    for name, source, kind in (("vmgrid-user.p12", "${#Project#keystore}", "KEYSTORE"),
                               ("vmgrid-ca.jks", "${#Project#truststore}", "TRUSTSTORE")):
        crypto = _c("crypto", wss)
        _c("source", crypto, source)
        _c("password", crypto, "${#Project#keyPassword}")
        _c("type", crypto, kind)
    incoming = _c("incoming", wss)
    _c("name", incoming, "vmgrid-verify")
    _c("decryptCrypto", incoming)
    _c("signatureCrypto", incoming, "vmgrid-ca.jks")
    outgoing_wss(wss)
    return project


def main() -> int:
    sys.stdout.write(etree.tostring(build(), xml_declaration=True, encoding="UTF-8", pretty_print=True).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
