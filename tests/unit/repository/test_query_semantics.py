"""Query semantics: version and numeric comparison, AND/OR, the XPath dialect, and a property test
comparing the indexed SQL evaluation with a brute-force evaluation written independently here."""
from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from services.descriptor import WS, facts, parse_descriptor, set_field, version_key
from services.faults import BadQuery
from services.vmrepository.catalogue import Catalogue, new_image_id
from services.vmrepository.query import Criterion, compile_xpath, parse_cli, prepare_groups
from services.vmrepository.xpath_scan import scanner
from services.vmrepository.store import ImageStore
from tests.fixtures.repository import EXAMPLES


# -- an independent model of the semantics -----------------------------------------------------

def bf_version(v: str) -> tuple:
    segs = re.findall(r"\d+|[A-Za-z]+", v)
    while segs and segs[-1].isdigit() and int(segs[-1]) == 0:
        segs.pop()
    return tuple((1, int(s)) if s.isdigit() else (0, s.lower()) for s in segs)


NUMERIC = {"hardware.memory", "hardware.vcpus", "hardware.disk.size", "image.size", "container.port"}
VERSIONED = {"identity.version", "software.distribution.version", "software.kernel.version"}
ALIAS = {"ram": "hardware.memory", "vcpus": "hardware.vcpus", "disk": "hardware.disk.size",
         "distribution": "software.distribution.name", "kernel": "software.kernel.version", "os": "software.os",
         "name": "identity.name", "arch": "hardware.architecture", "size": "image.size"}


def bf_holds(fs: list[tuple[str, str]], c: Criterion) -> bool:
    path = ALIAS.get(c.field, c.field)
    values = [v for p, v in fs if p == path]
    if c.op == "contains":
        return any(c.value.lower() in v.lower() for v in values)
    if c.op == "matches":
        return any(re.search(c.value, v) for v in values)
    if path in NUMERIC:
        key, q = float, float(c.value)
    elif path in VERSIONED or path.startswith("library."):
        key, q = bf_version, bf_version(c.value)
    else:
        key, q = str, c.value
    cmp = {"=": lambda a: a == q, "<": lambda a: a < q, "<=": lambda a: a <= q,
           ">": lambda a: a > q, ">=": lambda a: a >= q}
    if c.op == "!=":
        return not any(key(v) == q for v in values)
    return any(cmp[c.op](key(v)) for v in values)


def bf_query(population: dict[str, list], groups: list[list[Criterion]]) -> set[str]:
    if not groups:
        return set(population)
    return {i for i, fs in population.items() if any(all(bf_holds(fs, c) for c in g) for g in groups)}


# -- a catalogue of random descriptors --------------------------------------------------------

LIBS = ["emboss", "blast", "glibc", "root", "hmmer"]
DISTROS = ["debian", "scientific-linux", "ubuntu", "centos"]
VERSIONS = ["6.6", "6.10", "6.6.0", "2.2.14", "2.9", "10", "1.0rc1", "1.0.1", "6.1.0-27-cloud-amd64",
            "2.6.9-42.EL", "2.6.18", "12.8", "4.4"]


def random_descriptor(rng: random.Random, name: str) -> etree._Element:
    ws = parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes())
    set_field(ws, "identity", "name", name)
    set_field(ws, "identity", "imageId", new_image_id())
    set_field(ws, "identity", "owner", "/O=Grid/OU=test/CN=someone")
    set_field(ws, "identity", "created", "2026-11-25T00:00:00Z")
    set_field(ws, "identity", "vo", rng.choice(["bio", "hep"]))
    set_field(ws, "hardware", "memory", rng.choice([128, 256, 512, 768, 1024, 2048, 4096]))
    set_field(ws, "hardware", "vcpus", rng.randint(1, 8))
    for disk in ws.iterfind(f"{{{WS}}}hardware/{{{WS}}}disk"):
        disk.find(f"{{{WS}}}size").text = str(rng.choice([1, 2, 4, 8, 16]) * 1024**3)
    ws.find(f"{{{WS}}}software/{{{WS}}}distribution/{{{WS}}}name").text = rng.choice(DISTROS)
    ws.find(f"{{{WS}}}software/{{{WS}}}kernel/{{{WS}}}version").text = rng.choice(VERSIONS)
    sig = ws.find(f"{{{WS}}}software/{{{WS}}}librarySignature")
    for lib in list(sig):
        sig.remove(lib)
    for lib in rng.sample(LIBS, rng.randint(1, 3)):
        el = etree.SubElement(sig, f"{{{WS}}}library")
        etree.SubElement(el, f"{{{WS}}}name").text = lib
        etree.SubElement(el, f"{{{WS}}}version").text = rng.choice(VERSIONS)
    set_field(ws, "image", "sha256", "ab" * 32)
    set_field(ws, "image", "size", rng.randint(10**6, 10**9))
    return ws


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    store = ImageStore(root / "images")
    cat = Catalogue(root / "catalogue.sqlite", store)
    src = root / "bytes"
    src.write_bytes(b"x")
    ingested = store.ingest(src)
    rng = random.Random(2004)
    pop = {}
    for i in range(80):
        ws = random_descriptor(rng, f"image-{i:03d}")
        set_field(ws, "image", "sha256", ingested.sha256)
        cat.add(ws, ingested if i == 0 else None)
        image_id = ws.findtext(f"{{{WS}}}identity/{{{WS}}}imageId")
        pop[image_id] = facts(ws)
    return cat, pop


