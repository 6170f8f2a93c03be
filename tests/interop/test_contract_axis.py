"""Interop with Apache Axis 1.4 and WSS4J 1.6 (Debian `libaxis-java`, `libwss4j-java`; the stack of the Globus
Toolkit 4 Java WS Core): a Java client whose stubs WSDL2Java generates from the VMRepository and VMManager WSDLs a
live grid serves, signing every request and verifying every answer with WSS4J 1.6 in two Axis handlers
(tests/interop/axis/GridSecurity.java: Debian's WSS4J 1.6 has no Axis 1 handlers of its own), runs ListVOs,
QueryImages with criteria (word operators), GetDescriptor of an unknown image (a typed UnknownImageFault), a
QueryImages the schema refuses (a typed InvalidArgumentFault), Deploy of the descriptor GetDescriptor gave,
GetResourceProperty (QName content), Pause/Resume and Destroy, signed with alice's proxy and its chain as an
X509PKIPathv1 token; with her end-entity certificate; and with a proxy whose key is ECDSA P-256 (ecdsa-sha256).

The SoapUI project (wsdl/soapui) signs with the same WSS4J settings: a test compares them.

Stubs and client are compiled once and cached under var/axis/<hash of the served WSDLs, their schemas, the client
sources and the jars>; the settings class alone under var/axis/<hash>-security."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from lxml import etree

from security.pki import make_proxy
from security.tls import grid_session
from tests.interop.job_service import ECHO, LONG, UNKNOWN_KEY, check_job_steps
from tests.interop.served_contract import mirror_contract

ROOT = Path(__file__).resolve().parents[2]
SOURCES = Path(__file__).parent / "axis"
JAVA = Path("/usr/share/java")
# Axis 1.4 and what it needs (libaxis-java's dependencies), WSS4J 1.6 and Santuario (libwss4j-java's)
JARS = ["axis", "jaxrpc", "saaj", "wsdl4j", "commons-logging", "commons-discovery", "javax.mail", "javax.activation",
        "wss4j", "xmlsec", "slf4j-api", "slf4j-nop"]
PACKAGES = {  # namespace: Java package of the generated stubs
    "http://vmgrid.org/ns/vmrepository/1": "vmgrid.repo",
    "http://vmgrid.org/ns/vmrepository/1/wsdl": "vmgrid.repo.wsdl",
    "http://vmgrid.org/ns/vmmanager/1": "vmgrid.vmm", "http://vmgrid.org/ns/vmmanager/1/wsdl": "vmgrid.vmm.wsdl",
    "http://vmgrid.org/ns/workspace/1": "vmgrid.ws", "http://vmgrid.org/ns/faults/1": "vmgrid.faults",
    "http://docs.oasis-open.org/wsrf/rl-2": "vmgrid.wsrf.rl", "http://docs.oasis-open.org/wsrf/rp-2": "vmgrid.wsrf.rp",
    "http://docs.oasis-open.org/wsn/b-2": "vmgrid.wsn", "http://www.w3.org/2005/08/addressing": "vmgrid.wsa",
    "http://vmgrid.org/ns/jobs/1": "vmgrid.jobs", "http://vmgrid.org/ns/jobs/1/wsdl": "vmgrid.jobs.wsdl",
}
# the clients and the stubs they need: the grid's (VMRepository, VMManager) and the job service's
GRID_CLIENT = ["GridClient.java", "ClientSupport.java", "GridSecurity.java"]
JOB_CLIENT = ["JobClient.java", "ClientSupport.java", "GridSecurity.java"]
SOAPUI = ROOT / "wsdl" / "soapui" / "vmgrid-soapui-project.xml"
CON = "http://eviware.com/soapui/config"
ALL_STEPS = ["ListVOs", "QueryImages", "UnknownImageFault", "InvalidArgumentFault", "GetDescriptor", "Deploy",
             "GetResourceProperty", "Pause", "Resume", "Destroy"]

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("javac") is None or not all((JAVA / f"{j}.jar").exists() for j in JARS),
                                 reason="Debian packages libaxis-java, libwss4j-java and default-jdk-headless are not "
                                        "installed (./run.sh setup installs them)")]


# a short-lived client: the C1 compiler alone and the serial collector start the JVM in half the CPU time
JVM = ["java", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]


def classpath(*extra: Path) -> str:
    return ":".join([str(p) for p in extra] + [str(JAVA / f"{j}.jar") for j in JARS])


WSDL2JAVA = ["-W", "-w"]


def _cached(key_files: list[Path], suffix: str, build) -> Path:
    """var/axis/<hash><suffix>/classes, built by build(work_dir) once for these files, jars and generator options."""
    digest = hashlib.sha256(repr((PACKAGES, WSDL2JAVA)).encode())
    for path in key_files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for jar in JARS:   # the jars' versions (the symlinks resolve to versioned names)
        digest.update(str((JAVA / f"{jar}.jar").resolve()).encode())
    out = ROOT / "var" / "axis" / (digest.hexdigest()[:16] + suffix)
    if (out / "classes").is_dir():
        return out / "classes"
    work = out.with_name(out.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        build(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)      # nothing of a failed build is left in var/axis
        raise
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return out / "classes"


def _javac(work: Path, sources: list[Path]) -> None:
    (work / "classes").mkdir()
    run = subprocess.run(["javac", "-nowarn", "-encoding", "UTF-8", "-cp", classpath(), "-d", str(work / "classes"),
                          *map(str, sources)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr


def build_client(contract_dir: Path, sources: list[str] = GRID_CLIENT) -> Path:
    """WSDL2Java stubs for the mirrored contract (each of its WSDLs) and the client (these sources), compiled as
    generated, once (var/axis/<hash>/classes)."""
    client = [SOURCES / name for name in sources]

    def build(work: Path) -> None:
        (work / "ns.properties").write_text("".join(f"{ns.replace(':', chr(92) + ':')}={pkg}\n"
                                                    for ns, pkg in PACKAGES.items()))
        for wsdl in sorted(p.name for p in contract_dir.glob("*.wsdl")):
            # -W: the wrapper elements as beans (the operations take and return them); -w: beans for wrapped
            # arrays too (else Axis flattens criteria/group/criterion to CriterionType[][] and nests it wrongly)
            subprocess.run([*JVM, "-cp", classpath(), "org.apache.axis.wsdl.WSDL2Java", "-o", str(work / "src"),
                            *WSDL2JAVA, "-f", str(work / "ns.properties"), str(contract_dir / wsdl)],
                           check=True, capture_output=True, timeout=600)
        _javac(work, sorted((work / "src").rglob("*.java")) + client)
        shutil.rmtree(work / "src")

    return _cached(sorted(contract_dir.iterdir()) + client, "", build)


def build_security() -> Path:
    """GridSecurity alone (its settings need no stubs), compiled once (var/axis/<hash>-security/classes)."""
    source = SOURCES / "GridSecurity.java"
    return _cached([source], "-security", lambda work: _javac(work, [source]))


def _write_credential(credential, into: Path) -> tuple[Path, Path]:
    """The key as PKCS#8 DER and the certificates (signing certificate first) as PEM, the forms Java reads."""
    into.mkdir(parents=True, exist_ok=True)
    key, chain = into / "key.der", into / "chain.pem"
    key.write_bytes(credential.private_key.private_bytes(serialization.Encoding.DER,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in credential.certificates))
    return key, chain


