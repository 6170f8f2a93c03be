"""A new client and a job service of an older vmgrid, whose published contract (jobs.xsd's SubmitJob) has no
delegatedProxy: such a service takes no proxy and moves a job's gsiftp:// files with its own credential, not as the
scientist. The real job service in a real container on loopback (HTTPS, WS-Security both ways) is made to publish
that older contract (its served jobs.xsd without the element, as an older guest image serves it); `vmgrid job
submit`, built from it, refuses a job with a gsiftp:// file in one line saying why and what to do, before anything
is uploaded or submitted; a job without one is submitted as before."""
from __future__ import annotations

import pytest
from lxml import etree

from client.cli import main
from services.container import app
from services.jobs.store import JobSpec, StageIn
from tests.integration.test_jobs_service import PY, JobGrid

pytestmark = pytest.mark.timeout(300)
XS = "http://www.w3.org/2001/XMLSchema"


@pytest.fixture
def older(grid_pki, tmp_path, monkeypatch):
    """A job service publishing the SubmitJob of a vmgrid from before delegatedProxy."""
    served = app.served_schema

    def older_schema(name: str, base_url: str) -> bytes | None:
        data = served(name, base_url)
        if name != "jobs.xsd" or data is None:
            return data
        root = etree.fromstring(data)
        (element,) = root.xpath("//xs:element[@name='SubmitJob']//xs:element[@name='delegatedProxy']",
                                namespaces={"xs": XS})
        element.getparent().remove(element)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8")

    monkeypatch.setattr(app, "served_schema", older_schema)
    (tmp_path / "jobs").mkdir()
    grid = JobGrid(grid_pki, tmp_path / "jobs")
    (grid.files / "in.fa").write_text(">s\nACGT\n")
    yield grid
    grid.close()


def submit(grid, *args: str) -> int:
    return main(["job", "submit", grid.url, "--proxy", str(grid.pki.alice.proxy_path), "--cert-dir",
                 str(grid.pki.cert_dir), *args])


@pytest.mark.parametrize("files", ["gsiftp-in", "gsiftp-out"])
def test_a_new_client_tells_the_scientist_an_older_service_cannot_move_her_gsiftp_files_as_her(older, tmp_path,
                                                                                            capsys, files):
    """Without the fix the client sent no proxy, silently: an older service fetched the file with its own credential
    (a guest's, refused by every GridFTP face: the job Failed at its stage-in; a host's: as a node), and this one
    answered `update your vmgrid client` to the newest client. Now nothing is uploaded (the local file too) or
    submitted, and the scientist reads why in one line, exit 1."""
    (tmp_path / "local.fa").write_text(">l\nTTTT\n")
    url = f"{older.gridftp_url}/in.fa" if files == "gsiftp-in" else f"{older.gridftp_url}/results/r.txt"
    option = ["--stage-in", url] if files == "gsiftp-in" else ["--stage-out", f"r.txt={url}"]
    rc = submit(older, "--stage-in", str(tmp_path / "local.fa"), *option, "--", "/bin/sh", "-c", "cat *.fa > r.txt")
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err.count("\n") == 1, out + err
    assert err == (f"vmgrid: {url}: the job service at {older.url} is of an older vmgrid, whose SubmitJob takes no "
                   f"delegated proxy: it would move the job's gsiftp:// files with its own credential, not as you, so "
                   f"nothing was staged or submitted; give the job local files instead (--stage-in FILE goes through "
                   f"the service's own GridFTP face, and `vmgrid job get` fetches its outputs), or ask whoever runs it "
                   f"(for a VM's, its owner: a newer image) for a newer vmgrid\n"), err
    assert older.service.jobs.store.list() == [] and older.seen == []      # nothing submitted, her server not asked
    assert not list(older.service.jobs.staging_dir.rglob("*local.fa"))      # nothing uploaded


def test_the_library_refuses_too_and_a_job_without_gsiftp_files_still_runs(older, grid_pki, tmp_path, capsys):
    from services.jobs.client import OlderJobService

    alice = older.client(grid_pki.alice)
    with pytest.raises(OlderJobService, match="is of an older vmgrid, whose SubmitJob takes no delegated proxy"):
        alice.submit(JobSpec(PY, ("-c", "pass"), stage_in=(StageIn(f"{older.gridftp_url}/in.fa", "in.fa"),)))
    assert older.service.jobs.store.list() == []
    (tmp_path / "local.fa").write_text(">l\nTTTT\n")
    assert submit(older, "--stage-in", str(tmp_path / "local.fa"), "--wait", "--", "/bin/cat", "local.fa") == 0
    key = capsys.readouterr().out.strip()
    assert alice.status(key).stdout_tail == ">l\nTTTT\n"
