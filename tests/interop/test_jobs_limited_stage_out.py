"""Why a job's gsiftp:// stage-out needs no full proxy: GridFTP servers take a limited proxy (RFC 3820 id-ppl-limited,
`grid-proxy-init -limited`) for writing as for reading, Globus' own globus-gridftp-server included; only job
submission (GRAM, vmgrid's SubmitJob) and VM deployment refuse it. The proxy a job service keeps for a job is the
one a client delegated to the service's key (security.delegation.delegate, accepted with the service's host key):
here a limited one sends a file to a real globus-gridftp-server (GSI, grid-mapfile), verified, written as alice."""
from __future__ import annotations

import os
import shutil

import pytest

from gridftp import upload
from security.delegation import accept, delegate
from tests.fixtures.pki import grid_pki  # noqa: F401
from tests.interop.test_gridftp_globus import globus_argv, world  # noqa: F401
from tests.interop.test_gsi_globus import globus_gsi  # noqa: F401
from tests.unit.gridftp.gridftp_helpers import make_file, sha256_of

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300),
              pytest.mark.skipif(not shutil.which("globus-gridftp-server"),
                                 reason="globus-gridftp-server not installed (run.sh setup installs it)")]


def test_a_limited_delegated_proxy_writes_to_a_globus_gridftp_server(globus_gsi, world, grid_pki,  # noqa: F811
                                                                   tmp_path):
    kept = accept(delegate(grid_pki.alice.proxy, grid_pki.host.certificate, limited=True), grid_pki.host,
                  grid_pki.trust(), expected_dn=grid_pki.alice.dn)
    assert kept.limited
    source = tmp_path / "result.dat"
    make_file(source, 3 * 1024 * 1024 + 17)
    (world / "dst").mkdir(exist_ok=True)
    os.chmod(world / "dst", 0o777)
    sent = upload(source, globus_gsi.url(world / "dst" / "result.dat"), parallel=2, credential=kept,
                  trust=grid_pki.cert_dir, gsi=True, retries=0, state_dir=tmp_path / "st")
    # written, verified: the server's grid-mapfile maps alice's DN alone, so it took the limited proxy as hers (its
    # log names her only once flushed: not read here)
    assert sent.sha256 == sha256_of(world / "dst" / "result.dat") == sha256_of(source)
