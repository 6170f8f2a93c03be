"""Interop with node-soap (npm `soap`, signing with its WSSecurityCert, verifying with xml-crypto): a JavaScript
client built from the WSDL a live grid serves runs ListVOs, QueryImages with criteria (word operators), a typed
fault, Deploy, GetResourceProperty (QName content), Pause/Resume and Destroy, and verifies every signed answer:
with alice's end-entity certificate, and with her proxy, which WSSecurityCert sends alone (refused, with what to
change) unless the client rewrites its token as the X509PKIPathv1 chain.

node-soap is installed once into var/node-soap (npm, cache under var/npm-cache), as the version below."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from lxml import etree

from security import wssec

from services.container.contract import Contract
from tests.interop.job_service import ECHO, LONG, UNKNOWN_KEY, check_job_steps

ROOT = Path(__file__).resolve().parents[2]
NODE_SOAP = "soap@1.13.0"
PREFIX = ROOT / "var" / "node-soap"
CLIENT = Path(__file__).parent / "node" / "vmgrid_client.js"
VMM = "http://vmgrid.org/ns/vmmanager/1"

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                 reason="Debian/nodesource package nodejs (node and npm) is not installed")]


def node_soap() -> Path:
    """var/node-soap/node_modules with node-soap installed (once; later runs find it)."""
    modules = PREFIX / "node_modules"
    stamp = PREFIX / ".installed"
    if stamp.exists() and stamp.read_text() == NODE_SOAP:
        return modules
    PREFIX.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(PREFIX),
                    "--cache", str(ROOT / "var" / "npm-cache"), NODE_SOAP],
                   check=True, capture_output=True, timeout=600)
    stamp.write_text(NODE_SOAP)
    return modules


def _deploy_xml(descriptor: etree._Element, identifier: str) -> str:
    deploy = etree.Element(f"{{{VMM}}}Deploy", nsmap={"vmm": VMM})
    deploy.append(descriptor)
    etree.SubElement(deploy, f"{{{VMM}}}identifier").text = identifier
    etree.SubElement(deploy, f"{{{VMM}}}lifetime").text = "600"
    etree.SubElement(deploy, f"{{{VMM}}}wait").text = "true"
    return etree.tostring(deploy).decode()


def run_node(modules: Path, config: dict, into: Path) -> tuple[dict, subprocess.CompletedProcess]:
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "NODE_PATH": str(modules), "NODE_EXTRA_CA_CERTS": config["caFile"]}
    run = subprocess.run(["node", str(CLIENT), str(into / "config.json")], capture_output=True, text=True,
                         env=env, timeout=300)
    return {s["step"]: s for s in map(json.loads, run.stdout.splitlines()) if s.get("step")}, run


def test_node_soap_runs_the_contract_signed_and_verifies_every_answer(vm_grid, tmp_path):
    modules = node_soap()
    pki = vm_grid.pki
    descriptor = vm_grid.register()
    ca_file = next(p for p in sorted(Path(pki.cert_dir).glob("*.0")))
    config = {
        "repoWsdl": vm_grid.repository_url + "?wsdl",
        "vmmWsdl": vm_grid.node_url() + "?wsdl",
        # node-soap sends one certificate: sign with alice's end-entity certificate, not her proxy
        "cert": str(pki.alice.cert_path), "key": str(pki.alice.key_path),
        "caFile": str(ca_file), "hostCN": "host/localhost",
        "deployXml": _deploy_xml(descriptor, "node-soap-1"),
        "unknownImage": "img-0000000000000000",
        # WS-Addressing: the signed wsa:To of each service and the wsa:Action (soapAction) of each operation
        "repoUrl": vm_grid.repository_url, "vmmUrl": vm_grid.node_url(),
        "actions": {op.name: op.soap_action for wsdl in ("vmrepository.wsdl", "vmmanager.wsdl")
                    for op in Contract(wsdl).operations.values()},
        "steps": ["ListVOs", "ListVOsAgain", "QueryImages", "UnknownImageFault", "Deploy", "GetResourceProperty",
                  "Pause", "Resume", "Destroy"],
    }
    steps, run = run_node(modules, config, tmp_path / "end-entity")
    assert run.returncode == 0, run.stdout + run.stderr
    assert set(steps) == {"ListVOs", "ListVOsAgain", "QueryImages", "UnknownImageFault", "Deploy",
                          "GetResourceProperty", "Pause", "Resume", "Destroy"}
    assert steps["ListVOsAgain"]["detail"] == steps["ListVOs"]["detail"]
    assert steps["QueryImages"]["detail"]["count"] == 1
    assert steps["UnknownImageFault"]["detail"]["detail"] == ["UnknownImageFault"]
    assert steps["GetResourceProperty"]["detail"] == "Running"
    assert (steps["Pause"]["detail"], steps["Resume"]["detail"]) == ("Paused", "Running")
    assert steps["Destroy"]["detail"] is True
    # the grid saw node-soap's caller and no instance is left
    assert all(i.state in ("Destroyed", "Ended") or i.identifier != "node-soap-1"
               for i in vm_grid.vmm(pki.alice).list())

    # alice's proxy: node-soap's WSSecurityCert sends the one certificate it is given as X509v3, and the proxy
    # alone is refused with what to change; with the token rewritten as the chain (X509PKIPathv1,
    # tests/interop/node/vmgrid_client.js) the whole contract runs as alice, via her proxy
    proxy = pki.alice.proxy
    proxy_dir = tmp_path / "proxy"
    proxy_dir.mkdir()
    (proxy_dir / "proxy.pem").write_bytes(proxy.certificate.public_bytes(serialization.Encoding.PEM))
    (proxy_dir / "proxy-key.pem").write_bytes(proxy.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with_proxy = {**config, "steps": None,                          # ProxyAlone first, then every step
                  "cert": str(proxy_dir / "proxy.pem"), "key": str(proxy_dir / "proxy-key.pem"),
                  "pkiPath": base64.b64encode(wssec.pkipath(reversed(proxy.certificates))).decode(),
                  "deployXml": _deploy_xml(descriptor, "node-soap-2")}
    steps, run = run_node(modules, with_proxy, proxy_dir)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "send the chain as an X509PKIPathv1" in steps.pop("ProxyAlone")["detail"]
    assert len(steps) == 9 and all(s["ok"] for s in steps.values())
    owners = {i.identifier: i.owner for i in vm_grid.vmm(pki.alice).list(include_ended=True)}
    assert owners["node-soap-2"] == pki.alice.dn


def test_node_soap_runs_the_job_service_signed_and_gets_its_faults_typed(job_service, tmp_path):
    """The job service as a scientist uses it, from its served WSDL: a job run and its properties (State, Outputs,
    CancelRequested, ResourceBounds), a long job cancelled, both destroyed, and IllegalTransitionFault,
    ResourceUnknownFault and InvalidArgumentFault each in the fault's detail; every answer verified. Signed with alice's
    proxy and its chain (the job:JobKey header signed too)."""
    modules = node_soap()
    pki = job_service.pki
    proxy = pki.alice.proxy
    (tmp_path / "proxy.pem").write_bytes(proxy.certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "proxy-key.pem").write_bytes(proxy.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    config = {"jobsWsdl": job_service.url + "?wsdl", "jobsUrl": job_service.url,
              "cert": str(tmp_path / "proxy.pem"), "key": str(tmp_path / "proxy-key.pem"),
              "pkiPath": base64.b64encode(wssec.pkipath(reversed(proxy.certificates))).decode(),
              "caFile": str(next(p for p in sorted(Path(pki.cert_dir).glob("*.0")))), "hostCN": "host/localhost",
              "actions": job_service.actions, "echo": ECHO, "long": LONG, "unknownKey": UNKNOWN_KEY}
    steps, run = run_node(modules, config, tmp_path / "jobs")
    assert run.returncode == 0, run.stdout + run.stderr
    check_job_steps(steps)