def run_client(classes: Path, tmp_path: Path, name: str, credential, main: str = "vmgrid.interop.GridClient",
               **config) -> tuple[dict, subprocess.CompletedProcess]:
    key, chain = _write_credential(credential, tmp_path / name)
    props = tmp_path / name / "client.properties"
    props.write_text("".join(f"{k}={v}\n" for k, v in {"key": key, "chain": chain, **config}.items()))
    run = subprocess.run([*JVM, "-cp", classpath(classes), main, str(props)],
                         capture_output=True, text=True, timeout=600)
    steps = {s["step"]: s for s in map(json.loads, (line for line in run.stdout.splitlines() if line.startswith("{")))}
    return steps, run


def test_axis_wss4j_runs_the_contract_signed_and_verifies_every_answer(vm_grid, tmp_path, monkeypatch):
    pki = vm_grid.pki
    vm_grid.register()                                   # bio/debian12-emboss
    contract = mirror_contract({"repository.wsdl": vm_grid.repository_url + "?wsdl",
                                "vmmanager.wsdl": vm_grid.node_url() + "?wsdl"},
                               grid_session(pki.cert_dir), tmp_path / "contract")
    classes = build_client(contract)
    base = {"repoUrl": vm_grid.repository_url, "vmmUrl": vm_grid.node_url(),
            "ca": next(p for p in sorted(Path(pki.cert_dir).glob("*.0"))), "hostCN": "host/localhost",
            "image": "bio/debian12-emboss", "unknownImage": "img-0000000000000000"}

    # alice's proxy, sent with its chain (X509PKIPathv1), the way a GT4 Java client signs
    steps, run = run_client(classes, tmp_path, "proxy", pki.alice.proxy, identifier="axis-proxy", **base)
    assert run.returncode == 0, run.stdout + run.stderr
    assert list(steps) == ALL_STEPS
    assert all(s["ok"] and s["verified"] == 1 for s in steps.values())      # each answer verified by WSS4J
    assert steps["ListVOs"]["detail"] == "1" and steps["QueryImages"]["detail"] == "1"
    assert steps["UnknownImageFault"]["detail"] == "img-0000000000000000"      # caught as the typed fault
    assert "QueryImages/limit" in steps["InvalidArgumentFault"]["detail"]
    assert steps["GetDescriptor"]["detail"] == "debian12-emboss"
    state, owner = steps["Deploy"]["detail"].split("\n")
    assert (state, owner) == ("Running", pki.alice.dn)                        # the grid saw alice, via her proxy
    assert steps["GetResourceProperty"]["detail"] == "Running"
    assert (steps["Pause"]["detail"], steps["Resume"]["detail"]) == ("Paused", "Running")
    assert steps["Destroy"]["detail"] == "destroyed"
    ended = {i.identifier: i.state for i in vm_grid.vmm(pki.alice).list(include_ended=True)}
    assert ended["axis-proxy"] in ("Destroyed", "Ended")

    # her end-entity certificate (a chain of one); and the answer verification is real: an answer signed by
    # another host than the one expected is refused
    steps, run = run_client(classes, tmp_path, "end-entity", pki.alice.credential, identifier="axis-ee",
                            steps="ListVOs,UnknownImageFault,OtherHostRefused", otherHostCN="host/elsewhere", **base)
    assert run.returncode == 0, run.stdout + run.stderr
    assert list(steps) == ["ListVOs", "UnknownImageFault", "OtherHostRefused"]
    assert all(s["ok"] for s in steps.values())
    assert "not host/elsewhere" in steps["OtherHostRefused"]["detail"]

    # a proxy with an ECDSA P-256 key (`vmgrid proxy-init --key-type ec`): WSS4J signs with ecdsa-sha256, the grid
    # verifies it and answers (signed with its RSA host key, verified by WSS4J)
    monkeypatch.setenv("AXIS_DUMP", "1")              # the client writes each signed request to stderr
    steps, run = run_client(classes, tmp_path, "ec-proxy", make_proxy(pki.alice.credential, kind="ec"),
                            keyAlgorithm="EC", identifier="axis-ec", steps="ListVOs,QueryImages,UnknownImageFault",
                            **base)
    assert run.returncode == 0, run.stdout + run.stderr
    assert list(steps) == ["ListVOs", "QueryImages", "UnknownImageFault"]
    assert all(s["ok"] and s["verified"] == 1 for s in steps.values())
    assert steps["QueryImages"]["detail"] == "1" and steps["UnknownImageFault"]["detail"] == "img-0000000000000000"
    assert run.stderr.count('Algorithm="http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"') == 3


