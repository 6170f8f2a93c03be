"""GSI (issue 15) and revocation: globus-url-copy, with a proxy grid-proxy-init made from a certificate the test
CA has revoked, is refused by vmgrid's GridFTP server, which reads the CA's CRL (`<hash>.r0`) from its
X509_CERT_DIR; and a certificate revoked with `vmgrid ca revoke` while the server runs is refused from the next
session on, where the same proxy was let in before."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gridftp import GridFTPServer
from security.trust import TrustStore

from tests.fixtures.pki import grid_pki  # noqa: F401
from tests.interop.test_gridftp_globus import globus_argv  # noqa: F401
from tests.interop.test_gsi_globus import globus_env, grid_proxy_init, url_copy
from tests.unit.gridftp.gridftp_helpers import MiB, make_file, sha256_of

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not shutil.which("globus-url-copy") or not shutil.which("grid-proxy-init"),
                       reason="Globus tools not installed (run.sh setup installs them)"),
]

VMGRID = Path(sys.executable).with_name("vmgrid")     # the installed entry point


@pytest.fixture
def server(grid_pki, tmp_path):  # noqa: F811
    """vmgrid's GridFTP server with the host credential. Its TrustStore looks at X509_CERT_DIR on every
    validation (recheck_seconds=0), so a CRL published a moment ago counts; the default rechecks every 2 s."""
    root = tmp_path / "served"
    make_file(root / "data" / "image.qcow2", 3 * MiB + 17)
    trust = TrustStore(grid_pki.cert_dir, recheck_seconds=0)
    srv = GridFTPServer(root, "127.0.0.1", 0, credential=grid_pki.host, trust=trust).start()
    yield srv, root
    srv.stop()


def client_cert_dir(grid_pki, tmp_path: Path) -> Path:  # noqa: F811
    """The client's X509_CERT_DIR: the test CA without its CRL. globus-url-copy checks its own proxy chain
    against the CRLs it is given and would refuse by itself; without them only the server can refuse."""
    where = tmp_path / "client-certificates"
    where.mkdir()
    for f in grid_pki.cert_dir.iterdir():
        if not f.suffix.startswith(".r"):
            shutil.copy(f, where / f.name)
    return where


def copy(globus_argv, env, srv, out: Path) -> subprocess.CompletedProcess:  # noqa: F811
    return url_copy(globus_argv, env, "-dcpriv", f"gsiftp://localhost:{srv.port}/data/image.qcow2", f"file://{out}")


def test_a_revoked_certificate_is_refused(server, grid_pki, globus_argv, tmp_path):  # noqa: F811
    """The fixture's `revoked` user is on the test CA's CRL; grid-proxy-init still makes a proxy from it
    (it does not check revocation without -verify), and vmgrid's server refuses it in the GSI context."""
    srv, _ = server
    user = grid_pki.revoked
    assert any(p.suffix == ".r0" for p in grid_pki.cert_dir.iterdir())
    certs = client_cert_dir(grid_pki, tmp_path)
    proxy = grid_proxy_init(user, certs, tmp_path / "x509up_revoked", "-rfc")
    out = tmp_path / "never"
    proc = copy(globus_argv, globus_env(user, certs, proxy), srv, out)
    assert proc.returncode != 0, proc.stdout
    assert not out.exists() or out.stat().st_size == 0
    text = proc.stderr + proc.stdout
    assert "535" in text and "revoked" in text.lower(), text        # the server's refusal, with its reason


def test_revoking_with_vmgrid_ca_refuses_the_next_session(server, grid_pki, globus_argv, tmp_path):  # noqa: F811
    srv, root = server
    user = grid_pki.issue_user(f"gsi2-rev-{os.getpid()}")
    certs = client_cert_dir(grid_pki, tmp_path)
    proxy = grid_proxy_init(user, certs, tmp_path / "x509up_u", "-rfc")
    env = globus_env(user, certs, proxy)
    first = tmp_path / "first"
    ok = copy(globus_argv, env, srv, first)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert sha256_of(first) == sha256_of(root / "data" / "image.qcow2")

    ca_env = {**os.environ, "VMGRID_CA_DIR": str(grid_pki.ca_dir)}
    revoke = subprocess.run([str(VMGRID), "ca", "revoke", str(user.cert_path)], env=ca_env, capture_output=True,
                            text=True, timeout=120)
    assert revoke.returncode == 0, revoke.stderr
    assert f"revoked {user.dn}" in revoke.stdout

    second = tmp_path / "second"
    refused = copy(globus_argv, env, srv, second)
    assert refused.returncode != 0, refused.stdout
    assert not second.exists() or second.stat().st_size == 0
    text = refused.stderr + refused.stdout
    assert "535" in text and "revoked" in text.lower(), text
