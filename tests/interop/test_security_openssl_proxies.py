"""Interop with OpenSSL: vmgrid's RFC 3820 proxies (and proxies of proxies, limited ones) pass
`openssl verify -allow_proxy_certs` against the trusted CA directory, checking CRLs along the whole chain; revoked and foreign ones fail."""
from __future__ import annotations

import subprocess

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from security.pki import make_proxy
from tests.fixtures.pki import grid_pki  # noqa: F401

pytestmark = pytest.mark.interop


def openssl_verify(cred, cert_dir, tmp_path) -> subprocess.CompletedProcess:
    leaf = tmp_path / "leaf.pem"
    chain = tmp_path / "chain.pem"
    leaf.write_bytes(cred.cert_pem(with_chain=False))
    chain.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in cred.chain))
    args = ["openssl", "verify", "-allow_proxy_certs", "-CApath", str(cert_dir), "-crl_check_all"]
    if cred.chain:
        args += ["-untrusted", str(chain)]
    return subprocess.run(args + [str(leaf)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", ["proxy", "proxy of proxy", "limited proxy", "user certificate", "host"])
def test_openssl_accepts_vmgrid_credentials(kind, grid_pki, tmp_path):  # noqa: F811
    alice = grid_pki.alice
    cred = {"proxy": lambda: alice.proxy,
            "proxy of proxy": lambda: make_proxy(alice.proxy, hours=1, key=grid_pki.keys.take()),
            "limited proxy": lambda: make_proxy(alice.credential, limited=True, key=grid_pki.keys.take()),
            "user certificate": lambda: alice.credential,
            "host": lambda: grid_pki.host}[kind]()
    proc = openssl_verify(cred, grid_pki.cert_dir, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": OK"), proc.stdout + proc.stderr


@pytest.mark.parametrize("who,words", [("revoked", "revoked"), ("stranger", "unable to get")])
def test_openssl_refuses_revoked_and_foreign_proxies(who, words, grid_pki, tmp_path):  # noqa: F811
    proc = openssl_verify(getattr(grid_pki, who).proxy, grid_pki.cert_dir, tmp_path)
    assert proc.returncode != 0 and words in (proc.stdout + proc.stderr)
