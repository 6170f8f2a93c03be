"""What the contract tells a client developer: schema faults name the element by its path of names,
and the query operators exist as words beside the symbols."""
from __future__ import annotations

import pytest
from lxml import etree

from services.container import soap
from services.container.contract import Contract, expected_value
from services.vmrepository.query import Criterion, parse_criterion, prepare
from tests.fixtures.repository import signed_call

REPO = "http://vmgrid.org/ns/vmrepository/1"


def _query(*criteria: tuple[str, str, str], extra: bool = False) -> etree._Element:
    q = etree.Element(f"{{{REPO}}}QueryImages", nsmap={"repo": REPO})
    group = etree.SubElement(etree.SubElement(q, f"{{{REPO}}}criteria"), f"{{{REPO}}}group")
    for field, op, value in criteria:
        c = etree.SubElement(group, f"{{{REPO}}}criterion")
        for name, text in (("field", field), ("operator", op), ("value", value)):
            etree.SubElement(c, f"{{{REPO}}}{name}").text = text
    return q


def test_a_schema_error_is_named_by_the_path_of_names():
    contract = Contract("vmrepository.wsdl")
    q = _query(("ram", ">=", "512"), ("name", "=", "x" * 2000))
    assert not contract.validator.validate(q)
    err = contract.validator.error_log.last_error
    assert soap.element_path(q, err.path) == "QueryImages/criteria[1]/group[1]/criterion[2]/value"
    message = soap.schema_message(err.message)
    assert "{" not in message and not message.startswith("Element")


def test_an_unfollowable_path_gives_none():
    q = _query(("ram", ">=", "512"))
    assert soap.element_path(q, "/*/*[7]") is None
    assert soap.element_path(q, "") is None


def test_the_schema_fault_on_the_wire_names_the_element(repo_server):
    q = _query(("ram", "ge", "512"), ("ram", "bigger", "1"))
    status, fault = signed_call(repo_server.url, q, repo_server.pki.alice.proxy, repo_server.pki.trust())
    detail = fault.find("detail")[0]
    assert status == 500 and etree.QName(detail).localname == "InvalidArgumentFault"
    assert "criterion[2]/operator" in fault.findtext("faultstring")
    assert "/*" not in fault.findtext("faultstring") and "{http" not in fault.findtext("faultstring")


@pytest.mark.parametrize("word,symbol", [("eq", "="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"),
                                         ("ge", ">=")])
def test_word_operators_mean_their_symbols(word, symbol):
    assert Contract("vmrepository.wsdl").validator.validate(_query(("ram", word, "512")))
    assert prepare(Criterion("ram", word, "512")) == prepare(Criterion("ram", symbol, "512"))
    assert parse_criterion(f"ram {word} 512") == Criterion("ram", word, "512")
    assert parse_criterion(f"library emboss {word} 6.6") == Criterion("library.emboss", word, "6.6")


def test_word_operators_query_the_live_repository(repo_server):
    status, answer = signed_call(repo_server.url, _query(("ram", "ge", "1")), repo_server.pki.alice.proxy,
                                 repo_server.pki.trust())
    assert status == 200 and etree.QName(answer).localname == "QueryImagesResponse"


def _libxml_errors(restriction: str, value: str) -> list[str]:
    xs = "http://www.w3.org/2001/XMLSchema"
    schema = etree.XMLSchema(etree.XML(
        f'<xs:schema xmlns:xs="{xs}" targetNamespace="urn:t" xmlns="urn:t" elementFormDefault="qualified">'
        f'<xs:element name="a"><xs:simpleType>{restriction}</xs:simpleType></xs:element></xs:schema>'))
    assert not schema.validate(etree.XML(f'<a xmlns="urn:t">{value}</a>'))
    return [e.message for e in schema.error_log]


def test_a_schema_message_keeps_a_patterns_quantifiers_and_an_enumerations_set():
    """Only the Clark-notation namespaces of libxml2's text go ({urn:t}a); what the client must match stays."""
    (pattern,) = _libxml_errors('<xs:restriction base="xs:string"><xs:pattern value="[a-z]{1,3}(/[a-z]{1,3}){0,7}"/>'
                                '</xs:restriction>', "../etc")
    assert "{urn:t}" in pattern
    assert soap.schema_message(pattern).endswith("not accepted by the pattern '[a-z]{1,3}(/[a-z]{1,3}){0,7}'.")
    (enumeration,) = _libxml_errors('<xs:restriction base="xs:string"><xs:enumeration value="Running"/>'
                                    '<xs:enumeration value="Paused"/></xs:restriction>', "Frozen")
    assert "{'Running', 'Paused'}" in soap.schema_message(enumeration) and "urn:t" not in soap.schema_message(enumeration)


def test_an_anonymous_restrictions_fault_says_what_is_expected():
    """libxml2 says only "'0' is not a valid value of the local atomic type" for Deploy's lifetime (a
    positiveInteger at most a year): the fault adds what the schema expects, read from the published schema."""
    vmm = "{http://vmgrid.org/ns/vmmanager/1}Deploy"
    assert expected_value(vmm, "Deploy/lifetime") == "a positiveInteger at most 31536000"
    assert expected_value(vmm, "Deploy/initialState") == "one of Running, Paused"
    assert expected_value(vmm, "Deploy/nothing") is None and expected_value("{urn:none}X", "X/y") is None
    (message,) = _libxml_errors('<xs:restriction base="xs:positiveInteger"><xs:maxInclusive value="31536000"/>'
                                '</xs:restriction>', "0")
    assert "of the local atomic type" in message       # what the container mends (services/container/app.py)
