"""The SoapUI project (wsdl/soapui/vmgrid-soapui-project.xml): written by its generator from the WSDLs, a
request for every operation of the four interfaces whose Body validates against the published schemas,
and an outgoing WS-Security configuration vmgrid's verifier accepts."""
from __future__ import annotations

import subprocess
import sys

import pytest
from lxml import etree

from security import wssec
from services.container.contract import WSDL_DIR, Contract

PROJECT = WSDL_DIR / "soapui" / "vmgrid-soapui-project.xml"
CON = "http://eviware.com/soapui/config"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
VMM = "http://vmgrid.org/ns/vmmanager/1"
JOB = "http://vmgrid.org/ns/jobs/1"
INTERFACES = {"AuthorizationSoapBinding": "authz.wsdl", "VMRepositorySoapBinding": "vmrepository.wsdl",
              "VMManagerSoapBinding": "vmmanager.wsdl", "JobsSoapBinding": "jobs.wsdl"}
# the README site's ports: the central container, node1, the job service
PORTS = {"AuthorizationSoapBinding": 8443, "VMRepositorySoapBinding": 8443, "VMManagerSoapBinding": 8444,
         "JobsSoapBinding": 8446}


@pytest.fixture(scope="module")
def project() -> etree._Element:
    return etree.parse(str(PROJECT)).getroot()


def test_the_project_is_what_its_generator_writes_from_the_wsdls():
    out = subprocess.run([sys.executable, "wsdl/soapui/build_project.py"], capture_output=True, check=True,
                         cwd=WSDL_DIR.parent)
    assert out.stdout == PROJECT.read_bytes()


def test_the_regenerating_command_of_docs_soapui_runs_as_written(tmp_path):
    """In a copy of the checkout's wsdl/ (the command rewrites the project file) with the checkout's .venv."""
    import shutil

    doc = (WSDL_DIR.parent / "docs" / "soapui.md").read_text()
    [command] = [line.strip() for line in doc.splitlines() if "build_project.py >" in line]
    shutil.copytree(WSDL_DIR, tmp_path / "wsdl")
    (tmp_path / "wsdl" / "soapui" / "vmgrid-soapui-project.xml").write_bytes(b"stale")
    venv = WSDL_DIR.parent / ".venv"
    if not (venv / "bin" / "python").exists():
        pytest.skip("no .venv in this checkout (./run.sh setup makes it)")
    (tmp_path / ".venv").symlink_to(venv)
    subprocess.run(["bash", "-e", "-c", command], cwd=tmp_path, check=True, timeout=120,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert (tmp_path / "wsdl" / "soapui" / "vmgrid-soapui-project.xml").read_bytes() == PROJECT.read_bytes()


def test_every_operation_has_a_request_that_validates_against_the_published_schemas(project):
    names = {i.get("name") for i in project.iter(f"{{{CON}}}interface")}
    assert {n for n in names if n} >= set(INTERFACES)
    for iface in project.findall(f"{{{CON}}}interface"):
        contract = Contract(INTERFACES[iface.get("name")])
        ops = {op.get("name"): op for op in iface.findall(f"{{{CON}}}operation")}
        assert set(ops) == set(contract.operations), iface.get("name")
        for name, op in ops.items():
            call = op.find(f"{{{CON}}}call")
            assert call.get("outgoingWss") == "vmgrid-signature" and call.get("incomingWss") == "vmgrid-verify"
            env = etree.fromstring(call.findtext(f"{{{CON}}}request").encode())
            payload = env.find(f"{{{SOAP}}}Body")[0]
            assert payload.tag == contract.operations[name].input.text
            assert contract.validator.validate(payload), (name, contract.validator.error_log.last_error)
            headers = [h.tag for h in env.find(f"{{{SOAP}}}Header")]
            assert op.get("action") == contract.operations[name].soap_action
            if iface.get("name") == "VMManagerSoapBinding" and name not in ("Deploy", "ListInstances", "ListDomains", "AcceptMigration"):
                assert headers == [f"{{{VMM}}}InstanceKey"], name
            if iface.get("name") == "JobsSoapBinding" and name not in ("SubmitJob", "ListJobs", "GetServiceInfo", "GetLog"):
                assert headers == [f"{{{JOB}}}JobKey"], name
            assert call.findtext(f"{{{CON}}}endpoint").startswith(f"https://localhost:{PORTS[iface.get('name')]}/")
        assert iface.get("definition").startswith(f"https://localhost:{PORTS[iface.get('name')]}/")


def _setting(project, key: str) -> str:
    return project.find(f".//{{{CON}}}outgoing/{{{CON}}}entry[@type='Signature']//{key}").text


def test_the_outgoing_ws_security_is_what_vmgrid_accepts(project):
    assert wssec.SignatureMethod.RSA_SHA256.value == _setting(project, "signatureAlgorithm")
    assert _setting(project, "signatureAlgorithm") in wssec._SIGNATURE_METHODS
    assert _setting(project, "digestAlgorithm") in wssec._DIGESTS
    assert _setting(project, "signatureCanonicalization") == wssec.EXC_C14N
    assert _setting(project, "keyIdentifierType") == "1"       # WSS4J BST_DIRECT_REFERENCE: a BinarySecurityToken
    assert _setting(project, "useSingleCert") == "false"       # a proxy goes with its chain (X509PKIPathv1)
    parts = {(e.findtext("name"), e.findtext("namespace"))
             for e in project.iterfind(f".//{{{CON}}}outgoing//signatureParts/entry")}
    # the verifier wants every header block, the Timestamp and the Body signed
    assert {("Body", SOAP), ("Timestamp", wssec.WSU), ("InstanceKey", VMM), ("JobKey", JOB)} <= parts
    assert {n for n, ns in parts if ns == "http://www.w3.org/2005/08/addressing"} >= {"To", "Action", "MessageID"}
    ttl = int(project.find(f".//{{{CON}}}outgoing/{{{CON}}}entry[@type='Timestamp']//timeToLive").text)
    assert ttl <= wssec.DEFAULT_POLICY.max_age.total_seconds()


def test_the_keystore_commands_of_docs_soapui_run_as_written(grid_pki, tmp_path):
    import os
    import shutil

    if shutil.which("keytool") is None:
        pytest.skip("keytool (Debian openjdk) is not installed")
    doc = (WSDL_DIR.parent / "docs" / "soapui.md").read_text()
    commands = [line.strip() for line in doc.splitlines() if line.strip().startswith(("openssl pkcs12", "keytool "))]
    assert len(commands) == 2
    shutil.copy(grid_pki.alice.cert_path, tmp_path / "usercert.pem")
    shutil.copy(grid_pki.alice.key_path, tmp_path / "userkey.pem")
    env = {**os.environ, "X509_CERT_DIR": str(grid_pki.cert_dir)}
    for command in commands:
        subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    listing = subprocess.run(["keytool", "-list", "-keystore", "vmgrid-ca.jks", "-storepass", "changeit"],
                             cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "grid-ca" in listing and (tmp_path / "vmgrid-user.p12").stat().st_size > 0
