"""`vmgrid repo import`'s two cheaper steps (issue 13 §4): the command reads each file of a directory with one bounded
read, reporting every bad file in the directory's order as before; the repository's core, told that its SOAP
face's container validated each descriptor against workspace.xsd as received (``schema_checked``), validates
again only what the values it sets could break, and still stores nothing invalid. No server: the functions
themselves, on real files and a real SQLite catalogue."""
from __future__ import annotations

import pytest
from lxml import etree

from client.cli import CLIError
from client.commands_repo import read_descriptor_dir
from services.authz.engine import site_policy_point
from services.authz.pep import Subject
from services.descriptor import MAX_DESCRIPTOR_BYTES, check_descriptor, parse_descriptor, set_field
from services.faults import InvalidDescriptor
from services.vmrepository.config import RepositoryConfig
from services.vmrepository.registry import Registry, Source
from tests.fixtures.repository import EXAMPLES, make_image

ALICE = "/O=Grid/OU=vmgrid/CN=Alice"
ADMIN = "/O=Grid/OU=vmgrid/CN=Admin"


def _text(name: str) -> str:
    ws = parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes())
    set_field(ws, "identity", "name", name)
    set_field(ws, "image", "sha256", "0" * 64)
    return etree.tostring(ws, encoding="unicode")


def test_a_directory_is_read_in_order_and_every_bad_file_reported(tmp_path, capsys):
    n = 40
    for i in range(n):
        (tmp_path / f"d{i:04d}.xml").write_text(_text(f"img-{i:04d}"))
    good = read_descriptor_dir(tmp_path)
    assert [p.name for p, _ in good] == [f"d{i:04d}.xml" for i in range(n)]
    assert [ws.findtext("{*}identity/{*}name") for _, ws in good] == [f"img-{i:04d}" for i in range(n)]

    # bad files of four kinds
    (tmp_path / "d0003.xml").write_text(_text("x").replace("<memory>", "<memory>lots"))
    (tmp_path / "d0015.xml").write_text("<workspace>not closed")
    (tmp_path / "d0027.xml").write_bytes(b" " * (MAX_DESCRIPTOR_BYTES + 5000))   # not read whole
    (tmp_path / f"d{n - 1:04d}.xml").write_text(_text("img-0007"))          # a name already in d0007.xml
    capsys.readouterr()
    with pytest.raises(CLIError, match=f"4 of {n} descriptor files .* nothing was imported"):
        read_descriptor_dir(tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[1].strip().rsplit("/", 1)[-1] for line in lines] == \
        ["d0003.xml", "d0015.xml", "d0027.xml", f"d{n - 1:04d}.xml"]
    assert "memory" in lines[0] and "not well-formed" in lines[1] and "also in d0007.xml" in lines[3]
    assert f"descriptor of {MAX_DESCRIPTOR_BYTES + 5000} bytes exceeds {MAX_DESCRIPTOR_BYTES} bytes" in lines[2]


@pytest.fixture
def registry(tmp_path):
    pdp = site_policy_point([ADMIN], {"bio": {"members": [ALICE, "/O=Grid/CN=not a DN"]}})
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    reg = Registry(tmp_path / "state", RepositoryConfig(ingest_dirs=[str(ingest)], gridftp_port=-1), pdp)
    seed = reg.register(Subject(ADMIN), parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes()),
                        Source("localPath", str(make_image(ingest / "seed.qcow2", fill=b"import-core"))))
    reg.sha256 = seed.findtext("{*}image/{*}sha256")
    yield reg
    reg.close()


def _batch(reg, names, owner=None):
    out = []
    for name in names:
        ws = etree.fromstring(_text(name))
        set_field(ws, "image", "sha256", reg.sha256)
        if owner:
            set_field(ws, "identity", "owner", owner)
        out.append(ws)
    return out


def test_a_schema_checked_import_stores_only_valid_descriptors_with_the_fields_it_set(registry):
    batch = _batch(registry, [f"checked-{i}" for i in range(5)]) + _batch(registry, ["owned"], owner=ALICE)
    done = registry.import_images(Subject(ALICE), batch, schema_checked=True)
    stored = [registry.catalogue.get(ws.findtext("{*}identity/{*}imageId")).element() for ws in done]
    for ws in stored:
        check_descriptor(ws)                       # every stored descriptor is valid, not only those checked again
    assert [ws.findtext("{*}identity/{*}owner") for ws in stored] == [ALICE] * 6
    assert len({ws.findtext("{*}identity/{*}imageId") for ws in stored}) == 6
    assert {ws.findtext("{*}identity/{*}created") for ws in stored} == {done[0].findtext("{*}identity/{*}created")}


def test_a_caller_dn_the_schema_refuses_is_still_caught_when_it_becomes_the_owner(registry):
    """The caller's DN goes into descriptors without an owner: the first of them is validated whole with it, so a
    DN that is not a DistinguishedNameType (here one without the leading '/') is refused and nothing stored."""
    before = registry.catalogue.count()
    batch = _batch(registry, ["given-owner"], owner=ALICE) + _batch(registry, ["dn-owner", "other"])
    with pytest.raises(InvalidDescriptor, match="descriptor 2: .*owner"):
        registry.import_images(Subject("O=Grid/CN=not a DN"), batch, schema_checked=True)
    assert registry.catalogue.count() == before
