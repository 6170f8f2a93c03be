"""`vmgrid repo …` as a scientist runs it: against a repository process, with the user's proxy."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from lxml import etree

from client.localgrid import LocalGrid
from tests.fixtures.repository import EXAMPLES, make_image


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("cligrid")
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


def vmgrid(grid, user, *args, check=True):
    env = {**grid.env(user), "VMGRID_REPOSITORY": grid.url}
    r = subprocess.run([sys.executable, "-m", "client.cli", *args], env=env, capture_output=True, text=True,
                       timeout=60)
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

    xml = vmgrid(grid, "alice", "repo", "query", "--xpath", "//ws:library[ws:name='emboss']", "--xml").stdout
    assert etree.fromstring(xml.split("-->", 1)[1]).findtext("{*}identity/{*}imageId") == image_id

    shown = vmgrid(grid, "alice", "repo", "show", "bio/debian12-emboss").stdout
    assert "emboss 6.6.0" in shown and "512 MiB RAM" in shown

    dup = json.loads(vmgrid(grid, "alice", "repo", "duplicate", image_id, "emboss-4g", "--memory", "4096",
                            "--json").stdout)["descriptors"][0]
    assert dup["hardware"]["memory"] == "4096"

    edited = tmp_path / "edited.xml"
    edited.write_text(vmgrid(grid, "alice", "repo", "show", "bio/emboss-4g", "--xml").stdout
                      .replace("<vcpus>1</vcpus>", "<vcpus>4</vcpus>"))
    updated = json.loads(vmgrid(grid, "alice", "repo", "update", "bio/emboss-4g", str(edited), "--json").stdout)
    assert updated["descriptors"][0]["hardware"]["vcpus"] == "4"

    assert "bio" in vmgrid(grid, "alice", "repo", "vos").stdout
    assert "stay" in vmgrid(grid, "alice", "repo", "remove", "bio/emboss-4g").stdout
    assert "deleted" in vmgrid(grid, "admin", "repo", "remove", image_id).stdout


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


def test_no_credential_and_no_service_are_explained(grid, tmp_path):
    env = {"X509_CERT_DIR": str(grid.cert_dir), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "X509_USER_PROXY": "", "VMGRID_REPOSITORY": grid.url}
    r = subprocess.run([sys.executable, "-m", "client.cli", "repo", "vos"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "proxy-init" in r.stderr
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
