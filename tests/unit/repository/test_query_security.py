"""Queries as an attack surface (issue 9.2): a criterion only ever looks at the caller's VOs' facts (so
its time tells nothing about other VOs' descriptions), regular expressions run on RE2 (linear time, a
catastrophic-backtracking expression is harmless), and every query, the XPath dialect included, has a
CPU budget that ends it with BadQuery (reason "budget")."""
from __future__ import annotations

import dataclasses

import pytest
from lxml import etree

from services.descriptor import WS, parse_descriptor, set_field
from services.faults import BadQuery
from services.vmrepository.catalogue import Catalogue, new_image_id
from services.vmrepository.query import Budget, Criterion, compile_xpath, prepare, prepare_groups
from services.vmrepository.store import ImageStore
from services.vmrepository.xpath_scan import XPathScanner
from tests.fixtures.repository import EXAMPLES

pytestmark = pytest.mark.timeout(120)

SECRET = "hep private analysis of the 2004 run: do not share"


def descriptor(name: str, vo: str, description: str, libraries: int = 0) -> etree._Element:
    ws = parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes())
    set_field(ws, "identity", "name", name)
    set_field(ws, "identity", "imageId", new_image_id())
    set_field(ws, "identity", "owner", "/O=Grid/OU=test/CN=someone")
    set_field(ws, "identity", "created", "2026-11-25T00:00:00Z")
    set_field(ws, "identity", "vo", vo)
    set_field(ws, "identity", "description", description)
    sig = ws.find(f"{{{WS}}}software/{{{WS}}}librarySignature")
    for i in range(libraries):
        lib = etree.SubElement(sig, f"{{{WS}}}library")
        etree.SubElement(lib, f"{{{WS}}}name").text = f"lib{i}"
        etree.SubElement(lib, f"{{{WS}}}version").text = "1.0"
    return ws


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    store = ImageStore(root / "images")
    cat = Catalogue(root / "catalogue.sqlite", store)
    src = root / "bytes"
    src.write_bytes(b"x")
    ingested = store.ingest(src)
    for i, (vo, text) in enumerate([("bio", "emboss tools"), ("bio", "a" * 64), ("hep", SECRET), ("hep", "root 6")]):
        ws = descriptor(f"image-{i}", vo, text, libraries=40 if i == 1 else 0)
        set_field(ws, "image", "sha256", ingested.sha256)
        set_field(ws, "image", "size", 1)
        cat.add(ws, ingested if i == 0 else None)
    yield cat
    cat.close()


class Spy:
    """A regular expression that records every text it is asked about."""

    def __init__(self, regex):
        self.regex, self.seen = regex, []

    def search(self, text):
        self.seen.append(text)
        return self.regex.search(text)


@pytest.mark.parametrize("op, value", [("matches", "^hep private"), ("contains", "private")])
def test_a_criterion_never_looks_at_other_vos_texts(catalogue, op, value):
    p = prepare(Criterion("description", op, value))
    spy = Spy(p.regex) if p.regex is not None else None
    if spy is not None:
        p = dataclasses.replace(p, regex=spy)
    total, page = catalogue.query([[p]], ["bio"], "name", False, 0, 10)
    assert total == 0 and page == []
    if spy is not None:
        assert spy.seen and SECRET not in spy.seen and "root 6" not in spy.seen
    total, _ = catalogue.query([[p]], ["hep"], "name", False, 0, 10)
    assert total == 1                        # the same criterion finds it within its own VO


def test_catastrophic_backtracking_regex_is_answered(catalogue):
    """Python's backtracking engine takes minutes on this (it doubles per step); RE2 is linear."""
    groups = prepare_groups([[Criterion("description", "matches", "^(?:[^Z]|[^Z]){0,40}Z")]])
    assert catalogue.query(groups, ["bio", "hep"], "name", False, 0, 10)[0] == 0


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=a)b", r"(?<!a)b", "a{0,100000}"])
def test_regex_features_re2_cannot_bound_are_refused(pattern):
    with pytest.raises(BadQuery) as exc:
        prepare_groups([[Criterion("description", "matches", pattern)]])
    assert exc.value.reason == "bad regex"


def test_a_criteria_query_past_its_budget_is_refused(catalogue):
    groups = prepare_groups([[Criterion("description", "matches", "a")]])
    with pytest.raises(BadQuery) as exc:
        catalogue.index.match(groups, ["bio", "hep"], Budget(-1.0))
    assert exc.value.reason == "budget"


def test_a_runaway_xpath_expression_is_ended_and_the_next_query_is_answered(catalogue):
    """Nested predicates over a descriptor of a few hundred nodes: one evaluation would run for days inside
    libxml2, where Python cannot interrupt it. The scan worker is ended by its CPU limit; the query is a typed
    fault; a new worker answers the next query."""
    scanner = XPathScanner(catalogue.path, workers=1)
    try:
        runaway = "count(" + "//*[count(" * 5 + "//*" + ") > 0]" * 5 + ") > 0"     # 181 nodes: 181**6 steps
        xp = compile_xpath(runaway, {})
        xp.budget = Budget(0.5)
        with pytest.raises(BadQuery) as exc:
            scanner.query(xp, ["bio"], "name", False, 0, 10)
        assert exc.value.reason == "budget"
        total, ids = scanner.query(compile_xpath("count(//ws:library) > 30", {}), ["bio", "hep"], "name", False, 0, 10)
        assert total == 1 and len(ids) == 1
    finally:
        scanner.close()


def test_an_xpath_scan_evaluates_only_the_callers_vos(catalogue):
    scanner = XPathScanner(catalogue.path, workers=1)
    try:
        leak = f"contains(//ws:description, '{SECRET[:12]}')"
        assert scanner.query(compile_xpath(leak, {}), ["bio"], "name", False, 0, 10) == (0, [])
        assert scanner.query(compile_xpath(leak, {}), ["hep"], "name", False, 0, 10)[0] == 1
    finally:
        scanner.close()


def test_a_worker_that_ended_idle_is_replaced_without_a_fault(catalogue, monkeypatch):
    monkeypatch.setenv("VMGRID_XPATH_IDLE_EXIT", "0.1")
    scanner = XPathScanner(catalogue.path, workers=1)
    try:
        query = "count(//ws:library) > 30"
        assert scanner.query(compile_xpath(query, {}), ["bio"], "name", False, 0, 10)[0] == 1
        worker = scanner._idle.get_nowait()
        assert worker.ended() == 0                   # it exits by itself once idle
        scanner._idle.put(worker)
        assert scanner.query(compile_xpath(query, {}), ["bio"], "name", False, 0, 10)[0] == 1
        assert scanner.restarts == 0
    finally:
        scanner.close()