def test_axis_wss4j_runs_the_job_service_signed_and_gets_its_faults_typed(job_service, tmp_path):
    """Stubs WSDL2Java generates from the served jobs.wsdl alone: a job run and its properties (State, Outputs,
    CancelRequested, ResourceBounds), a long job cancelled, both destroyed, and IllegalTransitionFault,
    ResourceUnknownFault and InvalidArgumentFault each caught as its generated exception class; signed with alice's
    proxy and its chain (X509PKIPathv1, the job:JobKey header signed with the rest), every answer verified by WSS4J."""
    pki = job_service.pki
    contract = mirror_contract({"jobs.wsdl": job_service.url + "?wsdl"}, grid_session(pki.cert_dir),
                               tmp_path / "contract")
    classes = build_client(contract, JOB_CLIENT)
    steps, run = run_client(classes, tmp_path, "jobs", pki.alice.proxy, main="vmgrid.interop.JobClient",
                            jobsUrl=job_service.url, ca=next(p for p in sorted(Path(pki.cert_dir).glob("*.0"))),
                            hostCN="host/localhost", unknownKey=UNKNOWN_KEY, echo="|".join(ECHO), long="|".join(LONG))
    assert run.returncode == 0, run.stdout + run.stderr
    check_job_steps(steps)
    assert all(s["verified"] >= 1 for s in steps.values())      # each answer verified by WSS4J


