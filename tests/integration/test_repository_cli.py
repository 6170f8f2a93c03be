"""`vmgrid repo …` as a scientist runs it: against a repository process, with the user's proxy."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from client.localgrid import LocalGrid
from tests.fixtures.interrupt import interrupt_when
from tests.fixtures.repository import EXAMPLES, make_image


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with repository_grid(tmp_path_factory.mktemp("cligrid")) as g:
        yield g


@contextlib.contextmanager
def repository_grid(root):
    with LocalGrid(root) as g:
        admin, alice = g.user("admin"), g.user("alice")
        ingest = root / "ingest"
        ingest.mkdir()
        make_image(ingest / "emboss.qcow2", fill=b"cli")
        proc = g.start("repository", ["repository"], {
            "repository": {"ingest_dirs": [str(ingest)], "gridftp_port": 0},
            "policy": {"admins": [admin.dn], "vos": {"bio": {"members": [alice.dn], "admins": [admin.dn]},
                                                     "hep": {"members": [admin.dn]}}},
        })
        g.url = proc.base_url + "/wsrf/services/VMRepositoryService"
        g.ingest = ingest
        yield g


def vmgrid(grid, user, *args, check=True, cwd=None):
    env = {**grid.env(user), "VMGRID_REPOSITORY": grid.url}
    if cwd is not None:
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-m", "client.cli", *args], env=env, capture_output=True, text=True,
                       timeout=60, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"vmgrid {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def test_a_scientist_registers_queries_duplicates_and_removes(grid, tmp_path):
    out = vmgrid(grid, "admin", "repo", "register", str(EXAMPLES / "debian12-emboss.xml"),
                 str(grid.ingest / "emboss.qcow2"), "--on-host", "--json")
    image_id = json.loads(out.stdout)["descriptors"][0]["identity"]["imageId"]

    table = vmgrid(grid, "alice", "repo", "query", "ram >= 512", "library emboss >= 6.6").stdout
    assert "bio/debian12-emboss" in table and "1 matching" in table and table.splitlines()[0].startswith("ID")

    none = vmgrid(grid, "alice", "repo", "query", "library emboss >= 6.10").stdout
    assert "0 matching" in none

    # --json: the schema's integers are JSON numbers, its strings (versions, ids, sizes' units) strings
    found = json.loads(vmgrid(grid, "alice", "repo", "query", "ram >= 512", "library emboss >= 6.6", "--json").stdout)
    hw, image = found["descriptors"][0]["hardware"], found["descriptors"][0]["image"]
    assert (found["total"], hw["vcpus"], hw["memory"]) == (1, 1, 512), hw
    assert isinstance(image["size"], int) and image["size"] == (grid.ingest / "emboss.qcow2").stat().st_size
    assert all(isinstance(d["size"], int) for d in hw["disk"]), hw["disk"]
    assert isinstance(found["descriptors"][0]["identity"]["version"], str)

    xml = vmgrid(grid, "alice", "repo", "query", "--xpath", "//ws:library[ws:name='emboss']", "--xml").stdout
    assert etree.fromstring(xml.split("-->", 1)[1]).findtext("{*}identity/{*}imageId") == image_id

    shown = vmgrid(grid, "alice", "repo", "show", "bio/debian12-emboss").stdout
    assert "emboss 6.6.0" in shown and "512 MiB RAM" in shown

    dup = json.loads(vmgrid(grid, "alice", "repo", "duplicate", image_id, "emboss-4g", "--memory", "4096",
                            "--json").stdout)["descriptors"][0]
    assert dup["hardware"]["memory"] == 4096

    edited = tmp_path / "edited.xml"
    edited.write_text(vmgrid(grid, "alice", "repo", "show", "bio/emboss-4g", "--xml").stdout
                      .replace("<vcpus>1</vcpus>", "<vcpus>4</vcpus>"))
    updated = json.loads(vmgrid(grid, "alice", "repo", "update", "bio/emboss-4g", str(edited), "--json").stdout)
    assert updated["descriptors"][0]["hardware"]["vcpus"] == 4

    assert "bio" in vmgrid(grid, "alice", "repo", "vos").stdout
    assert "stay" in vmgrid(grid, "alice", "repo", "remove", "bio/emboss-4g").stdout
    assert "deleted" in vmgrid(grid, "admin", "repo", "remove", image_id).stdout


def test_a_bare_word_and_a_name_without_its_vo_get_what_to_type(grid, tmp_path):
    r = vmgrid(grid, "alice", "repo", "query", "emboss", check=False)
    assert r.returncode == 1 and "'library = emboss'" in r.stderr and "'name contains emboss'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    src = (EXAMPLES / "debian12-emboss.xml").read_text()
    ids = []
    for vo in ("bio", "hep"):              # alice reads bio's images, not hep's; admin reads both
        d = tmp_path / f"{vo}.xml"
        d.write_text(src.replace("<name>debian12-emboss</name>", "<name>emboss-hint</name>")
                     .replace("<vo>bio</vo>", f"<vo>{vo}</vo>"))
        out = vmgrid(grid, "admin", "repo", "register", str(d), str(grid.ingest / "emboss.qcow2"), "--on-host", "--json")
        ids.append(json.loads(out.stdout)["descriptors"][0]["identity"]["imageId"])
    try:
        r = vmgrid(grid, "alice", "repo", "show", "emboss-hint", check=False)
        assert r.returncode == 1 and "InvalidArgument" in r.stderr and "did you mean bio/emboss-hint?" in r.stderr, \
            r.stderr
        r = vmgrid(grid, "alice", "repo", "remove", "emboss-hint", check=False)
        assert r.returncode == 1 and "did you mean bio/emboss-hint?" in r.stderr, r.stderr
        r = vmgrid(grid, "admin", "repo", "show", "emboss-hint", check=False)
        assert r.returncode == 1 and "in the VOs bio, hep: give VO/emboss-hint" in r.stderr, r.stderr
        r = vmgrid(grid, "alice", "repo", "show", "no-such-image", check=False)
        assert r.returncode == 1 and "no image you may read is named no-such-image" in r.stderr, r.stderr
        assert "emboss-hint" in vmgrid(grid, "alice", "repo", "show", "bio/emboss-hint").stdout
    finally:
        for image_id in ids:
            vmgrid(grid, "admin", "repo", "remove", image_id)


@pytest.mark.parametrize("args, message", [
    (["repo", "query", "ram >=="], "bad query"),
    (["repo", "query", "colour = blue"], "unknown field"),
    (["repo", "show", "bio/nothing"], "UnknownImage"),
    (["repo", "register", "/nonexistent.xml", "x", "--on-host"], "No such file"),
    (["repo", "remove", "nonsense"], "InvalidArgument"),
])
def test_errors_are_one_clear_line(grid, args, message):
    r = vmgrid(grid, "alice", *args, check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("vmgrid: ") and message in r.stderr and "Traceback" not in r.stderr


def test_a_version_that_is_not_one_is_a_one_line_bad_query(grid):
    """`vmgrid repo query 'library emboss >= six'` listed every image; it is the service's BadQuery (bad value), one
    line naming the value and what a version looks like: docs/query.md's transcript, run as written."""
    import shlex

    doc = (Path(__file__).resolve().parents[2] / "docs" / "query.md").read_text()
    shown = re.search(r"\(its output compared\) -->\n```\n\$ (vmgrid [^\n]*)\n(vmgrid: [^\n]*)\n```", doc)
    assert shown, "docs/query.md shows the transcript"
    r = vmgrid(grid, "alice", *shlex.split(shown.group(1))[1:], check=False)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr == shown.group(2) + "\n"
    assert r.stderr == ("vmgrid: bad query: library.emboss >= six: 'six' is not a version: a version starts with a "
                        "digit and holds letters, digits and . + : ~ _ - (6.6, 6.6.0-1, 2.6.9-42.EL, 1:6.6.0)\n")


