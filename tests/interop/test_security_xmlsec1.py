"""Interop with the `xmlsec1` command (Debian xmlsec1): vmgrid's WS-Security signatures verify with it, for a
certificate and for a proxy chain, RSA (rsa-sha256) and ECDSA P-256 (ecdsa-sha256, whose SignatureValue is the
XML DSig r || s form, not DER), and a tampered message does not."""
from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest
from lxml import etree

from security.pki import make_proxy, new_key
from security.wssec import ECDSA_SHA256, RSA_SHA256, WSU, sign_envelope
from tests.fixtures.pki import ECHO_NS, echo_envelope, grid_pki  # noqa: F401

WSA = "http://www.w3.org/2005/08/addressing"
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("xmlsec1") is None, reason="Debian package xmlsec1 is not installed")]


def _wsa():
    out = []
    for name, text in (("Action", f"{ECHO_NS}/Echo"), ("MessageID", f"urn:uuid:{uuid.uuid4()}"),
                       ("To", "https://localhost/echo")):
        el = etree.Element(f"{{{WSA}}}{name}", nsmap={"wsa": WSA})
        el.text = text
        out.append(el)
    return out


def xmlsec1_verify(data: bytes, signer_cert_pem: bytes, tmp_path) -> subprocess.CompletedProcess:
    msg = tmp_path / "signed.xml"
    msg.write_bytes(data)
    cert = tmp_path / "signer.pem"
    cert.write_bytes(signer_cert_pem)
    # xmlsec1 does not know wsu:Id: declare it for every element kind that vmgrid signs.
    ids = []
    for node in ("Body", f"{WSU}:Timestamp", f"{WSA}:Action", f"{WSA}:MessageID", f"{WSA}:To"):
        ids += ["--id-attr:Id", node]
    return subprocess.run(["xmlsec1", "--verify", *ids, "--pubkey-cert-pem", str(cert), str(msg)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def ec_credentials(grid_pki):  # noqa: F811
    """An ECDSA P-256 user, its proxy (P-256 too: the issuer's kind) and an ECDSA P-256 host, from the test CA."""
    user = grid_pki.ca.issue_user("xmlsec1-ec", key=new_key(kind="ec"))
    host = grid_pki.ca.issue_host("xmlsec1-ec.example", key=new_key(kind="ec"))
    return {"ec user certificate": user, "ec proxy": make_proxy(user, hours=1), "ec host": host}


WHO = ["user certificate", "proxy", "host", "ec user certificate", "ec proxy", "ec host"]


def _credential(who, grid_pki, ec_credentials):  # noqa: F811
    if who.startswith("ec "):
        return ec_credentials[who]
    return {"user certificate": grid_pki.alice.credential, "proxy": grid_pki.alice.proxy, "host": grid_pki.host}[who]


@pytest.mark.parametrize("who", WHO)
def test_xmlsec1_verifies_vmgrid_signatures(who, grid_pki, ec_credentials, tmp_path):  # noqa: F811
    cred = _credential(who, grid_pki, ec_credentials)
    data = sign_envelope(echo_envelope("for xmlsec1", _wsa()), cred)
    method = etree.fromstring(data).find(".//{http://www.w3.org/2000/09/xmldsig#}SignatureMethod").get("Algorithm")
    assert method == (ECDSA_SHA256 if who.startswith("ec ") else RSA_SHA256)
    proc = xmlsec1_verify(data, cred.cert_pem(with_chain=False), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "SignedInfo References (ok/all): 5/5" in proc.stderr


@pytest.mark.parametrize("who", ["proxy", "ec proxy"])
def test_xmlsec1_rejects_a_tampered_vmgrid_message(who, grid_pki, ec_credentials, tmp_path):  # noqa: F811
    cred = _credential(who, grid_pki, ec_credentials)
    data = sign_envelope(echo_envelope("original", _wsa()), cred)
    proc = xmlsec1_verify(data.replace(b">original<", b">tampered<"), cred.cert_pem(False), tmp_path)
    assert proc.returncode != 0


def test_vmgrid_verifies_an_ecdsa_signature_xmlsec1_computed(grid_pki, ec_credentials, tmp_path):  # noqa: F811
    """The other direction: xmlsec1 computes the digests and the ecdsa-sha256 SignatureValue (its own r || s
    encoding) of a vmgrid message whose values were blanked, and vmgrid's verifier accepts the result."""
    from security.wssec import DS, verify_envelope

    cred = ec_credentials["ec host"]
    root = etree.fromstring(sign_envelope(echo_envelope("signed by xmlsec1", _wsa()), cred))
    ours = root.find(f".//{{{DS}}}SignatureValue").text
    for el in root.iter(f"{{{DS}}}DigestValue", f"{{{DS}}}SignatureValue"):
        el.text = ""
    template = tmp_path / "template.xml"
    template.write_bytes(etree.tostring(root))
    key = tmp_path / "key.pem"
    key.write_bytes(cred.key_pem())
    ids = []
    for node in ("Body", f"{WSU}:Timestamp", f"{WSA}:Action", f"{WSA}:MessageID", f"{WSA}:To"):
        ids += ["--id-attr:Id", node]
    proc = subprocess.run(["xmlsec1", "--sign", *ids, "--privkey-pem", str(key), str(template)],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    signed = etree.fromstring(proc.stdout)
    value = signed.find(f".//{{{DS}}}SignatureValue").text
    assert value and value != ours                        # xmlsec1's own signature (ECDSA is randomized)
    caller, _ = verify_envelope(proc.stdout, grid_pki.trust(), expected_signer=cred.subject)
    assert caller.dn == cred.subject
