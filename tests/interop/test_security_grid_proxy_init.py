"""Interop with the Globus Toolkit (Debian globus-proxy-utils): `grid-proxy-init -rfc` makes a proxy from a
vmgrid-issued user certificate (finding the CA through the Globus X509_CERT_DIR layout and signing policy), and the
services accept calls signed with it; `grid-proxy-info` reads vmgrid's own proxies."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from security.client import grid_client
from security.pki import load_credential
from tests.fixtures.pki import grid_pki, secured_echo_server  # noqa: F401

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("grid-proxy-init") is None,
                                 reason="Debian package globus-proxy-utils is not installed")]


def globus_env(user, cert_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    env.update(user.env(cert_dir, proxy=False))
    return env


@pytest.mark.parametrize("limited", [False, True], ids=["full", "limited"])
def test_grid_proxy_init_proxy_is_accepted(limited, secured_echo_server, grid_pki, tmp_path):  # noqa: F811
    out = tmp_path / "x509up_globus"
    args = ["grid-proxy-init", "-rfc", "-hours", "1", "-out", str(out)] + (["-limited"] if limited else [])
    proc = subprocess.run(args, env=globus_env(grid_pki.alice, grid_pki.cert_dir), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proxy = load_credential(proxy=out)
    assert proxy.is_proxy and proxy.identity == grid_pki.alice.dn and proxy.limited == limited

    server = secured_echo_server()
    result = grid_client(server.wsdl_url, proxy, grid_pki.trust()).service.Echo(text="globus proxy")
    assert (result.caller, result.limited) == (grid_pki.alice.dn, limited)


def test_grid_proxy_info_reads_vmgrid_proxies(grid_pki):  # noqa: F811
    proc = subprocess.run(["grid-proxy-info", "-file", str(grid_pki.bob.proxy_path)],
                          env=globus_env(grid_pki.bob, grid_pki.cert_dir), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"identity : {grid_pki.bob.dn}" in proc.stdout
    assert "RFC 3820 compliant impersonation proxy" in proc.stdout


def test_grid_proxy_info_reads_an_ecdsa_proxy_of_vmgrids(grid_pki, tmp_path):  # noqa: F811
    """`vmgrid proxy-init --key-type ec` (or an EC user certificate) makes a P-256 proxy; its key written as "EC
    PRIVATE KEY" was unreadable to Globus ("Unhandled PEM sequence: EC PRIVATE KEY"): it is PKCS#8 now."""
    from security.pki import make_proxy, save_proxy

    path = save_proxy(make_proxy(grid_pki.bob.credential, kind="ec"), tmp_path / "ec-proxy.pem")
    assert b"-----BEGIN PRIVATE KEY-----" in path.read_bytes()
    proc = subprocess.run(["grid-proxy-info", "-file", str(path)], env=globus_env(grid_pki.bob, grid_pki.cert_dir),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"identity : {grid_pki.bob.dn}" in proc.stdout
    assert load_credential(proxy=path).identity == grid_pki.bob.dn          # and vmgrid reads it back


def test_grid_proxy_init_refuses_a_revoked_user(grid_pki, tmp_path):  # noqa: F811
    """The Globus tool reads the CRL vmgrid published in X509_CERT_DIR."""
    proc = subprocess.run(["grid-proxy-init", "-rfc", "-verify", "-out", str(tmp_path / "p")],
                          env=globus_env(grid_pki.revoked, grid_pki.cert_dir), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0


@pytest.mark.parametrize("form", [["-old"], ["-old", "-limited"], ["-draft"], ["-rfc", "-limited"]],
                         ids=["legacy", "legacy-limited", "draft", "rfc-limited"])
def test_proxy_info_and_me_name_a_globus_proxys_identity_as_the_services_do(form, secured_echo_server, grid_pki,
                                                                            tmp_path, capsys):  # noqa: F811
    """`vmgrid proxy-info` and `vmgrid authz ... me` take the identity of a grid-proxy-init proxy (legacy CN=proxy,
    GT3 draft, RFC 3820) by TrustStore's rule, so they agree with grid-proxy-info and with what a service sees.
    (A legacy proxy's identity was its own subject, .../CN=alice/CN=proxy, and its type "end entity credential".)"""
    from argparse import Namespace

    from client.cli import main as vmgrid
    from client.commands_authz import _me

    out = tmp_path / "x509up_globus"
    proc = subprocess.run(["grid-proxy-init", *form, "-hours", "1", "-out", str(out)],
                          env=globus_env(grid_pki.alice, grid_pki.cert_dir), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    globus = {}
    for option in ("-identity", "-type"):
        info = subprocess.run(["grid-proxy-info", "-file", str(out), option], env=globus_env(grid_pki.alice,
                              grid_pki.cert_dir), capture_output=True, text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        globus[option] = info.stdout.strip()
    assert globus["-identity"] == grid_pki.alice.dn
    for option in ("-identity", "-type"):
        capsys.readouterr()
        assert vmgrid(["proxy-info", "-file", str(out), option]) == 0
        assert capsys.readouterr().out.strip() == globus[option]

    proxy = load_credential(proxy=out)
    assert _me(Namespace(proxy=str(out)), "me") == grid_pki.alice.dn == proxy.identity
    assert proxy.is_proxy and proxy.limited == ("-limited" in form)
    server = secured_echo_server()
    result = grid_client(server.wsdl_url, proxy, grid_pki.trust()).service.Echo(text="globus proxy")
    assert (result.caller, result.limited) == (proxy.identity, proxy.limited)
