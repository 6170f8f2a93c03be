"""The VMRepository's registry core without HTTP, SOAP or GridFTP: a real SQLite catalogue and image store in
tmp_path, real qcow2 files from qemu-img, and the policy engine over the default site policy as the local
policy point. Faults are the typed ones the WSDL declares; authorization comes before anything about an
image or a hold is revealed."""
from __future__ import annotations

import ast
import subprocess
import time
from pathlib import Path

import pytest

from services.authz.engine import site_policy_point
from services.authz.pep import Decision, Subject
from services.descriptor import WS, Descriptor, parse_descriptor, set_field
from services.faults import (AccessDenied, BadQuery, DuplicateName, ImageInUse, InvalidArgument, InvalidDescriptor,
                             InvalidSource, UnknownImage)
from services.vmrepository import registry as registry_module
from services.vmrepository.config import RepositoryConfig
from services.vmrepository.query import XPATH_DIALECT, Criterion
from services.vmrepository.registry import Changes, Query, Registry, Source, upload_area

EXAMPLES = Path(__file__).resolve().parents[3] / "wsdl" / "examples"
ADMIN = Subject("/O=Grid/OU=t/CN=admin")
ALICE, BOB = Subject("/O=Grid/OU=t/CN=alice"), Subject("/O=Grid/OU=t/CN=bob")
NODE = Subject("/O=Grid/OU=t/CN=host/node1.example.org")


def descriptor(name: str = "debian12-emboss"):
    return parse_descriptor((EXAMPLES / f"{name}.xml").read_bytes())


