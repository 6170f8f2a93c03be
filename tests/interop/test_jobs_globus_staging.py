"""A job's gsiftp:// files at a GSI-only Globus server (trial15 X12): the host job service, in a real container,
fetches a job's stage-in from and sends its stage-out to a real globus-gridftp-server (host certificate,
grid-mapfile, AUTH GSSAPI only: it answers AUTH TLS with 504) as the submitter, with the limited proxy she delegated
at submit; the job's URLs are those she would give globus-url-copy. (`vmgrid transfer` at such a server without
--gsi: test_gsi_globus.py.)"""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from services.jobs.store import JobSpec, StageIn, StageOut
from tests.fixtures.pki import grid_pki  # noqa: F401
from tests.integration.test_jobs_service import PY, JobGrid
from tests.interop.test_gridftp_globus import globus_argv, world  # noqa: F401
from tests.interop.test_gsi_globus import globus_gsi  # noqa: F401

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300),
              pytest.mark.skipif(not shutil.which("globus-gridftp-server"),
                                 reason="globus-gridftp-server not installed (run.sh setup installs it)")]


@pytest.fixture
def grid(grid_pki, tmp_path):  # noqa: F811
    g = JobGrid(grid_pki, tmp_path)
    yield g
    g.close()


def test_a_job_stages_in_and_out_at_a_gsi_only_globus_gridftp_server(grid, globus_gsi, world, grid_pki,  # noqa: F811
                                                                     tmp_path):
    source = world / "src" / "in.fa"
    source.write_bytes(b">seq1\nACGTACGTTTGA\n" * 1000)
    os.chmod(source, 0o644)
    script = "d = open('in.fa','rb').read(); open('o.txt','w').write(f'{len(d)} {d.count(b\">\")}\\n')"
    spec = JobSpec(PY, ("-c", script), stage_in=(StageIn(globus_gsi.url(source), "in.fa"),),
                   stage_out=(StageOut("o.txt", globus_gsi.url(world / "dst" / "o.txt")),), lifetime=600)
    alice = grid.client(grid_pki.alice)
    info = alice.wait(alice.submit(spec), timeout=180)
    assert (info.state, info.exit_code, info.failure) == ("Done", 0, None), info.failure
    expected = f"{source.stat().st_size} 1000\n".encode()
    # written by the Globus server (as the account alice's DN maps to), verified by the service against its CKSM
    assert (world / "dst" / "o.txt").read_bytes() == expected
    outputs = {name: digest for name, _size, digest, _ in info.outputs}
    assert outputs["o.txt"] == hashlib.sha256(expected).hexdigest()
    assert info.progress["filesDone"] == info.progress["filesTotal"] == 1          # the stage-in

