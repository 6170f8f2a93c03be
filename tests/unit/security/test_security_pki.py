"""Grid PKI: the CA, host and user certificates, proxies, the Globus file layout and credential discovery."""
from __future__ import annotations

import copy
import datetime as dt
import os
import stat
import subprocess

import pytest
from cryptography import x509

from security.pki import (OID_INHERIT_ALL, OID_LIMITED, CAError, CredentialError, GridCA, ProxyCertInfo,
                          default_proxy_path, dn_string, load_credential, load_host_credential, load_user_credential,
                          make_proxy, parse_dn, proxy_cert_info, save_proxy, subject_hash)


def test_dn_round_trip_keeps_slashes_inside_values():
    name = parse_dn("/O=Grid/OU=vmgrid/CN=host/node1.example.org")
    assert [a.value for a in name] == ["Grid", "vmgrid", "host/node1.example.org"]
    assert dn_string(name) == "/O=Grid/OU=vmgrid/CN=host/node1.example.org"
    with pytest.raises(ValueError):
        parse_dn("O=Grid")
    with pytest.raises(ValueError):
        parse_dn("/XX=what")


def test_host_certificate_has_grid_subject_and_tls_names(grid_pki):
    host = grid_pki.host
    assert host.subject == "/O=Grid/OU=vmgrid/CN=host/localhost"
    sans = host.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    other = grid_pki.issue_host("node7.example.org", ou="site2")
    assert other.subject == "/O=Grid/OU=site2/CN=host/node7.example.org"
    assert other.cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_private_keys_are_written_0600(grid_pki):
    for path in (grid_pki.host_key_path, grid_pki.alice.key_path, grid_pki.alice.proxy_path,
                 grid_pki.ca_dir / "ca.key"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_trusted_ca_directory_has_globus_layout(grid_pki):
    stem = subject_hash(grid_pki.ca.certificate)
    openssl_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(grid_pki.ca_dir / "ca.pem")],
                                  capture_output=True, text=True, check=True).stdout.strip()
    assert stem == openssl_hash
    names = {p.name for p in grid_pki.cert_dir.iterdir()}
    assert {f"{stem}.0", f"{stem}.r0", f"{stem}.signing_policy"} <= names
    policy = (grid_pki.cert_dir / f"{stem}.signing_policy").read_text()
    assert "access_id_CA X509 '/O=Grid/OU=vmgrid/CN=vmgrid Test CA'" in policy
    assert "pos_rights globus CA:sign" in policy
    assert "cond_subjects globus '\"/O=Grid/*\"'" in policy
    crl = x509.load_pem_x509_crl((grid_pki.cert_dir / f"{stem}.r0").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(grid_pki.revoked.credential.certificate.serial_number)
    assert crl.get_revoked_certificate_by_serial_number(grid_pki.alice.credential.certificate.serial_number) is None


def test_ca_refuses_to_overwrite_and_reloads(grid_pki, tmp_path):
    with pytest.raises(CAError):
        GridCA.create(grid_pki.ca_dir)
    again = GridCA.load(grid_pki.ca_dir)
    assert again.dn == grid_pki.ca.dn
    assert any(r.subject == grid_pki.alice.dn for r in again.issued)
    with pytest.raises(CAError):
        GridCA.load(tmp_path / "nothing")


def test_revoke_republishes_to_every_published_directory(tmp_path):
    extra = tmp_path / "etc-certificates"
    ca = GridCA.create(tmp_path / "ca", publish_to=extra)
    user = ca.issue_user("dave")
    ca.revoke(user.certificate)
    for d in (ca.cert_dir, extra):
        crl = x509.load_pem_x509_crl((d / f"{subject_hash(ca.certificate)}.r0").read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(user.certificate.serial_number) is not None
    with pytest.raises(CAError):
        ca.revoke(12345)


def test_proxy_certificate_is_rfc3820(grid_pki):
    alice = grid_pki.alice
    proxy = alice.proxy
    info, critical = proxy_cert_info(proxy.certificate)
    assert critical and info.policy_language == OID_INHERIT_ALL.dotted_string and not info.limited
    rdns = list(proxy.certificate.subject.rdns)
    assert rdns[:-1] == list(alice.credential.certificate.subject.rdns)
    assert proxy.certificate.issuer == alice.credential.certificate.subject
    assert proxy.identity == alice.dn and proxy.is_proxy and not alice.credential.is_proxy


def test_proxy_of_proxy_and_limited_propagation(grid_pki):
    first = make_proxy(grid_pki.bob.credential, hours=2, limited=True, key=grid_pki.keys.take())
    second = make_proxy(first, hours=1, key=grid_pki.keys.take())
    assert second.limited, "a proxy of a limited proxy is limited"
    assert proxy_cert_info(second.certificate)[0].policy_language == OID_LIMITED.dotted_string
    assert second.chain == (first.certificate, grid_pki.bob.credential.certificate)
    assert second.identity == grid_pki.bob.dn


def test_proxy_lifetime_never_exceeds_issuer(grid_pki):
    short = make_proxy(grid_pki.bob.credential, hours=0.5, key=grid_pki.keys.take())
    longer = make_proxy(short, hours=10, key=grid_pki.keys.take())
    assert longer.certificate.not_valid_after_utc <= short.certificate.not_valid_after_utc
    left = short.time_left()
    assert dt.timedelta(minutes=29) < left <= dt.timedelta(minutes=30)
    with pytest.raises(CredentialError):
        make_proxy(grid_pki.bob.credential, hours=0)


def test_proxy_cert_info_der_round_trip():
    for info in (ProxyCertInfo(OID_INHERIT_ALL.dotted_string), ProxyCertInfo(OID_LIMITED.dotted_string, 3),
                 ProxyCertInfo("1.3.6.1.5.5.7.21.2", 0, b"policy")):
        assert ProxyCertInfo.from_der(info.to_der()) == info
    with pytest.raises(ValueError):
        ProxyCertInfo.from_der(b"\x30\x03\x02\x01\x01")


def test_load_credential_from_globus_conventions(grid_pki, tmp_path):
    alice = grid_pki.alice
    env = alice.env(grid_pki.cert_dir)
    assert load_user_credential(env=env).subject == alice.proxy.subject            # X509_USER_PROXY first
    env.pop("X509_USER_PROXY")
    assert str(default_proxy_path(env)) == f"/tmp/x509up_u{os.getuid()}"
    if not default_proxy_path(env).exists():
        assert load_user_credential(env=env).subject == alice.dn                   # X509_USER_CERT/KEY next
    home_only = {"HOME": str(alice.home)}
    cred = load_user_credential(env=home_only, allow_proxy=False)                   # ~/.globus/usercert.pem
    assert cred.subject == alice.dn and cred.cert_path == alice.cert_path
    host = load_host_credential(grid_pki.host_cert_path, grid_pki.host_key_path)
    assert host.subject == grid_pki.host_dn
    with pytest.raises(CredentialError, match="no grid credential"):
        load_user_credential(env={"HOME": str(tmp_path)}, allow_proxy=False)


def test_proxy_file_round_trip_and_key_checks(grid_pki, tmp_path):
    # a copy: save_proxy points the credential at its file, and this test's file goes when the test passes
    path = save_proxy(copy.copy(grid_pki.bob.proxy), tmp_path / "x509up_test")
    loaded = load_credential(proxy=path)
    assert loaded.certificates == grid_pki.bob.proxy.certificates
    os.chmod(path, 0o644)
    with pytest.raises(CredentialError, match="readable by others"):
        load_credential(proxy=path)
    with pytest.raises(CredentialError, match="does not belong"):
        load_credential(grid_pki.alice.cert_path, grid_pki.bob.key_path)
    with pytest.raises(CredentialError, match="does not exist"):
        load_credential(proxy=tmp_path / "missing")


def test_a_key_whose_parts_disagree_is_refused(grid_pki, tmp_path):
    """OpenSSL's full RSA key check (88 ms) is skipped at load; a key that cannot make a valid signature is still
    refused, with the key file named."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from security.pki import write_private

    n = grid_pki.alice.credential.private_key.private_numbers()
    broken = rsa.RSAPrivateNumbers(n.p, n.q, n.d + 2, n.dmp1 + 2, n.dmq1, n.iqmp, n.public_numbers)
    key_path = write_private(tmp_path / "userkey.pem", broken.private_key(unsafe_skip_rsa_key_validation=True)
                             .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    with pytest.raises(CredentialError, match="userkey.pem"):
        load_credential(grid_pki.alice.cert_path, key_path)
    assert load_credential(grid_pki.alice.cert_path, grid_pki.alice.key_path).subject == grid_pki.alice.dn


def test_encrypted_user_key_needs_its_passphrase(grid_pki, tmp_path):
    cred = grid_pki.ca.issue_user("erin", key=grid_pki.keys.take(), out_dir=tmp_path, passphrase=b"s3cret")
    with pytest.raises(CredentialError, match="passphrase"):
        load_credential(cred.cert_path, cred.key_path)
    assert load_credential(cred.cert_path, cred.key_path, passphrase=b"s3cret").subject == cred.subject


def test_dn_string_of_a_foreign_name_never_reads_as_another_name():
    """A CA other than ours may put '/CN=host/...' or control characters inside one value; the one-line form
    escapes them, so the string never equals a host's DN and reads back as the same name."""
    from cryptography.x509.oid import NameOID

    def name(*values):
        oids = (NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME)
        return x509.Name([x509.NameAttribute(o, v) for o, v in zip(oids, values)])

    forged = name("Grid", "vmgrid", "x/CN=host/localhost")
    genuine = parse_dn("/O=Grid/OU=vmgrid/CN=x/CN=host/localhost")
    assert dn_string(forged) != dn_string(genuine)
    for n in (forged, genuine, name("Grid", "vm\\grid", "new\nline\x00"), name("Grid", "a\\", "host/localhost")):
        assert parse_dn(dn_string(n)) == n
        assert all(c.isprintable() for c in dn_string(n))


def test_ca_refuses_names_with_separators_or_control_characters(grid_pki):
    for bad in ("x/CN=host/localhost", "a=b", "line\nbreak", "bell\x07", "back\\slash", ""):
        with pytest.raises(CAError):
            grid_pki.ca.issue_user(bad)
    with pytest.raises(CAError):
        grid_pki.ca.issue_user("alice", ou="vmgrid/CN=host")
    with pytest.raises(CAError):
        grid_pki.ca.issue_host("localhost/CN=alice")
    with pytest.raises(CAError):
        grid_pki.ca.issue_host("node1.example.org", alt_names=["bad name"])
