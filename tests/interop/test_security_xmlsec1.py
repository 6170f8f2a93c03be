"""Interop with the `xmlsec1` command (Debian xmlsec1): vmgrid's WS-Security signatures verify with it, for a
certificate and for a proxy chain, and a tampered message does not."""
from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest
from lxml import etree

from security.wssec import WSU, sign_envelope
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


@pytest.mark.parametrize("who", ["user certificate", "proxy", "host"])
def test_xmlsec1_verifies_vmgrid_signatures(who, grid_pki, tmp_path):  # noqa: F811
    cred = {"user certificate": grid_pki.alice.credential, "proxy": grid_pki.alice.proxy,
            "host": grid_pki.host}[who]
    data = sign_envelope(echo_envelope("for xmlsec1", _wsa()), cred)
    proc = xmlsec1_verify(data, cred.cert_pem(with_chain=False), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "SignedInfo References (ok/all): 5/5" in proc.stderr


def test_xmlsec1_rejects_a_tampered_vmgrid_message(grid_pki, tmp_path):  # noqa: F811
    data = sign_envelope(echo_envelope("original", _wsa()), grid_pki.alice.proxy)
    proc = xmlsec1_verify(data.replace(b">original<", b">tampered<"), grid_pki.alice.proxy.cert_pem(False), tmp_path)
    assert proc.returncode != 0