def test_no_credential_and_no_service_are_explained(grid, tmp_path):
    env = {"X509_CERT_DIR": str(grid.cert_dir), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "X509_USER_PROXY": "", "VMGRID_REPOSITORY": grid.url}
    r = subprocess.run([sys.executable, "-m", "client.cli", "repo", "vos"], env=env, capture_output=True, text=True)
    if not Path(f"/tmp/x509up_u{os.getuid()}").exists():   # (on a shared machine another's grid-proxy-init
        assert r.returncode == 1 and "proxy-init" in r.stderr, r.stderr      # may have made one: it is used then)
    # a proxy named by X509_USER_PROXY that is not there: what to do, as with none at all
    r = subprocess.run([sys.executable, "-m", "client.cli", "repo", "vos"], capture_output=True, text=True,
                       env={**env, "X509_USER_PROXY": str(tmp_path / "gone.pem")})
    assert r.returncode == 1 and r.stderr.strip() == (f"vmgrid: proxy file {tmp_path / 'gone.pem'} does not exist: "
                                                      f"make one with `vmgrid proxy-init` (or grid-proxy-init), or "
                                                      f"name another"), r.stderr
    r = vmgrid(grid, "alice", "repo", "vos", "--url", "https://localhost:1/wsrf/services/VMRepositoryService",
               check=False)
    assert r.returncode == 1 and "cannot" in r.stderr and "Traceback" not in r.stderr


