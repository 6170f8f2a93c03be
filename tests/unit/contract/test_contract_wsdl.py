"""The published contract as other SOAP stacks read it: every WSDL (the files and the copies a live grid
serves) conforms to WS-I Basic Profile 1.1, every operation declares every fault it can answer, and
responses use fixed, conventional namespace prefixes with the Security header last."""
from __future__ import annotations

import copy

import pytest
from lxml import etree

from security.tls import grid_session
from security.wssec import sign_envelope, verify_envelope
from services.container.app import CONTAINER_FAULTS
from services.container.contract import WSDL_DIR, Contract
from services.container.soap import PREFIXES, envelope
from tests.fixtures.repository import signed_call
from tests.unit.contract import wsi

WSDL_FILES = sorted(p.name for p in WSDL_DIR.glob("*.wsdl"))   # a new service's WSDL is checked too
SERVICES = {"AuthorizationService": "authz.wsdl", "VMRepositoryService": "vmrepository.wsdl",
            "VMManagerService": "vmmanager.wsdl"}
WORKSPACE = "{http://vmgrid.org/ns/workspace/1}workspace"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"


def local_schemas() -> dict[str, list[etree._Element]]:
    out: dict[str, list[etree._Element]] = {}
    for path in sorted(WSDL_DIR.glob("*.xsd")):
        root = etree.parse(str(path)).getroot()
        out.setdefault(root.get("targetNamespace"), []).append(root)
    return out


@pytest.mark.parametrize("name", WSDL_FILES)
def test_each_wsdl_file_conforms_to_ws_i_basic_profile(name):
    assert wsi.violations(etree.parse(str(WSDL_DIR / name)).getroot(), local_schemas()) == []


def test_the_ws_i_check_finds_each_kind_of_violation():
    good = etree.parse(str(WSDL_DIR / "vmmanager.wsdl")).getroot()
    schemas = local_schemas()

    def broken(edit) -> list[str]:
        doc = copy.deepcopy(good)
        edit(doc)
        return wsi.violations(doc, schemas)

    def drop_rl_import(doc):
        imp = doc.find(f".//{{{wsi.XS}}}import[@namespace='http://docs.oasis-open.org/wsrf/rl-2']")
        imp.getparent().remove(imp)

    def namespace_on_body(doc):
        doc.find(f".//{{{wsi.SOAPB}}}body").set("namespace", "urn:x")

    def same_action(doc):
        ops = doc.findall(f".//{{{wsi.SOAPB}}}operation")
        ops[1].set("soapAction", ops[0].get("soapAction"))

    def unbound_fault(doc):
        op = doc.find(f"{{{wsi.WSDL}}}binding/{{{wsi.WSDL}}}operation")
        op.remove(op.find(f"{{{wsi.WSDL}}}fault"))

    def two_parts(doc):
        m = doc.find(f"{{{wsi.WSDL}}}message")
        m.append(copy.deepcopy(m[0]))

    assert any(v.startswith("R2102") and "rl-2" in v for v in broken(drop_rl_import))
    assert any(v.startswith("R2716") for v in broken(namespace_on_body))
    assert any(v.startswith("soapAction") for v in broken(same_action))
    assert any(v.startswith("R2721") for v in broken(unbound_fault))
    assert any(v.startswith("R2210") for v in broken(two_parts))


def _can_carry(schemas: dict[str, list[etree._Element]], element: str, wanted: str) -> bool:
    """Whether an instance of global element `element` may hold element `wanted` anywhere inside."""
    globals_, types = {}, {}
    for namespace, docs in schemas.items():
        for doc in docs:
            for el in doc.findall(f"{{{wsi.XS}}}element"):
                globals_[f"{{{namespace}}}{el.get('name')}"] = el
            for t in doc.findall(f"{{{wsi.XS}}}complexType"):
                types[f"{{{namespace}}}{t.get('name')}"] = t
    seen: set[int] = set()
    todo = [globals_[element]]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for el in node.iter(f"{{{wsi.XS}}}element", f"{{{wsi.XS}}}extension", f"{{{wsi.XS}}}any"):
            if etree.QName(el).localname == "any":
                continue
            for attr in ("ref", "type", "base"):
                value = el.get(attr)
                if not value:
                    continue
                q = wsi._qname(el, value).text
                if attr == "ref" and q == wanted:
                    return True
                target = globals_.get(q) if attr == "ref" else types.get(q)
                if target is not None:
                    todo.append(target)
    return False


@pytest.mark.parametrize("name", WSDL_FILES)
def test_every_operation_declares_the_faults_the_container_answers(name):
    contract, schemas = Contract(name), local_schemas()
    for op in contract.operations.values():
        missing = set(CONTAINER_FAULTS) - set(op.faults)
        assert not missing, f"{name} {op.name} does not declare {sorted(missing)}"
        if _can_carry(schemas, op.input.text, WORKSPACE):
            assert "InvalidDescriptorFault" in op.faults, f"{name} {op.name} carries a descriptor"