def indexed(cat: Catalogue, groups) -> tuple[int, set[str]]:
    total, page = cat.query(prepare_groups(groups), ["bio", "hep"], "name", False, 0, 1000)
    return total, {r.image_id for r in page}


criterion = st.one_of(
    st.builds(Criterion, st.sampled_from(["ram", "vcpus", "disk", "size"]),
              st.sampled_from(["=", "!=", "<", "<=", ">", ">="]),
              st.sampled_from(["1", "2", "256", "512", "1024", "4096", "2147483648", "4294967296", "500000000"])),
    st.builds(Criterion, st.sampled_from(["kernel"] + [f"library.{lib}" for lib in LIBS]),
              st.sampled_from(["=", "!=", "<", "<=", ">", ">="]), st.sampled_from(VERSIONS)),
    st.builds(Criterion, st.sampled_from(["distribution", "os", "name"]),
              st.sampled_from(["=", "!=", "<", ">", "contains", "matches"]),
              st.sampled_from(["debian", "linux", "DEB", "^s", "image-01", "ent", "image-0[0-3]"])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=st.lists(st.lists(criterion, min_size=1, max_size=3), min_size=0, max_size=3))
def test_indexed_query_equals_brute_force(population, groups):
    cat, pop = population
    total, ids = indexed(cat, groups)
    expected = bf_query(pop, groups)
    assert ids == expected
    assert total == len(expected)


def test_versions_compare_by_segment_not_as_text():
    assert version_key("6.6") < version_key("6.10")
    assert version_key("6.6.0") == version_key("6.6")
    assert version_key("2.6.9-42.EL") < version_key("2.6.18")
    assert version_key("1.0rc1") < version_key("1.0.1")


def test_emboss_6_6_does_not_match_6_10_wrongly(population):
    cat, pop = population
    _, ge = indexed(cat, [[Criterion("library.emboss", ">=", "6.6")]])
    with_610 = {i for i, fs in pop.items() if ("library.emboss", "6.10") in fs}
    assert with_610 and with_610 <= ge                     # 6.10 >= 6.6 (text order would say no)
    _, eq = indexed(cat, [[Criterion("library.emboss", "=", "6.6")]])
    with_66 = {i for i, fs in pop.items() if ("library.emboss", "6.6") in fs or ("library.emboss", "6.6.0") in fs}
    assert eq == with_66 and not (eq & with_610)


def test_sizes_accept_units(population):
    cat, pop = population
    _, a = indexed(cat, [[Criterion("ram", ">=", "1G")]])
    _, b = indexed(cat, [[Criterion("ram", ">=", "1024")]])
    _, c = indexed(cat, [[Criterion("disk", ">=", "8GiB")]])
    _, d = indexed(cat, [[Criterion("disk", ">=", str(8 * 1024**3))]])
    assert a == b and c == d and a and c


def test_the_command_line_form_maps_onto_criteria():
    groups = parse_cli(["ram >= 512", "distribution = debian", "library emboss >= 6.6", "or", "kernel < 2.7"])
    assert groups == [[Criterion("ram", ">=", "512"), Criterion("distribution", "=", "debian"),
                       Criterion("library.emboss", ">=", "6.6")], [Criterion("kernel", "<", "2.7")]]
    assert parse_cli(["description contains 'EMBOSS and BLAST'"]) == [
        [Criterion("description", "contains", "EMBOSS and BLAST")]]
    for bad in (["ram"], ["ram >="[:3]], ["or", "ram > 1"], ["vcpus 3 > 1"]):
        with pytest.raises(BadQuery):
            parse_cli(bad)


@pytest.mark.parametrize("groups, reason", [
    ([[Criterion("colour", "=", "blue")]], "unknown field"),
    ([[Criterion("ram", ">=", "much")]], "bad value"),
    ([[Criterion("name", "matches", "(")]], "bad regex"),
    ([[Criterion("ram", "~", "1")]], "unknown operator"),
    ([[Criterion("created", ">", "yesterday")]], "bad value"),
    ([[Criterion("vcpus", ">", "2G")]], "bad value"),
    ([[Criterion("library.emboss", ">=", "six")]], "bad value"),      # matched every image (letters sort first)
    ([[Criterion("kernel", "lt", "v2.6")]], "bad value"),
    ([[Criterion("version", ">", "")]], "bad value"),
])
def test_bad_queries_say_why(groups, reason):
    with pytest.raises(BadQuery) as exc:
        prepare_groups(groups)
    assert exc.value.reason == reason


def test_an_ordered_version_comparison_needs_a_version_and_says_what_one_looks_like(population):
    """'library emboss >= six' matched every image: 'six' is no version, and a version key's letters sort below its
    numbers. An ordered comparison of a version field takes a value that starts with a digit, as Debian's versions
    do; = and != still compare any value (a descriptor's version may start with a letter, wsdl/workspace.xsd)."""
    cat, pop = population
    with pytest.raises(BadQuery) as exc:
        prepare_groups(parse_cli(["library emboss >= six"]))
    assert (exc.value.reason, exc.value.criterion) == ("bad value", "library.emboss >= six")
    assert exc.value.description == ("library.emboss >= six: 'six' is not a version: a version starts with a digit "
                                     "and holds letters, digits and . + : ~ _ - (6.6, 6.6.0-1, 2.6.9-42.EL, 1:6.6.0)")
    for fine in (["library emboss >= 1:6.6.0-1"], ["kernel >= 2.6.9-42.EL"], ["library emboss = six"],
                 ["version != beta"]):
        total, ids = indexed(cat, parse_cli(fine))
        assert ids == bf_query(pop, parse_cli(fine)), fine


def test_xpath_dialect_agrees_with_criteria(population):
    cat, pop = population
    def by_xpath(expression: str) -> set[str]:
        total, ids = scanner(cat.path).query(compile_xpath(expression, {}), ["bio", "hep"], "name", False, 0, 10**6)
        assert total == len(ids)
        return set(ids)

    _, by_criteria = indexed(cat, [[Criterion("ram", ">=", "1024")]])
    assert by_xpath("/ws:workspace/ws:hardware[ws:memory >= 1024]") == by_criteria and by_criteria
    three = by_xpath("count(//ws:library) > 2")
    assert three == {i for i, fs in pop.items() if sum(p.startswith("library.") for p, _ in fs) > 2}
    with pytest.raises(BadQuery):
        compile_xpath("/ws:workspace[", {})
    with pytest.raises(BadQuery) as exc:
        by_xpath("/nope:x")
    assert exc.value.reason == "xpath evaluation"


@pytest.mark.parametrize("merge_at", [4096, 50])
def test_the_index_follows_adds_removes_and_replacements(tmp_path, monkeypatch, merge_at):
    """After the index is built, later writes reach it through the change log (delta, then merge)."""
    import services.vmrepository.index as index_module

    monkeypatch.setattr(index_module, "MERGE_AT", merge_at)
    store = ImageStore(tmp_path / "images")
    cat = Catalogue(tmp_path / "catalogue.sqlite", store)
    src = tmp_path / "bytes"
    src.write_bytes(b"y")
    ingested = store.ingest(src)
    rng = random.Random(7)
    pop: dict[str, list] = {}
    elements = {}

    def add(i):
        ws = random_descriptor(rng, f"img-{i:03d}")
        set_field(ws, "image", "sha256", ingested.sha256)
        cat.add(ws, ingested if not pop else None)
        image_id = ws.findtext(f"{{{WS}}}identity/{{{WS}}}imageId")
        pop[image_id], elements[image_id] = facts(ws), ws

    queries = [[[Criterion("ram", ">=", "1024")]], [[Criterion("library.emboss", ">=", "6.6")]],
               [[Criterion("distribution", "!=", "debian"), Criterion("vcpus", "<", "4")]], []]
    for i in range(20):
        add(i)
    for q in queries:                                  # builds the index
        assert indexed(cat, q)[1] == bf_query(pop, q)
    for round_ in range(3):
        for i in range(20):
            add(100 * (round_ + 1) + i)
        for image_id in rng.sample(sorted(pop), 5):
            cat.remove(image_id)
            del pop[image_id]
        for image_id in rng.sample(sorted(pop), 5):
            ws = elements[image_id]
            set_field(ws, "hardware", "memory", rng.choice([128, 8192]))
            cat.replace(ws, "2026-11-26T00:00:00Z")
            pop[image_id] = facts(ws)
        for q in queries:
            total, ids = indexed(cat, q)
            assert ids == bf_query(pop, q) and total == len(ids)


@pytest.mark.parametrize("text, suggestion", [
    ("library emboss > = 6.6", "did you mean library emboss >= 6.6?"),
    ("ram > =512", "did you mean ram >= 512?"),
    ("ram = <512", "did you mean ram =< 512"),        # not an operator: no suggestion, still refused
])
def test_an_operator_split_or_doubled_is_a_syntax_error_not_a_value(text, suggestion):
    """'library emboss > = 6.6' used to query for versions above the value '= 6.6' and answer 0 images; now it is
    refused with the criterion read back. A value that does start with such a character is quoted."""
    from services.vmrepository.query import Criterion, parse_criterion
    with pytest.raises(BadQuery, match="starts with an operator character") as exc:
        parse_criterion(text)
    assert exc.value.reason == "syntax"
    assert (suggestion in str(exc.value)) == suggestion.endswith("?")
    assert parse_criterion('name = "=x"') == Criterion("name", "=", "=x")
