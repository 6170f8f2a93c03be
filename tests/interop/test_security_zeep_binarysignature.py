"""Interop with zeep's own WS-Security (python-xmlsec): a request signed by zeep's `BinarySignature` (RSA-SHA256,
SHA-256, with a Timestamp) is accepted by vmgrid's middleware, and zeep's xmlsec-based verifier accepts vmgrid's
signed response."""
from __future__ import annotations

import datetime as dt

import pytest
import zeep
from zeep.wsse.signature import BinarySignature
from zeep.wsse.signature import verify_envelope as zeep_verify_envelope
from zeep.wsse.utils import WSU, get_security_header, get_timestamp

from security.tls import grid_session
from tests.fixtures.pki import ECHO_WSDL, grid_pki, secured_echo_server  # noqa: F401

xmlsec = pytest.importorskip("xmlsec", reason="python-xmlsec (PyPI xmlsec==1.3.17) is zeep's signing backend")
pytestmark = pytest.mark.interop


class ZeepTimestampThenBinarySignature:
    """zeep's pieces only: a wsu:Timestamp (zeep.wsse.utils), then zeep's BinarySignature signs Body and Timestamp.
    Responses are checked with zeep's own xmlsec verifier against the host certificate."""

    def __init__(self, key_file, cert_file, host_cert_file):
        self.signature = BinarySignature(key_file, cert_file, signature_method=xmlsec.Transform.RSA_SHA256,
                                         digest_method=xmlsec.Transform.SHA256)
        self.host_cert_file = host_cert_file

    def apply(self, envelope, headers):
        now = dt.datetime.now(dt.timezone.utc)
        security = get_security_header(envelope)
        security.append(WSU.Timestamp(WSU.Created(get_timestamp(now, zulu_timestamp=True)),
                                      WSU.Expires(get_timestamp(now + dt.timedelta(minutes=5), zulu_timestamp=True))))
        return self.signature.apply(envelope, headers)

    def verify(self, envelope):
        zeep_verify_envelope(envelope, self.host_cert_file)
        return envelope


def test_zeep_binary_signature_request_is_accepted(secured_echo_server, grid_pki, tmp_path):  # noqa: F811
    server = secured_echo_server()
    # The test WSDL without WS-Addressing: zeep's BinarySignature signs only the Body and the Timestamp.
    wsdl = tmp_path / "echo.wsdl"
    wsdl.write_text(ECHO_WSDL.replace(' wsaw:Action="urn:vmgrid:test:echo/Echo"', "").replace("ADDRESS", server.url))
    host_cert = tmp_path / "host.pem"
    host_cert.write_bytes(grid_pki.host.cert_pem(with_chain=False))
    alice = grid_pki.alice
    wsse = ZeepTimestampThenBinarySignature(str(alice.key_path), str(alice.cert_path), str(host_cert))
    client = zeep.Client(str(wsdl), wsse=wsse,
                         transport=zeep.Transport(session=grid_session(grid_pki.cert_dir)))
    result = client.service.Echo(text="from zeep")
    assert (result.text, result.caller) == ("from zeep", alice.dn)
    assert server.app.calls == [(alice.dn, "from zeep")]


def test_zeep_binary_signature_with_rsa_sha1_is_refused(secured_echo_server, grid_pki, tmp_path):  # noqa: F811
    """zeep's default algorithm (RSA-SHA1) is not accepted: the fault says why."""
    server = secured_echo_server()
    wsdl = tmp_path / "echo.wsdl"
    wsdl.write_text(ECHO_WSDL.replace(' wsaw:Action="urn:vmgrid:test:echo/Echo"', "").replace("ADDRESS", server.url))
    alice = grid_pki.alice
    wsse = ZeepTimestampThenBinarySignature(str(alice.key_path), str(alice.cert_path), str(grid_pki.host_cert_path))
    wsse.signature = BinarySignature(str(alice.key_path), str(alice.cert_path))
    client = zeep.Client(str(wsdl), wsse=wsse, transport=zeep.Transport(session=grid_session(grid_pki.cert_dir)))
    with pytest.raises(zeep.exceptions.Fault) as info:
        client.service.Echo(text="sha1")
    # the refusal names what was refused and what to use instead
    assert "InvalidSecurity" in info.value.code
    assert "RSA-SHA1" in info.value.message and "RSA-SHA256" in info.value.message
    assert server.app.calls == []
