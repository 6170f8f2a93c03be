"""`vmgrid ca ...`, `vmgrid proxy-init` and `vmgrid proxy-info`, run through the real `vmgrid` entry point."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cryptography.hazmat.primitives.serialization import Encoding

from security.pki import load_credential, proxy_cert_info
from security.trust import RevokedCertificate, TrustStore


VMGRID = Path(sys.executable).with_name("vmgrid")     # the installed entry point


def vmgrid(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(VMGRID), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def ca_env(tmp_path) -> dict:
    env = {"VMGRID_CA_DIR": str(tmp_path / "ca"), "HOME": str(tmp_path / "home"),
           "X509_USER_PROXY": str(tmp_path / "x509up")}
    for k in ("X509_USER_CERT", "X509_USER_KEY", "X509_CERT_DIR"):
        env[k] = ""
    vmgrid("ca", "init", "--dn", "/O=Grid/OU=cli/CN=CLI CA", env=env)
    return env


def test_ca_issues_host_and_user_certificates_in_globus_layout(ca_env, tmp_path):
    out = vmgrid("ca", "host", "node1.example.org", "--ou", "site", env=ca_env).stdout
    assert "/O=Grid/OU=site/CN=host/node1.example.org" in out
    host_key = tmp_path / "ca" / "hosts" / "node1.example.org" / "hostkey.pem"
    assert stat.S_IMODE(host_key.stat().st_mode) == 0o600
    vmgrid("ca", "user", "carol", env=ca_env)
    globus = tmp_path / "home" / ".globus"
    assert load_credential(globus / "usercert.pem", globus / "userkey.pem").subject == "/O=Grid/OU=vmgrid/CN=carol"
    again = vmgrid("ca", "user", "carol", env=ca_env, check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    listing = vmgrid("ca", "list", env=ca_env).stdout
    assert "CN=carol" in listing and "CN=host/node1.example.org" in listing


def test_proxy_init_and_proxy_info(ca_env, tmp_path):
    vmgrid("ca", "user", "dora", env=ca_env)
    out = vmgrid("proxy-init", "-valid", "01:30", "-limited", "-rfc", env=ca_env).stdout
    assert "Your identity: /O=Grid/OU=vmgrid/CN=dora" in out
    proxy_path = Path(ca_env["X509_USER_PROXY"])
    assert stat.S_IMODE(proxy_path.stat().st_mode) == 0o600
    proxy = load_credential(proxy=proxy_path)
    assert proxy.limited and proxy_cert_info(proxy.certificate)[1]
    assert 5300 < proxy.time_left().total_seconds() <= 5400
    info = vmgrid("proxy-info", env=ca_env).stdout
    assert "identity : /O=Grid/OU=vmgrid/CN=dora" in info and "limited proxy" in info
    assert vmgrid("proxy-info", "-identity", env=ca_env).stdout.strip() == "/O=Grid/OU=vmgrid/CN=dora"
    assert vmgrid("proxy-info", "-exists", "-valid", "1:00", env=ca_env, check=False).returncode == 0
    assert vmgrid("proxy-info", "-exists", "-hours", "2", env=ca_env, check=False).returncode == 1
    # a proxy of the proxy
    second = tmp_path / "second"
    vmgrid("proxy-init", "-proxy-of", str(proxy_path), "-out", str(second), "-hours", "0.5", env=ca_env)
    assert load_credential(proxy=second).chain[0] == proxy.certificate


def test_revoke_and_crl(ca_env, tmp_path):
    vmgrid("ca", "user", "ed", env=ca_env)
    cert = tmp_path / "home" / ".globus" / "usercert.pem"
    user = load_credential(cert, cert.with_name("userkey.pem"))
    trust = TrustStore(tmp_path / "ca" / "certificates", recheck_seconds=0)
    assert trust.validate(user.certificates).dn == user.subject
    out = vmgrid("ca", "revoke", str(cert), env=ca_env).stdout
    assert "revoked /O=Grid/OU=vmgrid/CN=ed" in out
    with pytest.raises(RevokedCertificate):
        trust.validate(user.certificates)
    assert "1 revoked" in vmgrid("ca", "crl", "--days", "7", env=ca_env).stdout
    bad = vmgrid("ca", "revoke", "not-a-serial", env=ca_env, check=False)
    assert bad.returncode == 1 and "hexadecimal" in bad.stderr


def test_revoking_a_file_that_is_no_certificate_or_twice_says_so(ca_env, tmp_path):
    (tmp_path / "hostname").write_text("node1\n")
    bad = vmgrid("ca", "revoke", str(tmp_path / "hostname"), env=ca_env, check=False)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == (f"vmgrid: {tmp_path / 'hostname'} holds no certificate (PEM or DER): name a certificate file "
                          f"(usercert.pem, hostcert.pem) or give its serial number (`vmgrid ca list` shows them)\n")
    vmgrid("ca", "user", "fay", "--out", str(tmp_path / "fay"), env=ca_env)
    cert = tmp_path / "fay" / "usercert.pem"
    der = tmp_path / "fay.der"                              # a DER certificate is read too
    der.write_bytes(load_credential(cert, cert.with_name("userkey.pem")).certificate.public_bytes(Encoding.DER))
    assert vmgrid("ca", "revoke", str(der), env=ca_env).stdout.startswith("revoked /O=Grid/OU=vmgrid/CN=fay (serial ")
    again = vmgrid("ca", "revoke", str(cert), env=ca_env).stdout
    assert "/O=Grid/OU=vmgrid/CN=fay (serial " in again and " was already revoked at " in again, again
    assert not again.startswith("revoked")


@pytest.mark.parametrize("args", [["ca", "crl", "--days", "0"], ["ca", "crl", "--days", "-1"],
                                  ["ca", "crl", "--days", "1.5"], ["ca", "user", "gus", "--days", "0"],
                                  ["ca", "host", "gus.example.org", "--days", "-3"]])
def test_a_validity_of_no_days_is_refused_not_taken_as_the_default(ca_env, tmp_path, args):
    crl = tmp_path / "ca" / "crl.pem"
    before = crl.read_bytes()
    proc = vmgrid(*args, env=ca_env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"argument --days: '{args[-1]}' is not a number of days more than 0" in proc.stderr, proc.stderr
    assert crl.read_bytes() == before and "gus" not in vmgrid("ca", "list", env=ca_env).stdout


def test_files_that_cannot_be_read_or_written_and_weak_keys_are_one_line(ca_env, tmp_path):
    listed = vmgrid("ca", "list", env=ca_env).stdout
    for args, message in (
            (["ca", "user", "hal", "--out", "/proc/hal"], "cannot write /proc/hal: No such file or directory"),
            (["ca", "host", "hal", "--out", "/proc/hal"], "cannot write /proc/hal: No such file or directory"),
            (["ca", "user", "hal", "--out", str(tmp_path / "hal"), "--passphrase-file", str(tmp_path / "nosuch")],
             f"cannot read the passphrase file {tmp_path / 'nosuch'}: No such file or directory"),
            (["ca", "init", "--dir", "/proc/ca"], "cannot write /proc/ca: No such file or directory")):
        proc = vmgrid(*args, env=ca_env, check=False)
        assert proc.returncode == 1 and proc.stderr == f"vmgrid: {message}\n", proc.stderr
    assert vmgrid("ca", "list", env=ca_env).stdout == listed          # nothing issued for lost files
    vmgrid("ca", "user", "ida", "--out", str(tmp_path / "ida"), env=ca_env)
    cert = ["-cert", str(tmp_path / "ida" / "usercert.pem"), "-key", str(tmp_path / "ida" / "userkey.pem"),
            "-out", str(tmp_path / "p.pem")]
    for extra, message in ((["-bits", "512"], "an RSA key of 512 bits: give 2048 to 16384 (weaker keys are refused)"),
                           (["-path-length", "-2"],
                            "a proxy path length is 0 or more (how many proxies it may sign), not -2")):
        proc = vmgrid("proxy-init", *cert, *extra, env=ca_env, check=False)
        assert proc.returncode == 1 and proc.stderr == f"vmgrid: {message}\n", proc.stderr
    assert not (tmp_path / "p.pem").exists()


def test_errors_are_reported_without_tracebacks(tmp_path):
    env = {"VMGRID_CA_DIR": str(tmp_path / "none"), "HOME": str(tmp_path), "X509_USER_PROXY": str(tmp_path / "p"),
           "X509_USER_CERT": "", "X509_USER_KEY": ""}
    proc = vmgrid("ca", "host", "x", env=env, check=False)
    assert proc.returncode == 1 and "no grid CA" in proc.stderr and "Traceback" not in proc.stderr
    proc = vmgrid("proxy-init", env=env, check=False)
    assert proc.returncode == 1 and "no user certificate to make a proxy from" in proc.stderr
    proc = vmgrid("proxy-info", env=env, check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr


@pytest.mark.parametrize("name", ["x/CN=host/localhost", "a=b", "tab\there", "new\nline", "bell\x07", "back\\slash",
                                  " padded", "zero\u200bwidth"])
def test_ca_refuses_user_names_that_could_read_as_another_name(ca_env, tmp_path, name):
    proc = vmgrid("ca", "user", name, "--out", str(tmp_path / "u"), env=ca_env, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("vmgrid: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "u" / "usercert.pem").exists()


def test_ca_refuses_host_names_that_are_not_dns_names(ca_env, tmp_path):
    for name in ("evil/CN=alice", "a b", "x=y"):
        proc = vmgrid("ca", "host", name, "--out", str(tmp_path / "h"), env=ca_env, check=False)
        assert proc.returncode == 1 and proc.stderr.startswith("vmgrid: ") and "Traceback" not in proc.stderr
    assert vmgrid("ca", "host", "10.0.0.7", "--out", str(tmp_path / "ip"), env=ca_env).returncode == 0


def test_ec_credentials_from_the_cli_sign_messages(ca_env, tmp_path):
    """`vmgrid ca user --key ec` then `vmgrid proxy-init`: an ECDSA P-256 certificate and proxy, which sign a
    message the verifier accepts (ecdsa-sha256)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from security.trust import TrustStore
    from security.wssec import sign_envelope, verify_envelope
    from tests.fixtures.pki import echo_envelope

    vmgrid("ca", "user", "ellie", "--key", "ec", env=ca_env)
    globus = tmp_path / "home" / ".globus"
    assert isinstance(load_credential(globus / "usercert.pem", globus / "userkey.pem").private_key,
                      ec.EllipticCurvePrivateKey)
    vmgrid("proxy-init", "-q", env=ca_env)
    proxy = load_credential(proxy=ca_env["X509_USER_PROXY"])
    assert isinstance(proxy.private_key, ec.EllipticCurvePrivateKey)
    caller, _ = verify_envelope(sign_envelope(echo_envelope("ec"), proxy), TrustStore(tmp_path / "ca" / "certificates"))
    assert caller.dn == "/O=Grid/OU=vmgrid/CN=ellie"
    vmgrid("ca", "host", "h1", "--key", "ec", env=ca_env)
    host_dir = tmp_path / "ca" / "hosts" / "h1"
    assert isinstance(load_credential(host_dir / "hostcert.pem", host_dir / "hostkey.pem").private_key,
                      ec.EllipticCurvePrivateKey)
    bad = vmgrid("ca", "host", "h2", "--key", "dsa", env=ca_env, check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_proxy_init_does_not_make_missing_folders_and_names_a_folder_given_as_the_file(ca_env, tmp_path):
    """grid-proxy-init refuses an -out in a folder that is not there ("is not a valid directory"); so does vmgrid,
    before asking for a passphrase, and a folder named as the proxy file is one clear line, not a traceback."""
    vmgrid("ca", "user", "carol", env=ca_env)
    missing = tmp_path / "no" / "such" / "proxy.pem"
    for out, message in (
            (missing, f"vmgrid: no directory {missing.parent} to write the proxy in (-out {missing}): proxy-init "
                      f"does not make it (nor does grid-proxy-init); mkdir it or name another file\n"),
            (tmp_path, f"vmgrid: {tmp_path} (-out) is a directory: name the proxy file, e.g. "
                       f"{tmp_path / 'proxy.pem'}\n"),
            (tmp_path / "x509up" / "p", f"vmgrid: {tmp_path / 'x509up'} is a file, not a directory to write the proxy "
                                        f"in (-out {tmp_path / 'x509up' / 'p'})\n")):
        if out.parent.name == "x509up":
            vmgrid("proxy-init", "-q", env=ca_env)
        proc = vmgrid("proxy-init", "-out", str(out), env=ca_env, check=False)
        assert proc.returncode == 1 and proc.stderr == message, proc.stderr
    assert not (tmp_path / "no").exists()
    env = {**ca_env, "X509_USER_PROXY": str(missing)}          # the default path, from the environment, likewise
    proc = vmgrid("proxy-init", env=env, check=False)
    assert proc.returncode == 1 and f"(X509_USER_PROXY {missing})" in proc.stderr and not (tmp_path / "no").exists()


def test_proxy_init_warns_when_what_signs_it_expires_within_the_requested_lifetime(ca_env, tmp_path):
    """A proxy never outlives its issuer: one asked for longer than the certificate lives is cut to it, and
    vmgrid says so on standard error as grid-proxy-init does ("... will expire ... within the requested lifetime")."""
    vmgrid("ca", "user", "carol", "--days", "2", env=ca_env)
    long = vmgrid("proxy-init", "-hours", "72", env=ca_env)
    assert long.stderr.startswith("vmgrid: warning: your certificate and this proxy expire ") and \
        long.stderr.rstrip().endswith(", within the requested lifetime of the proxy"), long.stderr
    assert load_credential(proxy=tmp_path / "x509up").time_left().total_seconds() < 48 * 3600
    short = vmgrid("proxy-init", "-hours", "12", env=ca_env)
    assert short.stderr == ""


def test_proxy_init_without_a_user_certificate_says_how_to_give_one_not_to_run_proxy_init(ca_env, tmp_path):
    """A newcomer's first `vmgrid proxy-init` with no certificate anywhere: the general "no grid credential: run
    `vmgrid proxy-init`" would send them in a circle; proxy-init names its options and the places it looks."""
    proc = vmgrid("proxy-init", env=ca_env, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("vmgrid: no user certificate to make a proxy from: give -cert FILE -key FILE"), \
        proc.stderr
    assert "run `vmgrid proxy-init`" not in proc.stderr and "Traceback" not in proc.stderr
    assert not Path(ca_env["X509_USER_PROXY"]).exists()


@pytest.mark.parametrize("command", [
    ["vm", "list", "--url", "https://127.0.0.1:9/wsrf/services/VMManagerService"],
    ["repo", "query", "ram >= 1", "--url", "https://127.0.0.1:9/wsrf/services/VMRepositoryService"],
    ["job", "list", "https://127.0.0.1:9/wsrf/services/JobService"],
])
def test_a_missing_trusted_ca_directory_is_one_line_naming_how_to_give_it(ca_env, tmp_path, command):
    """X509_CERT_DIR not exported (or mistyped): a client command says which directory is missing and how to name
    the right one, before any connection, instead of a traceback of security.trust.UntrustedChain."""
    vmgrid("ca", "user", "erin", env=ca_env)
    vmgrid("proxy-init", "-q", env=ca_env)
    missing = tmp_path / "no-such-certificates"
    proc = vmgrid(*command, env={**ca_env, "X509_CERT_DIR": str(missing)}, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"vmgrid: trusted CA directory {missing} does not exist: give your grid's CA certificates "
                           f"with --cert-dir DIR or `export X509_CERT_DIR=DIR`\n"), proc.stderr


def test_a_certificate_named_as_the_proxy_is_called_what_it_is_not_a_key_to_chmod(ca_env, tmp_path):
    """X509_USER_PROXY pointing at usercert.pem (0644, no key): the message was "private key ... is readable by
    others; chmod 600 it", which leads nowhere; it says the file holds no key and how to make a proxy."""
    vmgrid("ca", "user", "fred", "--out", str(tmp_path / "fred"), env=ca_env)
    cert = tmp_path / "fred" / "usercert.pem"
    assert stat.S_IMODE(cert.stat().st_mode) & 0o044
    proc = vmgrid("proxy-info", env={**ca_env, "X509_USER_PROXY": str(cert)}, check=False)
    assert proc.returncode == 1 and proc.stderr == (
        f"vmgrid: proxy file {cert} holds no private key (a certificate alone is not a proxy: make one with "
        f"`vmgrid proxy-init`)\n"), proc.stderr


def test_a_ca_named_badly_leaves_no_directory_and_a_file_named_as_the_ca_is_one_line(tmp_path):
    env = {"HOME": str(tmp_path), "VMGRID_CA_DIR": ""}
    for dn in ("bad", "/O=Grid/X=y"):
        proc = vmgrid("ca", "init", "--dir", str(tmp_path / "ca"), "--dn", dn, env=env, check=False)
        assert proc.returncode == 1 and proc.stderr.startswith("vmgrid: ") and proc.stderr.count("\n") == 1
        assert not (tmp_path / "ca").exists()
    (tmp_path / "afile").write_text("x")
    proc = vmgrid("ca", "list", "--dir", str(tmp_path / "afile"), env=env, check=False)
    assert proc.returncode == 1 and proc.stderr == (f"vmgrid: no grid CA in {tmp_path / 'afile'} (run `vmgrid ca init "
                                                    f"--dir {tmp_path / 'afile'}`)\n")