def test_operations_carrying_a_descriptor_are_found():
    schemas = local_schemas()
    assert _can_carry(schemas, "{http://vmgrid.org/ns/vmmanager/1}Deploy", WORKSPACE)
    assert not _can_carry(schemas, "{http://vmgrid.org/ns/vmrepository/1}ListVOs", WORKSPACE)


# -- the live grid --------------------------------------------------------------------------------

def _urls(grid) -> dict[str, str]:
    return {"AuthorizationService": grid.authz_url, "VMRepositoryService": grid.repository_url,
            "VMManagerService": grid.node_url(0)}


def test_every_served_wsdl_conforms_and_every_operation_answers_a_schema_invalid_request_with_a_declared_fault(
        vm_grid):
    session = grid_session(vm_grid.pki.cert_dir)
    schemas: dict[str, list[etree._Element]] = {}
    for service, url in _urls(vm_grid).items():
        served = etree.fromstring(session.get(url + "?wsdl").content)
        for imp in served.iter(f"{{{wsi.XS}}}import"):      # the schemas as served, with their imports
            todo = [imp.get("schemaLocation")]
            while todo:
                loc = todo.pop()
                doc = etree.fromstring(session.get(loc).content)
                if any(d.get("targetNamespace") == doc.get("targetNamespace") for d in
                       schemas.get(doc.get("targetNamespace"), [])):
                    continue
                schemas.setdefault(doc.get("targetNamespace"), []).append(doc)
                todo += [i.get("schemaLocation") for i in doc.findall(f"{{{wsi.XS}}}import")]
        assert wsi.violations(served, schemas) == [], service

        contract = Contract(SERVICES[service])
        for op in contract.operations.values():
            request = etree.Element(op.input.text)
            etree.SubElement(request, "{urn:vmgrid:test}notInTheSchema")
            status, fault = signed_call(url, request, vm_grid.pki.alice.proxy, vm_grid.pki.trust(),
                                        action=op.soap_action)
            detail = fault.find("detail")
            assert status == 500 and detail is not None, (service, op.name, etree.tostring(fault))
            element = etree.QName(detail[0]).localname
            assert element == "InvalidArgumentFault" and element in op.faults, (service, op.name)


def test_a_fault_the_wsdl_does_not_declare_is_caught_in_tests(repo_server, monkeypatch):
    from services.faults import BadQuery

    def undeclared(*a, **k):
        raise BadQuery("not a ListVOs fault", reason="test")

    monkeypatch.setattr(repo_server.service.catalogue, "vo_counts", undeclared)
    _, fault = signed_call(repo_server.url, etree.Element("{http://vmgrid.org/ns/vmrepository/1}ListVOs"),
                           repo_server.pki.alice.proxy, repo_server.pki.trust())
    assert etree.QName(fault.find("detail")[0]).localname == "InternalFault"
    assert "does not declare" in fault.findtext("faultstring")


def test_responses_use_conventional_prefixes_and_put_the_security_header_last(repo_server):
    wsa = PREFIXES["wsa"]
    request = envelope(etree.Element("{http://vmgrid.org/ns/vmrepository/1}ListVOs"), [
        _text(f"{{{wsa}}}To", repo_server.url), _text(f"{{{wsa}}}Action", "http://vmgrid.org/ns/vmrepository/1/ListVOs"),
        _text(f"{{{wsa}}}MessageID", "urn:uuid:7d4c3f7e-0000-4000-8000-000000000001")])
    data = sign_envelope(request, repo_server.pki.alice.proxy)
    resp = grid_session(repo_server.pki.cert_dir).post(repo_server.url, data=data,
                                                       headers={"Content-Type": "text/xml; charset=utf-8"})
    verify_envelope(resp.content, repo_server.pki.trust())
    root = etree.fromstring(resp.content)
    declared: dict[str, set[str]] = {}
    for el in root.iter():
        if isinstance(el.tag, str):
            for prefix, uri in el.nsmap.items():
                declared.setdefault(uri, set()).add(prefix)
    assert all(len(p) == 1 for p in declared.values()), declared
    conventional = {uri: p for p, uri in PREFIXES.items()}
    for uri, prefixes in declared.items():
        assert prefixes == {conventional[uri]}, (uri, prefixes)
    assert b"ns0:" not in resp.content
    header = [h for h in root.find(f"{{{SOAP}}}Header")]
    assert [etree.QName(h).localname for h in header] == ["Action", "MessageID", "RelatesTo", "Security"]


def _text(tag: str, text: str) -> etree._Element:
    el = etree.Element(tag)
    el.text = text
    return el
