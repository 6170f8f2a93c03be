"""`vmgrid job submit` with a `grid-proxy-init -old` (GT2 legacy) or `-draft` (GT3) proxy, made by Globus' own tool,
and a file that moves over GridFTP (trial13 U4): the job service moves a gsiftp:// stage-in or stage-out with a proxy
delegated from that chain, over AUTH TLS, which takes RFC 3820 proxies only, so the job was accepted and then Failed
at its stage-in. The command refuses before anything is uploaded or submitted, in `vmgrid transfer`'s words (the same
check, tests/interop/test_gridftp_older_proxies.py); an RFC 3820 proxy of grid-proxy-init still stages and runs."""
from __future__ import annotations

import shutil

import pytest

from client.cli import main
from tests.integration.test_jobs_service import JobGrid
from tests.interop.test_gsi_globus import grid_proxy_init

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("grid-proxy-init") is None,
                                 reason="Debian package globus-proxy-utils is not installed")]


@pytest.fixture
def grid(grid_pki, tmp_path):
    (tmp_path / "jobs").mkdir()
    g = JobGrid(grid_pki, tmp_path / "jobs")
    (g.files / "in.fa").write_text(">s\nACGT\n")          # on the scientist's own GridFTP server
    yield g
    g.close()


def submit(grid, proxy, *args: str) -> int:
    return main(["job", "submit", grid.url, "--proxy", str(proxy), "--cert-dir", str(grid.pki.cert_dir), *args])


@pytest.mark.parametrize("form", ["-old", "-draft"])
@pytest.mark.parametrize("files", ["gsiftp-in", "gsiftp-out", "local-in"])
def test_submit_with_an_older_globus_proxy_is_refused_before_any_job_is_made(grid, grid_pki, tmp_path, capsys, form,
                                                                            files):
    """Fails without the fix: the gsiftp:// cases printed a job key (rc 0), the job then Failed at stage-in."""
    proxy = grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "x509up", form)
    (tmp_path / "local.fa").write_text(">l\nTTTT\n")
    option = {"gsiftp-in": ["--stage-in", f"{grid.gridftp_url}/in.fa"],
              "gsiftp-out": ["--stage-out", f"r.txt={grid.gridftp_url}/results/r.txt"],
              "local-in": ["--stage-in", str(tmp_path / "local.fa")]}[files]
    rc = submit(grid, proxy, *option, "--", "/bin/sh", "-c", "cat *.fa > r.txt")
    out, err = capsys.readouterr()
    kind = "legacy" if form == "-old" else "draft"
    assert rc == 1 and out == "" and err.count("\n") == 1, out + err
    assert err.startswith(f"vmgrid: {' '.join(option)}: {grid_pki.alice.dn}/"), err
    assert f"is a {kind} proxy (grid-proxy-init {form}), and GridFTP over TLS (AUTH TLS) takes RFC 3820 proxies " \
           f"only: make one with `vmgrid proxy-init` or `grid-proxy-init -rfc`; nothing was transferred; no job was " \
           f"submitted\n" in err, err
    assert grid.client(grid_pki.alice).list(include_ended=True) == []          # nothing submitted
    assert grid.seen == []                                                      # the scientist's server never asked
    assert not list((tmp_path / "jobs").rglob("local.fa"))                    # nothing uploaded to its face


def test_a_job_that_moves_no_file_over_gridftp_is_not_refused_for_the_proxy_form(grid, grid_pki, tmp_path, capsys):
    """The form matters to GridFTP only: an ftp:// or no stage-in with a legacy proxy submits as before."""
    proxy = grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "x509up", "-old")
    assert submit(grid, proxy, "--", "/bin/echo", "hi") == 0
    key = capsys.readouterr().out.strip()
    assert grid.client(grid_pki.alice).wait(key, timeout=120).state == "Done"


def test_an_rfc_3820_proxy_of_grid_proxy_init_still_stages_in_and_out(grid, grid_pki, tmp_path, capsys):
    proxy = grid_proxy_init(grid_pki.alice, grid_pki.cert_dir, tmp_path / "x509up", "-rfc")
    rc = submit(grid, proxy, "--stage-in", f"{grid.gridftp_url}/in.fa", "--stage-out",
                f"r.txt={grid.gridftp_url}/results/r.txt", "--wait", "--", "/bin/sh", "-c", "cat in.fa > r.txt")
    assert rc == 0, capsys.readouterr().err
    assert (grid.files / "results" / "r.txt").read_text() == ">s\nACGT\n"
    assert {dn for dn, _ in grid.seen} == {grid_pki.alice.dn}                  # moved as her