def qcow2(path: Path, fill: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    with open(path, "ab") as f:
        f.write(fill)
    return path


class RefusingPoint:
    """The site policy, except that one subject is refused everything (as a policy may well say)."""

    def __init__(self, inner, refused: str):
        self.inner, self.refused = inner, refused

    def decide(self, subject, action, resource, context):
        if subject.dn == self.refused:
            return Decision(False, "refused-in-this-test")
        return self.inner.decide(subject, action, resource, context)

    def groups(self, subject):
        return self.inner.groups(subject)


def make_registry(tmp_path: Path, refused: str | None = None) -> Registry:
    ingest = tmp_path / "ingest"
    ingest.mkdir(exist_ok=True)
    point = site_policy_point(admins=[ADMIN.dn], vos={"bio": {"members": [ALICE.dn], "admins": [ADMIN.dn]},
                                                       "hep": {"members": [BOB.dn], "admins": [ADMIN.dn]}})
    if refused:
        point = RefusingPoint(point, refused)
    return Registry(tmp_path / "repo", RepositoryConfig(ingest_dirs=[str(ingest)], gridftp_port=-1), point)


@pytest.fixture
def reg(tmp_path):
    r = make_registry(tmp_path)
    yield r
    r.close()


def upload(reg: Registry, who: Subject, name: str, fill: bytes) -> Source:
    qcow2(reg.upload_dir / upload_area(who.dn) / name, fill)
    return Source("upload", name)


def register(reg: Registry, who: Subject = ALICE, example: str = "debian12-emboss", fill: bytes = b"one"):
    return Descriptor(reg.register(who, descriptor(example), upload(reg, who, f"{example}.qcow2", fill)))


def state(reg: Registry) -> tuple:
    db = reg.catalogue._db()
    return tuple(sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in ("images", "blobs", "holds"))


def test_register_then_get_by_id_and_by_name(reg):
    d = register(reg)
    assert d.image_id.startswith("img-") and d.owner == ALICE.dn and d.vo == "bio"
    assert len(d.sha256) == 64 and d.size > 0
    assert reg.get(ALICE, d.image_id).image_id == d.image_id
    assert reg.get(ALICE, "bio/debian12-emboss").image_id == d.image_id
    assert not (reg.upload_dir / upload_area(ALICE.dn) / "debian12-emboss.qcow2").exists()   # consumed
    with pytest.raises(DuplicateName):
        register(reg, fill=b"two")


class SwappingRegistry(Registry):
    """The race a local user with write access to an ingest directory runs, made deterministic: right after
    ``_source_path`` has checked the file (inside an ingest directory, a regular file), ``swap`` replaces it."""

    swap = None

    def _source_path(self, caller, source):
        path = super()._source_path(caller, source)
        if self.swap is not None:
            self.swap(path)
        return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("swap_to", ["link-out", "fifo", "dir-link"])
def test_a_source_swapped_after_its_check_is_refused_not_followed_nor_waited_on(tmp_path, swap_to):
    """An admin's localPath inside the ingest directory, swapped once checked for a link to a file outside it (its
    bytes were registered: anyone of the VO could then fetch them), for a FIFO (the request thread waited for a
    writer for ever), or with its directory swapped for a link elsewhere: InvalidSource, nothing registered. The
    source is opened once, without following a link or waiting, and what was opened is checked again."""
    import os

    ingest = tmp_path / "ingest"
    (ingest / "sub").mkdir(parents=True)
    secret = qcow2(tmp_path / "outside" / "sub" / "real.qcow2", b"secret bytes")
    target = qcow2(ingest / "sub" / "real.qcow2", b"x")
    point = site_policy_point(admins=[ADMIN.dn], vos={"bio": {"members": [ALICE.dn], "admins": [ADMIN.dn]}})
    reg = SwappingRegistry(tmp_path / "repo", RepositoryConfig(ingest_dirs=[str(ingest)], gridftp_port=-1), point)
    try:
        def swap(path):
            if swap_to == "link-out":
                path.unlink()
                path.symlink_to(secret)
            elif swap_to == "fifo":
                path.unlink()
                os.mkfifo(path)
            else:
                (ingest / "sub").rename(ingest / "moved")
                (ingest / "sub").symlink_to(secret.parent)
        reg.swap = swap
        before = state(reg)
        with pytest.raises(InvalidSource):
            reg.register(ADMIN, descriptor(), Source("localPath", str(target)))
        assert state(reg) == before
    finally:
        reg.close()


def test_register_authorizes_before_it_looks_at_the_source(reg):
    """A member may not ingest from the repository host's disk: refused for a path that does not exist,
    one outside the ingest directories and one inside alike, so the refusal tells nothing about the host."""
    inside = qcow2(Path(reg.config.ingest_dirs[0]) / "real.qcow2", b"x")
    before = state(reg)
    for path in ("/no/such/file.qcow2", "/etc/passwd", str(inside)):
        with pytest.raises(AccessDenied):
            reg.register(ALICE, descriptor(), Source("localPath", path))
    # a VO she is not in: refused before the (missing) upload is looked for
    with pytest.raises(AccessDenied):
        reg.register(BOB, descriptor(), Source("upload", "never-uploaded.qcow2"))
    assert state(reg) == before
    # the site admin may, and then the source is checked
    with pytest.raises(InvalidSource):
        reg.register(ADMIN, descriptor(), Source("localPath", "/etc/passwd"))
    assert Descriptor(reg.register(ADMIN, descriptor(), Source("localPath", str(inside)))).owner == ADMIN.dn


def test_an_outsider_learns_nothing_about_an_images_existence(reg):
    d = register(reg)
    before = state(reg)
    operations = {
        "get": lambda ref: reg.get(BOB, ref),
        "duplicate": lambda ref: reg.duplicate(BOB, ref, "copy"),
        "update": lambda ref: reg.update(BOB, ref, descriptor()),
        "remove": lambda ref: reg.remove(BOB, ref),
        "hold": lambda ref: reg.hold(BOB, ref, "node", 60),
        "location": lambda ref: reg.location(BOB, ref),
    }
    for name, op in operations.items():
        for ref in ("bio/debian12-emboss", "bio/no-such-image", d.image_id):
            with pytest.raises(AccessDenied):
                op(ref)
    assert state(reg) == before
    # a member of the VO is told the image is missing (she could search for it anyway)
    with pytest.raises(UnknownImage):
        reg.get(ALICE, "bio/no-such-image")
    with pytest.raises(UnknownImage):
        reg.get(ALICE, "img-" + "0" * 32)
    with pytest.raises(InvalidArgument):
        reg.get(ALICE, "neither-id-nor-vo-slash-name")


def test_a_caller_the_policy_refuses_learns_nothing_of_any_image_or_hold(tmp_path):
    reg = make_registry(tmp_path, refused=BOB.dn)
    try:
        d = register(reg)
        hold = reg.hold(ALICE, d.image_id, "node-a", 60)
        for op in (lambda: reg.release(BOB, hold.hold_id), lambda: reg.release(BOB, "hold-" + "0" * 32),
                   lambda: reg.get(BOB, d.image_id), lambda: reg.get(BOB, "img-" + "0" * 32),
                   lambda: reg.query(BOB, Query()), lambda: reg.vos(BOB)):
            with pytest.raises(AccessDenied):
                op()
        # the hold is still there, and its holder releases it
        assert reg.release(ALICE, hold.hold_id) is True
    finally:
        reg.close()


def test_release_authorizes_before_saying_there_is_no_hold(reg):
    d = register(reg)
    hold = reg.hold(ALICE, d.image_id, "node-a", 60)
    with pytest.raises(AccessDenied):
        reg.release(BOB, hold.hold_id)               # not his hold
    with pytest.raises(InvalidArgument):
        reg.release(ALICE, "hold-nope")              # may release her own holds: told there is none
    with pytest.raises(ImageInUse):
        reg.remove(ALICE, d.image_id)
    assert reg.release(ALICE, hold.hold_id) is True
    with pytest.raises(InvalidArgument):
        reg.release(ALICE, hold.hold_id)             # gone now
    assert reg.remove(ALICE, d.image_id).bytes_deleted is True


def test_a_hold_lasts_at_most_the_policys_max_lifetime(reg):
    """The duration is in the authorization context; the default policy's max_lifetime (24h) caps it."""
    d = register(reg)
    before = time.time()
    hold = reg.hold(NODE, d.image_id, "node1/blast", 3 * 24 * 3600)
    assert before + 24 * 3600 - 1 <= hold.expires <= time.time() + 24 * 3600
    short = reg.hold(NODE, d.image_id, "node1/blast-2", 120)
    assert short.expires <= time.time() + 120


def test_query_is_scoped_to_the_callers_vos_by_criteria_and_by_xpath(reg):
    bio = register(reg)
    hep = register(reg, BOB, "debian12-hep", b"hep")
    page = reg.query(ALICE, Query())
    assert page.total == 1 and [r.image_id for r in page.records] == [bio.image_id]
    assert [r.image_id for r in reg.query(BOB, Query()).records] == [hep.image_id]
    by_criteria = reg.query(ALICE, Query(groups=[[Criterion("name", "=", "debian12-emboss")]]))
    assert [r.image_id for r in by_criteria.records] == [bio.image_id]
    assert reg.query(ALICE, Query(groups=[[Criterion("name", "=", "debian12-hep")]])).total == 0
    xp = reg.query(ALICE, Query(xpath="/ws:workspace[ws:identity/ws:vo]", dialect=XPATH_DIALECT,
                                namespaces={"ws": WS}))
    assert [r.image_id for r in xp.records] == [bio.image_id]
    with pytest.raises(BadQuery):
        reg.query(ALICE, Query(xpath="/ws:workspace", dialect="urn:other", namespaces={"ws": WS}))
    with pytest.raises(BadQuery):
        reg.query(ALICE, Query(order_by="colour"))
    assert reg.vos(ALICE) == [("bio", 1)] and reg.vos(BOB) == [("hep", 1)]


def test_duplicate_update_and_remove(reg):
    d = register(reg)
    copy = Descriptor(reg.duplicate(ALICE, d.image_id, " emboss-big ", Changes(memory="2048", version="2.0")))
    assert (copy.name, copy.memory, copy.version, copy.sha256) == ("emboss-big", 2048, "2.0", d.sha256)
    assert copy.image_id != d.image_id and copy.owner == ALICE.dn
    new = descriptor()
    set_field(new, "identity", "description", "changed")
    updated = Descriptor(reg.update(ALICE, d.image_id, new))
    assert (updated.image_id, updated.sha256, updated.description) == (d.image_id, d.sha256, "changed")
    moved = descriptor()
    set_field(moved, "identity", "vo", "hep")
    with pytest.raises(InvalidDescriptor):
        reg.update(ALICE, d.image_id, moved)
    with pytest.raises(AccessDenied):
        reg.update(BOB, d.image_id, descriptor())
    assert reg.remove(ALICE, d.image_id).bytes_deleted is False      # the copy still uses the bytes
    assert reg.remove(ALICE, copy.image_id).bytes_deleted is True
    with pytest.raises(UnknownImage):
        reg.get(ALICE, d.image_id)


def test_locations_and_who_may_read_the_bytes(reg):
    d = register(reg)
    with pytest.raises(InvalidArgument):          # this registry serves no GridFTP
        reg.location(ALICE, d.image_id)

    class Served:                                 # where a GridFTP face would serve the files
        base_url = "gsiftp://repo.example.org:2811"

    reg.transfers = Served()
    loc = reg.location(ALICE, d.image_id)
    assert (loc.url, loc.sha256, loc.size, loc.image_format) == (
        f"gsiftp://repo.example.org:2811/images/{d.sha256}", d.sha256, d.size, "qcow2")
    assert reg.upload_location(ALICE) == f"gsiftp://repo.example.org:2811/uploads/{upload_area(ALICE.dn)}/"
    assert reg.may_read_bytes(ALICE.dn, d.sha256) and reg.may_read_bytes(NODE.dn, d.sha256)
    assert not reg.may_read_bytes(BOB.dn, d.sha256)
    assert not reg.may_read_bytes(ALICE.dn, "0" * 64)


def test_the_core_imports_no_xml_parser_and_no_soap():
    tree = ast.parse(Path(registry_module.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] == "lxml" or m.startswith(("services.container", "services.soapclient"))
                   for m in imported), imported


def test_a_holder_asking_again_gets_its_own_hold_renewed(reg):
    """Holds are one per image, holder and owner: a node that never recorded a hold's id finds it by asking."""
    d = register(reg)
    first = reg.hold(NODE, d.image_id, "https://node1/wsrf/services/VMManagerService#inst-1", 600)
    again = reg.hold(NODE, d.image_id, "https://node1/wsrf/services/VMManagerService#inst-1", 1)
    other = reg.hold(NODE, d.image_id, "https://node1/wsrf/services/VMManagerService#inst-2", 600)
    assert again.hold_id == first.hold_id and again.expires < first.expires
    assert other.hold_id != first.hold_id
    assert reg.release(NODE, again.hold_id) is True
    assert reg.release(NODE, other.hold_id) is True
    assert reg.remove(ALICE, d.image_id).bytes_deleted is True


def test_the_upload_sweep_leaves_an_upload_a_register_image_is_reading(reg, monkeypatch):
    """The sweep runs while RegisterImage is inside the image store's ingest of an upload older than upload_max_age
    (called from within the real ingest: no timing): it skips that upload, removes an abandoned one beside it, and
    the register completes and then removes its upload itself."""
    source = upload(reg, ALICE, "reading.qcow2", b"one")
    abandoned = upload(reg, ALICE, "abandoned.qcow2", b"two")
    area = reg.upload_dir / upload_area(ALICE.dn)
    later = time.time() + reg.config.upload_max_age + 3600
    swept, present = [], []
    real_ingest = reg.store.ingest

    def ingest_with_a_sweep(path, *args, **kwargs):
        swept.extend(reg.sweep_uploads(later))
        present.append((area / source.value).exists())
        return real_ingest(path, *args, **kwargs)

    monkeypatch.setattr(reg.store, "ingest", ingest_with_a_sweep)
    d = Descriptor(reg.register(ALICE, descriptor(), source))
    assert swept == [f"/uploads/{area.name}/{abandoned.value}"] and present == [True]
    assert reg.get(ALICE, d.image_id).sha256 == d.sha256
    assert not (area / source.value).exists() and not (area / abandoned.value).exists()