def test_register_uploads_from_the_users_machine_over_gridftp(grid, tmp_path):
    """Without --on-host the image travels over GridFTP into the user's upload area, and the
    repository checks the bytes against the sha256 computed on the user's side."""
    import hashlib

    image = make_image(tmp_path / "my-image.qcow2", fill=b"uploaded by the scientist" * 1000)
    out = vmgrid(grid, "admin", "repo", "register", str(EXAMPLES / "debian12-hep.xml"), str(image), "--json",
                 "-p", "2")
    ws = json.loads(out.stdout)["descriptors"][0]
    assert ws["image"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert "uploaded" in out.stderr
    uploads = grid.root / "repository" / "repository" / "uploads"
    assert [p for p in uploads.rglob("*") if p.is_file()] == []      # ingested, not left behind
    vmgrid(grid, "admin", "repo", "remove", ws["identity"]["imageId"])


def test_register_name_registers_a_descriptor_under_another_name(grid, tmp_path):
    """README's placeholder: the example descriptor over an empty disk, registered as bio/emboss-placeholder so that
    the recipe's name (bio/debian12-emboss) stays the built image's. The file is not changed; a name the schema
    refuses is one line before anything is sent."""
    image = make_image(tmp_path / "placeholder.qcow2", fill=b"an empty disk" * 100)
    descriptor = EXAMPLES / "debian12-emboss.xml"
    before = descriptor.read_bytes()
    bad = vmgrid(grid, "alice", "repo", "register", str(descriptor), str(image), "--name", "no spaces", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("vmgrid: --name 'no spaces': ") and "pattern" in bad.stderr
    out = vmgrid(grid, "alice", "repo", "register", str(descriptor), str(image), "--name", "emboss-placeholder",
                 "--json")
    ws = json.loads(out.stdout)["descriptors"][0]
    assert (ws["identity"]["name"], ws["identity"]["vo"]) == ("emboss-placeholder", "bio")
    assert descriptor.read_bytes() == before
    assert "bio/emboss-placeholder" in vmgrid(grid, "alice", "repo", "query", "library emboss >= 6.6").stdout
    vmgrid(grid, "alice", "repo", "remove", "bio/emboss-placeholder")


def test_register_refuses_before_the_upload_what_the_repository_would_refuse_after_it(grid, tmp_path):
    """An image for a VO the scientist is not in, or under a name already taken, is refused before a byte is sent
    (it was refused after the whole upload, which stayed in the upload area; the poster's 2 GB took 6 minutes)."""
    image = make_image(tmp_path / "big.qcow2", fill=b"bytes that should not travel" * 1000)
    uploads = grid.root / "repository" / "repository" / "uploads"
    r = vmgrid(grid, "alice", "repo", "register", str(EXAMPLES / "debian12-hep.xml"), str(image), check=False)
    assert r.returncode == 1 and r.stderr.startswith("vmgrid: AccessDenied: ") and r.stderr.count("\n") == 1, r.stderr
    assert "may not image.register" in r.stderr and "uploaded" not in r.stderr
    out = vmgrid(grid, "admin", "repo", "register", str(EXAMPLES / "debian12-hep.xml"), str(image), "--json")
    image_id = json.loads(out.stdout)["descriptors"][0]["identity"]["imageId"]
    r = vmgrid(grid, "admin", "repo", "register", str(EXAMPLES / "debian12-hep.xml"), str(image), check=False)
    assert r.returncode == 1 and "uploaded" not in r.stderr, r.stderr
    assert r.stderr == "vmgrid: DuplicateName: an image named 'debian12-root' already exists in VO 'hep'\n"
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 65536)                                     # a raw disk under a qcow2 descriptor
    r = vmgrid(grid, "admin", "repo", "register", str(EXAMPLES / "debian12-hep.xml"), str(raw), check=False)
    assert r.returncode == 1 and "uploaded 65536 bytes" not in r.stderr, r.stderr
    assert r.stderr == (f"vmgrid: {raw} is a raw image but {EXAMPLES / 'debian12-hep.xml'} says <format>qcow2</format>: "
                        f"nothing uploaded (correct the descriptor, or convert: qemu-img convert -O qcow2 {raw} NEW)\n")
    assert [p for p in uploads.rglob("*") if p.is_file()] == []       # nothing sent, nothing left behind
    vmgrid(grid, "admin", "repo", "remove", image_id)


# -- vmgrid repo import DIR (issue 13 §4) ----------------------------------------------------------------
def _import_dir(grid, tmp_path, names, vo="bio", memory="512"):
    """A directory of descriptors naming the bytes of bio/import-base (registered once per module)."""
    import hashlib

    base = grid.ingest / "emboss.qcow2"
    sha = hashlib.sha256(base.read_bytes()).hexdigest()
    if getattr(grid, "import_base", None) is None:
        src = (EXAMPLES / "debian12-emboss.xml").read_text().replace(
            "<name>debian12-emboss</name>", "<name>import-base</name>")
        path = tmp_path / "import-base.xml"
        path.write_text(src)
        vmgrid(grid, "admin", "repo", "register", str(path), str(base), "--on-host")
        grid.import_base = sha
    d = tmp_path / "descriptors"
    d.mkdir()
    template = (EXAMPLES / "debian12-emboss.xml").read_text()
    for name in names:
        text = (template.replace("<name>debian12-emboss</name>", f"<name>{name}</name>")
                .replace("<vo>bio</vo>", f"<vo>{vo}</vo>")
                .replace("<memory>512</memory>", f"<memory>{memory}</memory>")
                .replace("<image><format>qcow2</format>", f"<image><format>qcow2</format><sha256>{sha}</sha256>"))
        (d / f"{name}.xml").write_text(text)
    return d


@pytest.fixture(scope="module")
def alice_repo(grid):
    from client.repository import RepositoryClient
    from client.soap import GridServiceClient
    from security.trust import TrustStore

    client = RepositoryClient(GridServiceClient(grid.url, grid.user("alice").credential, TrustStore(grid.cert_dir)))
    yield client
    client.service.close()


@pytest.fixture
def names_in_catalogue(alice_repo):
    def names(prefix):
        found = alice_repo.query([f"name matches ^{prefix}"], limit=1000)
        return sorted(ws.findtext("{*}identity/{*}name") for ws in found.descriptors)
    return names


def test_import_registers_a_directory_of_descriptors(grid, tmp_path, names_in_catalogue):
    """docs/repository.md's block (`vmgrid repo import descriptors/`, then with `--json`), each line run by a shell
    as written, as alice, in a directory of its own holding `descriptors/`."""
    from tests.fixtures.namespaces import vmgrid_command

    doc = (Path(__file__).resolve().parents[2] / "docs" / "repository.md").read_text()
    block = re.search(r"<!-- run as written by tests/integration/test_repository_cli\.py[^>]*-->\n```sh\n(.*?)```",
                      doc, re.S)
    assert block, "docs/repository.md lost its import block run by this test"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert [line.split("#")[0].split() for line in lines] == [["vmgrid", "repo", "import", "descriptors/"],
                                                               ["vmgrid", "repo", "import", "descriptors/", "--json"]]
    env = {**grid.env("alice"), "VMGRID_REPOSITORY": grid.url,
           "PATH": f"{vmgrid_command(tmp_path / 'bin')}:/usr/bin:/bin"}
    outs = []
    for n, line in enumerate(lines):
        work = tmp_path / f"line{n}"
        work.mkdir()
        _import_dir(grid, work, [f"imp{n}-{i:02d}" for i in range(12)])
        r = subprocess.run(["bash", "-e", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
        outs.append(r.stdout)
    assert outs[0].startswith("imported 12 descriptors from descriptors")
    assert names_in_catalogue("imp0-") == [f"imp0-{i:02d}" for i in range(12)]
    printed = json.loads(outs[1])
    assert [Path(e["file"]).name for e in printed] == [f"imp1-{i:02d}.xml" for i in range(12)]
    assert names_in_catalogue("imp1-") == [f"imp1-{i:02d}" for i in range(12)]
    shown = json.loads(vmgrid(grid, "alice", "repo", "show", "bio/imp0-03", "--json").stdout)["descriptors"][0]
    assert shown["identity"]["owner"] == grid.user("alice").dn and shown["image"]["sha256"] == grid.import_base


def test_import_in_batches_as_json(grid, tmp_path, names_in_catalogue):
    """`vmgrid repo import descriptors/ --json` (docs/repository.md), here in batches of 2."""
    _import_dir(grid, tmp_path, [f"batch-{i}" for i in range(5)])
    out = json.loads(vmgrid(grid, "alice", "repo", "import", "descriptors/", "--json", "--batch", "2",
                            cwd=tmp_path).stdout)
    assert [Path(e["file"]).name for e in out] == [f"batch-{i}.xml" for i in range(5)]
    assert all(e["imageId"].startswith("img-") for e in out)
    assert names_in_catalogue("batch-") == [f"batch-{i}" for i in range(5)]


def test_duplicate_memory_takes_units_and_a_register_of_no_streams_is_refused_before_anything(grid, tmp_path):
    src = tmp_path / "units.xml"
    src.write_text((EXAMPLES / "debian12-emboss.xml").read_text().replace("<name>debian12-emboss</name>",
                                                                          "<name>units</name>"))
    vmgrid(grid, "admin", "repo", "register", str(src), str(grid.ingest / "emboss.qcow2"), "--on-host")
    dup = json.loads(vmgrid(grid, "alice", "repo", "duplicate", "bio/units", "units-8g", "--memory", "8G",
                            "--json").stdout)["descriptors"][0]
    assert dup["hardware"]["memory"] == 8192
    bad = vmgrid(grid, "alice", "repo", "duplicate", "bio/units", "units-x", "--memory", "lots", check=False)
    assert bad.returncode == 1 and bad.stderr == ("vmgrid: --memory is RAM in MiB (or with a unit: 512M, 4G), 1 to "
                                                  "4194304 (4 TiB), not lots\n")
    for p in ("0", "-3"):        # 0 streams used to wait for ever
        bad = vmgrid(grid, "alice", "repo", "register", str(src), str(grid.ingest / "emboss.qcow2"), "-p", p,
                     check=False)
        assert bad.returncode == 1 and bad.stderr == "vmgrid: -p must be between 1 and 64\n"
    vmgrid(grid, "alice", "repo", "remove", "bio/units-8g")
    vmgrid(grid, "admin", "repo", "remove", "bio/units")


@pytest.mark.parametrize("args", [["--limit", "0"], ["--limit", "1001"], ["--offset", "-1"]])
def test_a_query_page_out_of_bounds_is_one_line_not_the_default_page(grid, args):
    bad = vmgrid(grid, "alice", "repo", "query", "ram >= 1", *args, check=False)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == "vmgrid: --limit is 1 to 1000 descriptors (default 20), --offset 0 or more\n"


def test_an_import_of_one_descriptor_says_descriptor(grid, tmp_path, names_in_catalogue):
    _import_dir(grid, tmp_path, ["single-0"])
    out = vmgrid(grid, "alice", "repo", "import", "descriptors/", cwd=tmp_path).stdout
    assert out.startswith("imported 1 descriptor from descriptors in "), out
    assert names_in_catalogue("single-") == ["single-0"]


def test_import_reports_every_bad_file_and_imports_nothing(grid, tmp_path, names_in_catalogue):
    d = _import_dir(grid, tmp_path, ["bad-a", "bad-b", "bad-c"])
    (d / "bad-b.xml").write_text((d / "bad-b.xml").read_text().replace("<memory>512</memory>", "<memory>lots</memory>"))
    (d / "bad-c.xml").write_text("<workspace>not closed")
    r = vmgrid(grid, "alice", "repo", "import", str(d), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert all(line.startswith("vmgrid: ") for line in lines)
    assert any("bad-b.xml" in line and "memory" in line for line in lines)
    assert any("bad-c.xml" in line for line in lines)
    assert "2 of 3 descriptor files" in lines[-1] and "nothing was imported" in lines[-1]
    assert names_in_catalogue("bad-") == []


@pytest.mark.parametrize("victim_no", [5, 3])
def test_a_refused_descriptor_is_named_and_the_import_undone(grid, tmp_path, names_in_catalogue, victim_no):
    """The repository refuses one descriptor of the third batch, or of the second while the third is under way
    beside it (the command keeps two calls under way): the file is named, and nothing of the directory stays
    registered, the other batches included."""
    prefix = f"undo{victim_no}-"
    d = _import_dir(grid, tmp_path, [f"{prefix}{i}" for i in range(6)])
    victim = d / f"{prefix}{victim_no}.xml"
    victim.write_text(victim.read_text().replace(f"<name>{prefix}{victim_no}</name>", "<name>import-base</name>"))
    r = vmgrid(grid, "alice", "repo", "import", str(d), "--batch", "2", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"vmgrid: {victim}: DuplicateName: descriptor 2 (bio/import-base)"), r.stderr
    assert "nothing was imported" in r.stderr and "the 4 descriptors of its other batches were removed" in r.stderr
    assert names_in_catalogue(prefix) == []


@pytest.mark.parametrize("case", ["denied-vo", "over-the-limit", "unknown-bytes", "unreadable-bytes", "has-id"])
def test_import_refusals_are_typed_name_the_descriptor_and_change_nothing(grid, tmp_path, alice_repo,
                                                                          names_in_catalogue, case):
    """ImportImages is all or none: one refused descriptor (authorization, a policy limit, bytes the
    repository does not have or the caller may not read, a repository-set field) fails the call with a
    typed fault naming it by position, and none of the call's descriptors is registered."""
    from services.descriptor import parse_descriptor, set_field
    from services.faults import AccessDenied, InvalidDescriptor, LimitExceeded, UnknownImage

    d = _import_dir(grid, tmp_path, [f"{case}-{i}" for i in range(3)])
    descriptors = [parse_descriptor(p.read_bytes()) for p in sorted(d.glob("*.xml"))]
    victim = descriptors[1]
    if case == "denied-vo":
        set_field(victim, "identity", "vo", "hep")
        expected = AccessDenied
    elif case == "over-the-limit":
        set_field(victim, "hardware", "memory", "999999")
        expected = LimitExceeded
    elif case == "unknown-bytes":
        set_field(victim, "image", "sha256", "ab" * 32)
        expected = UnknownImage
    elif case == "unreadable-bytes":
        # bytes of an image only hep can read: knowing their sha256 gives alice nothing
        hep = (EXAMPLES / "debian12-hep.xml").read_text().replace("<name>", "<name>hep-secret-", 1)
        (tmp_path / "hep.xml").write_text(hep)
        make_image(grid.ingest / "hep-secret.qcow2", fill=b"hep only " + case.encode())
        out = vmgrid(grid, "admin", "repo", "register", str(tmp_path / "hep.xml"),
                     str(grid.ingest / "hep-secret.qcow2"), "--on-host", "--json")
        set_field(victim, "image", "sha256", json.loads(out.stdout)["descriptors"][0]["image"]["sha256"])
        expected = UnknownImage
    else:
        set_field(victim, "identity", "imageId", "img-" + "0" * 32)
        expected = InvalidDescriptor
    with pytest.raises(expected) as info:
        alice_repo.import_images(descriptors)
    assert info.value.description.startswith("descriptor 2")
    if case != "has-id":
        assert info.value.description.startswith(f"descriptor 2 ({victim.findtext('{*}identity/{*}vo')}/{case}-1): ")
    assert names_in_catalogue(f"{case}-") == []


@pytest.mark.parametrize("args", [["repo", "show", "bio/a\x01"], ["repo", "query", "name = a\x1b[2J"],
                                  ["repo", "query", "--xpath", '/ws:workspace[ws:identity/ws:name="\x07"]'],
                                  ["repo", "duplicate", "bio/x", "copy\x1b"]])
def test_a_control_character_in_an_argument_is_one_clear_line_and_nothing_is_sent(grid, args):
    """No XML message can carry NUL or another C0 control character (an escape sequence, a bell): the client
    library refuses such an argument, naming it, before anything is sent (it was a traceback from lxml)."""
    r = vmgrid(grid, "alice", *args, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("vmgrid: InvalidArgument: ") and r.stderr.count("\n") == 1, r.stderr
    assert "a character no XML message can carry" in r.stderr and "nothing was sent" in r.stderr


@pytest.mark.parametrize("value", ["debian&#10;img-00000000000000000000000000000000  bio/trusted  9.9  512 MiB",
                                   "deb\u202eian", "deb\u0085ian", "deb\u2028ian"])
def test_a_one_line_field_cannot_forge_rows_of_another_users_query_table(grid, tmp_path, alice_repo, value):
    """A VO member's distribution name with a newline printed a forged row (any image id, name and figures) in every
    other member's `vmgrid repo query` table; a bidi override reorders what it shows. One-line text fields
    (ShortTextType: distribution name, NIC network, device purpose) hold no control, format (bidi) or separator
    character: the command refuses the file, and the repository the descriptor sent as it is."""
    from services.faults import InvalidArgument, InvalidDescriptor

    d = _import_dir(grid, tmp_path, ["forge-row"])
    f = d / "forge-row.xml"
    f.write_text(f.read_text().replace("<name>debian</name>", f"<name>{value}</name>"))
    r = vmgrid(grid, "alice", "repo", "import", str(d), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"vmgrid: {f}: line " in r.stderr and "pattern" in r.stderr, r.stderr
    ws = etree.fromstring(f.read_bytes())      # sent as it is, unchecked: the repository refuses it
    with pytest.raises((InvalidDescriptor, InvalidArgument)) as info:
        alice_repo.import_images([ws])
    assert "name" in info.value.description
    assert alice_repo.query(["name = forge-row"]).total == 0
    assert "img-00000000000000000000000000000000" not in vmgrid(grid, "admin", "repo", "query", "vo = bio").stdout


def _long(text: str, name: str, extension_bytes: int) -> etree._Element:
    """The descriptor ``text`` renamed, with an extension element of ``extension_bytes`` characters."""
    text = text.replace("<name>debian12-emboss</name>", f"<name>{name}</name>", 1)
    ext = f'<extensions><x:notes xmlns:x="urn:example:notes">{"n" * extension_bytes}</x:notes></extensions>'
    return etree.fromstring(text.replace("</workspace>", ext + "</workspace>").encode())


def test_a_descriptor_longer_than_the_bound_is_refused_on_every_way_in(grid, tmp_path, alice_repo):
    """A descriptor is at most 256 KiB (260 KiB with the fields the repository sets): the command held a file to it,
    the repository did not hold a SOAP request to it (a 9 MB descriptor was stored). ImportImages and
    UpdateDescriptor refuse a longer one with InvalidDescriptor naming it; nothing is stored."""
    from services.faults import InvalidDescriptor

    template = _import_dir(grid, tmp_path, ["too-long-0", "too-long-1"])
    text = (template / "too-long-0.xml").read_text().replace("<name>too-long-0</name>", "<name>debian12-emboss</name>")
    with pytest.raises(InvalidDescriptor) as info:
        alice_repo.import_images([_long(text, "too-long-0", 100), _long(text, "too-long-1", 300 * 1024)])
    assert info.value.description.startswith("descriptor 2 (bio/too-long-1): ")
    assert "at most 262144 bytes" in info.value.description
    assert alice_repo.query(["name matches ^too-long-"]).total == 0
    alice_repo.import_images([_long(text, "too-long-0", 100)])
    with pytest.raises(InvalidDescriptor) as info:
        alice_repo.update("bio/too-long-0", _long(text, "too-long-0", 300 * 1024))
    stored = alice_repo.query(["name = too-long-0"]).descriptors[0]
    assert len(etree.tostring(stored)) < 4096


def _dense(text: str, name: str, elements: int) -> etree._Element:
    """The descriptor ``text`` renamed, with an extension of ``elements`` empty elements (the densest markup)."""
    text = text.replace("<name>debian12-emboss</name>", f"<name>{name}</name>", 1)
    ext = f'<extensions><n xmlns="urn:example:notes">{"<e/>" * elements}</n></extensions>'
    return etree.fromstring(text.replace("</workspace>", ext + "</workspace>").encode())


def test_a_query_page_stays_within_what_a_client_reads(tmp_path):
    """Seventy descriptors of 250 KiB each (each within the bound) are 17.5 MB: a page of them all was longer than
    the 16 MiB any client reads, so one VO member's long descriptors broke everyone's queries of the VO. A page
    holds at most 8 MiB of descriptors: fewer than the limit asked, with the total and its offset, and the next
    pages (from offset + its length) hold the rest."""
    from client.repository import RepositoryClient
    from client.soap import GridServiceClient
    from security.trust import TrustStore

    with repository_grid(tmp_path / "grid") as g:
        _import_dir(g, tmp_path, [])
        sha = g.import_base
        text = (EXAMPLES / "debian12-emboss.xml").read_text().replace(
            "<image><format>qcow2</format>", f"<image><format>qcow2</format><sha256>{sha}</sha256>")
        alice = RepositoryClient(GridServiceClient(g.url, g.user("alice").credential, TrustStore(g.cert_dir)))
        try:
            for first in range(0, 70, 35):
                alice.import_images([_long(text, f"page-{n:02d}", 250 * 1024) for n in range(first, first + 35)])
            seen, offset = [], 0
            while True:
                page = alice.query(["name matches ^page-"], limit=1000, offset=offset)
                assert page.total == 70 and page.offset == offset
                assert 0 < len(page.descriptors) < 70
                seen += [d.findtext("{*}identity/{*}name") for d in page.descriptors]
                offset += len(page.descriptors)
                if offset >= page.total:
                    break
            assert seen == [f"page-{n:02d}" for n in range(70)]
            # twenty descriptors of 62,000 empty elements each (250 KB, within the bound): 1.24 million markup items
            # in a page of 20, more than a client parses (the query was refused by the client); a page holds at most
            # 500,000, so the default page of 20 is cut short and the next pages hold the rest
            for first in (0, 10):
                alice.import_images([_dense(text, f"dense-{n:02d}", 62_000) for n in range(first, first + 10)])
            seen, offset = [], 0
            while offset < 20:
                page = alice.query(["name matches ^dense-"], offset=offset)
                assert page.total == 20 and 0 < len(page.descriptors) < 20
                seen += [d.findtext("{*}identity/{*}name") for d in page.descriptors]
                offset += len(page.descriptors)
            assert seen == [f"dense-{n:02d}" for n in range(20)]
        finally:
            alice.service.close()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_import_removes_what_it_had_registered(grid, tmp_path, alice_repo, names_in_catalogue, sig):
    """Ctrl-C (or a kill) in the middle of `vmgrid repo import DIR`: the batches already answered stayed
    registered, half a directory. Now no further batch is sent, the ones under way are waited for, and all are
    removed again: the command says so and exits 130. The signal is sent once the repository holds some of them."""
    import signal

    prefix = f"intr-{sig.lower()}-"
    d = _import_dir(grid, tmp_path, [f"{prefix}{i:03d}" for i in range(600)])
    env = {**grid.env("alice"), "VMGRID_REPOSITORY": grid.url}
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "repo", "import", str(d), "--batch", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while alice_repo.query([f"name matches ^{prefix}"], limit=1).total == 0:
            assert proc.poll() is None, proc.communicate()
        assert proc.poll() is None, "the import ended before it could be interrupted"
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.startswith("vmgrid: interrupted; nothing was imported (the ") and "removed again" in err, err
    assert names_in_catalogue(prefix) == []


def test_an_update_cannot_raise_memory_or_vcpus_past_the_policys_limits(grid, tmp_path, alice_repo):
    """UpdateDescriptor is authorized with the new descriptor's memory and vCPUs, as RegisterImage, ImportImages and
    DuplicateImage are: alice (8192 MiB, rule vo-members-use-images) imports at 512 MiB, and an update to 999999
    MiB is LimitExceeded and changes nothing (it was stored). Within the limit the update goes through."""
    from services.faults import LimitExceeded

    d = _import_dir(grid, tmp_path, ["upd-limit"])
    vmgrid(grid, "alice", "repo", "import", str(d))
    ws = alice_repo.query(["name = upd-limit"]).descriptors[0]
    ws.find("{*}hardware/{*}memory").text = "999999"
    with pytest.raises(LimitExceeded) as info:
        alice_repo.update("bio/upd-limit", ws)
    assert "999999" in info.value.description
    assert alice_repo.query(["name = upd-limit"]).descriptors[0].findtext("{*}hardware/{*}memory") == "512"
    ws.find("{*}hardware/{*}memory").text = "1024"
    alice_repo.update("bio/upd-limit", ws)
    assert alice_repo.query(["name = upd-limit"]).descriptors[0].findtext("{*}hardware/{*}memory") == "1024"


def test_import_refuses_links_fifos_and_other_non_files_naming_each_and_imports_nothing(grid, tmp_path,
                                                                                        names_in_catalogue):
    """`vmgrid repo import DIR` reads regular files of DIR only: a symbolic link (here to a good descriptor outside
    DIR), a FIFO (opening it would wait for a writer for ever), a device and a directory named *.xml are each a
    `vmgrid: FILE: reason` line, and nothing of DIR is imported. A name holding a newline (log and terminal
    injection) is printed escaped, on its one line."""
    import os

    d = _import_dir(grid, tmp_path, ["nonfile-0", "nonfile-1"])
    (tmp_path / "elsewhere").mkdir()
    outside = _import_dir(grid, tmp_path / "elsewhere", ["nonfile-outside"]) / "nonfile-outside.xml"
    (d / "link.xml").symlink_to(outside)
    (d / "zero.xml").symlink_to("/dev/zero")
    os.mkfifo(d / "fifo.xml")
    (d / "dir.xml").mkdir()
    (d / "bad\nvmgrid: forged.xml").write_text("<workspace>not closed")
    r = vmgrid(grid, "alice", "repo", "import", str(d), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("vmgrid: ") for line in lines), r.stderr
    assert f"vmgrid: {d}/link.xml: a symbolic link: not followed" in r.stderr
    assert f"vmgrid: {d}/zero.xml: a symbolic link: not followed" in r.stderr
    assert f"vmgrid: {d}/fifo.xml: a FIFO, not a regular file: not read" in r.stderr
    assert f"vmgrid: {d}/dir.xml: a directory, not a regular file: not read" in r.stderr
    assert f"vmgrid: {d}/bad\\nvmgrid: forged.xml: line 1: not well-formed XML" in r.stderr
    assert "5 of 7 descriptor files" in lines[-1] and "nothing was imported" in lines[-1]
    assert names_in_catalogue("nonfile-") == []


def test_import_of_descriptors_with_comments_inside_values(grid, tmp_path, names_in_catalogue):
    """A comment inside a value (`<name>cmt-<!-- note -->a</name>`) splits its text: the schema reads "cmt-a", a
    naive `.text` "cmt-", and a signed message may not carry comments (the repository refused the whole batch with
    InvalidSecurity, naming no file). The command drops comments as it reads a file: the value validated is the one
    sent, and the import goes through."""
    d = _import_dir(grid, tmp_path, ["cmt-a", "cmt-b"])
    f = d / "cmt-a.xml"
    f.write_text(f.read_text().replace("<name>cmt-a</name>", "<name>cmt-<!-- a note -->a</name>")
                 .replace("<memory>512</memory>", "<memory>5<!-- MiB -->12</memory><!-- between -->"))
    r = vmgrid(grid, "alice", "repo", "import", str(d), check=False)
    assert r.returncode == 0, r.stderr
    assert names_in_catalogue("cmt-") == ["cmt-a", "cmt-b"]


def test_the_commands_of_docs_query_md_run_as_written(tmp_path):
    """docs/query.md's command-line block, run by a shell as written (alice, VMGRID_REPOSITORY set) against a
    repository of its own: each command answers, and the example descriptor is found by the criteria, the
    description, the XPath and the name (and not by the kernel/vCPU line)."""
    with repository_grid(tmp_path / "grid") as grid:
        _run_query_doc(grid, tmp_path)


def _run_query_doc(grid, tmp_path):

    doc = (Path(__file__).resolve().parents[2] / "docs" / "query.md").read_text()
    block = re.search(r"## On the command line\n\n<!-- run as written by tests/integration/test_repository_cli.py -->\n"
                      r"```sh\n(.*?)```", doc, re.S)
    assert block, "docs/query.md lost its command-line block"
    src = (EXAMPLES / "debian12-emboss.xml").read_text().replace("<name>debian12-emboss</name>",
                                                                 "<name>debian12-querydoc</name>")
    (tmp_path / "d.xml").write_text(src)
    out = vmgrid(grid, "admin", "repo", "register", str(tmp_path / "d.xml"), str(grid.ingest / "emboss.qcow2"),
                 "--on-host", "--json")
    image_id = json.loads(out.stdout)["descriptors"][0]["identity"]["imageId"]
    bindir = tmp_path / "bin"                 # `vmgrid` on PATH: this checkout's command line
    bindir.mkdir()
    (bindir / "vmgrid").write_text(f"#!/bin/sh\nexec env PYTHONPATH={Path(__file__).resolve().parents[2]} "
                                   f"{sys.executable} -m client.cli \"$@\"\n")
    (bindir / "vmgrid").chmod(0o755)
    env = {**grid.env("alice"), "VMGRID_REPOSITORY": grid.url, "PATH": f"{bindir}:/usr/bin:/bin"}
    try:
        lines = [ln for ln in block.group(1).splitlines() if ln.strip()]
        for line in lines:                    # one at a time: each must succeed on its own
            r = subprocess.run(["bash", "-e", "-c", line], env=env, capture_output=True, text=True, timeout=120,
                               cwd=tmp_path)
            assert r.returncode == 0 and r.stderr == "", f"{line}\n{r.stdout}{r.stderr}"
            found = "bio/debian12-querydoc" in r.stdout or '"name": "debian12-querydoc"' in r.stdout
            assert found == ("kernel < 2.6.20" not in line), f"{line}\n{r.stdout}"
        assert len(lines) == 5
    finally:
        vmgrid(grid, "admin", "repo", "remove", image_id)


def test_an_interrupted_register_says_that_the_same_command_resumes_the_upload(grid, tmp_path):
    """Ctrl-C while `vmgrid repo register` uploads: it said only "vmgrid: interrupted". It now says nothing is
    registered and that the same command resumes the upload (from the last restart marker: this upload is too short
    to get one, so what is reused is not checked here; `vmgrid transfer`'s tests check resuming), and it does."""
    import os

    image = make_image(tmp_path / "big.qcow2", fill=os.urandom(1 << 20) * 192)     # 192 MiB that compress nowhere
    args = [sys.executable, "-m", "client.cli", "repo", "register", str(EXAMPLES / "debian12-hep.xml"), str(image),
            "--name", "interrupted-upload", "-p", "2"]
    env = {**grid.env("admin"), "VMGRID_REPOSITORY": grid.url}
    uploads = grid.root / "repository" / "repository" / "uploads"
    rc, err = interrupt_when(args, lambda: sum(p.stat().st_size for p in uploads.rglob("*") if p.is_file()) >= 8 << 20,
                             env=env)
    assert rc == 130 and "Traceback" not in err, err
    assert err.endswith("vmgrid: interrupted; nothing is registered; run the same command again: the upload resumes "
                        "from the server's last restart marker (it sends one every few seconds)\n"), err
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and re.search(r"uploaded 201\d+ bytes in ", again.stderr), again.stderr
    vmgrid(grid, "admin", "repo", "remove", "hep/interrupted-upload")