def test_axis_stubs_of_the_served_repository_and_authz_wsdls_each_alone_compile_as_generated(vm_grid, tmp_path):
    """An Axis user generates stubs from the one WSDL she calls, and javac refused them:
    - faults.xsd's MigrationFault extended BaseFaultType (an AxisFault) with an element named cause, which WSDL2Java
      renames (cause1) only in the faults a WSDL's operations declare (vmmanager.wsdl's): from jobs.wsdl,
      vmrepository.wsdl or authz.wsdl alone its getCause() returned a String where Throwable's returns a Throwable.
      Its content is now written out (the same XML);
    - authz.xsd's AttributeType, MemberType and GetGroupsResponse's group extended a named simple type (ValueType,
      DNType, NameType) with an attribute, which WSDL2Java makes a class calling Object(String). They extend
      xs:string now and the service checks the bounds.
    jobs.wsdl alone: the job service's test above builds on its stubs."""
    session = grid_session(vm_grid.pki.cert_dir)
    for name, url in (("repository.wsdl", vm_grid.repository_url), ("authz.wsdl", vm_grid.authz_url)):
        contract = mirror_contract({name: url + "?wsdl"}, session, tmp_path / name)
        classes = build_client(contract, [])                  # javac refused them before
        assert any(classes.rglob("*Fault.class")), name


def test_the_soapui_project_signs_with_the_settings_of_the_wss4j_client():
    classes = build_security()
    run = subprocess.run([*JVM, "-cp", classpath(classes), "vmgrid.interop.GridSecurity"],
                         capture_output=True, text=True, check=True, timeout=300)
    axis = json.loads(run.stdout)
    project = etree.parse(str(SOAPUI)).getroot()
    signature = project.find(f".//{{{CON}}}outgoing/{{{CON}}}entry[@type='Signature']/{{{CON}}}configuration")
    for setting in ("keyIdentifierType", "signatureAlgorithm", "digestAlgorithm", "signatureCanonicalization",
                    "useSingleCert"):
        assert signature.findtext(setting) == axis[setting], setting
    parts = [[e.findtext("namespace"), e.findtext("name")] for e in signature.iterfind("signatureParts/entry")]
    assert sorted(parts) == sorted(axis["parts"])
    timestamp = project.find(f".//{{{CON}}}outgoing/{{{CON}}}entry[@type='Timestamp']/{{{CON}}}configuration")
    assert timestamp.findtext("timeToLive") == axis["timeToLive"]
