"""The grid container's side of guestd (guestd/steps/grid.py) with the node's side
(services/vmmanager/guestcred.py), without a VM: the context's grid object, the jobs.toml guestd writes
from the image's template, the key made by the runtime's guestkey module (real RSA, real CSR), the
certificate the node's CA issues for it, installed through the ``certificate`` handler, which starts
the held container; clients' trust store accepts the certificate as host/<leased address>."""
from __future__ import annotations

import json
import sys
from ipaddress import ip_address
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from guestd.context import ContextError, validate
from guestd.steps import Environment, grid, run_all
from security.pki import CAError, GridCA, check_request, host_of
from security.trust import TrustStore
from services.vmmanager import guestcred
from services.vmmanager.config import VMManagerConfig
from services.vmmanager.context import build_context

from guestd_fakes import FakeSystem, fake_roots

MAC = "52:54:00:0a:0b:0c"
REPO = Path(__file__).resolve().parents[3]
OWNER = "/O=Grid/OU=vmgrid/CN=alice"
ADMIN = "/O=Grid/OU=vmgrid/CN=bio-admin"
TEMPLATE = (REPO / "guestd/image/recipes/emboss/jobs.toml").read_text()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site CA (a `vmgrid ca` directory) and a node configured to issue guest certificates with it."""
    d = tmp_path_factory.mktemp("site")
    ca = GridCA.create(d / "ca", "/O=Grid/OU=vmgrid/CN=Site CA")
    return ca, VMManagerConfig(guest_ca=str(ca.directory), job_admins=[ADMIN])


def context(config, owner=OWNER, container=("python3", "-m", "client.cli", "serve", "jobs")):
    return build_context(instance="inst-1", hostname="guest-1", mac=MAC, address="10.77.0.10",
                         netmask="255.255.255.0", gateway="10.77.0.1", token="K" * 24,
                         container_command=list(container), grid=guestcred.grid_context(config, owner))


@pytest.fixture
def env(tmp_path):
    roots = fake_roots(tmp_path, nics={"eth0": MAC})
    (roots.etc / "vmgrid").mkdir(parents=True, exist_ok=True)
    (roots.etc / "vmgrid" / "jobs.toml").write_text(TEMPLATE)
    e = Environment(FakeSystem(roots), roots)
    e.state["grid_keygen"] = (sys.executable, "-m", "services.jobs.guestkey")   # the runtime's module, here
    return e


def test_the_context_carries_owner_admins_and_trusted_ca_files(site):
    ca, config = site
    ctx = context(config)
    assert ctx.grid.owner == OWNER and ctx.grid.admins == (ADMIN,)
    assert sorted(ctx.grid.trust) == sorted(p.name for p in ca.cert_dir.iterdir())
    assert validate(json.loads(ctx.to_json())) == ctx            # round trip through the ISO's JSON
    assert "grid" not in json.loads(context(VMManagerConfig()).to_json())   # no guest CA: no grid object


@pytest.mark.parametrize("grid, message", [
    ({"owner": "alice"}, "not a grid DN"),
    ({"owner": OWNER, "admins": ["x"] * 40}, "at most 32"),
    ({"owner": OWNER, "trust": {"../../etc/passwd": "x"}}, "not <8 hex digits>"),
    ({"owner": OWNER, "trust": {"abcdef01.0": "caf\u00e9"}}, "ASCII"),
    ({"owner": OWNER, "shell": "rm -rf /"}, "unknown grid fields"),
])
def test_a_bad_grid_object_is_refused_with_the_reason(site, grid, message):
    body = json.loads(context(site[1]).to_json())
    body["grid"] = grid
    with pytest.raises(ContextError, match=message):
        validate(body)


def test_guestd_writes_jobs_toml_makes_a_key_and_holds_the_container_until_the_certificate(site, env):
    ca, config = site
    ctx = context(config, container=("sleep", "600"))
    results = run_all(ctx, env)
    g = results["grid"]
    assert g.ok, g.error
    assert results["container"].detail["held"] == grid.HOLD and "container" not in env.state
    p = grid.paths(env)
    conf = tomllib.loads(p["config"].read_text())
    assert conf["jobs"]["owner"] == OWNER and conf["jobs"]["admins"] == [ADMIN]
    assert conf["jobs"]["gridftp_port"] == 2812 and conf["jobs"]["public_host"] == "10.77.0.10"
    assert conf["container"]["public_url"] == "https://10.77.0.10:8443"
    assert conf["security"] == {"cert_dir": str(p["trust"]), "host_cert": str(p["cert"]), "host_key": str(p["key"])}
    assert conf["jobs"]["logs"] == {"container": str(p["container_log"]), "guestd": str(p["guestd_log"])}
    assert sorted(x.name for x in p["trust"].iterdir()) == sorted(ctx.grid.trust)
    assert p["key"].stat().st_mode & 0o077 == 0                       # the key stays the guest's own

    # the node: the request as guestd's status carries it, issued, sent back
    status = {"ready": True, "steps": {n: r.as_report() for n, r in results.items()}}
    detail = guestcred.requested(status)
    pem, record = guestcred.issue(config, detail, "10.77.0.10", "guest-1")
    assert record["url"] == "https://10.77.0.10:8443/wsrf/services/JobService"
    answer = grid.install_certificate(env, {"op": "certificate", "certificate": pem})
    try:
        assert answer == {"installed": True, "container": "started"}
        assert env.state["container"].status()["running"]
        cert = x509.load_pem_x509_certificate(p["cert"].read_bytes())
        assert host_of(record["dn"]) == "10.77.0.10" and record["dn"].startswith("/O=Grid/OU=vmgrid-guests/")
        # clients trusting the site CA accept it; the guest's key is the one certified
        caller = TrustStore(ca.cert_dir).validate([cert])
        assert caller.dn == record["dn"]
        from cryptography.hazmat.primitives import serialization
        key = serialization.load_pem_private_key(p["key"].read_bytes(), None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    finally:
        env.state["container"].stop()


def test_a_second_boot_keeps_the_key_and_starts_with_the_earlier_certificate(site, env):
    ca, config = site
    ctx = context(config, container=("sleep", "600"))
    first = run_all(ctx, env)
    pem, _ = guestcred.issue(config, first["grid"].detail, "10.77.0.10", "guest-1")
    grid.install_certificate(env, {"certificate": pem})
    env.state["container"].stop()
    key = grid.paths(env)["key"].read_bytes()
    again = Environment(env.system, env.roots, {"grid_keygen": env.state["grid_keygen"]})
    second = run_all(ctx, again)
    try:
        assert grid.paths(env)["key"].read_bytes() == key
        assert second["container"].detail.get("running") and "held" not in second["container"].detail
        # a new certificate restarts the running container
        pem2, _ = guestcred.issue(config, second["grid"].detail, "10.77.0.10", "guest-1")
        assert grid.install_certificate(again, {"certificate": pem2})["container"] == "restarting"
    finally:
        again.state["container"].stop()


def test_an_image_without_the_template_or_a_context_without_grid_starts_the_container_as_before(site, env):
    grid.paths(env)["config"].unlink()
    results = run_all(context(site[1], container=("sleep", "600")), env)
    try:
        assert results["grid"].ok and results["grid"].detail["configured"] is False
        assert results["container"].detail["running"]
        assert guestcred.requested({"steps": {n: r.as_report() for n, r in results.items()}}) is None
    finally:
        env.state["container"].stop()


def test_the_node_refuses_bad_requests_and_the_guest_bad_certificates(site, env, tmp_path):
    ca, config = site
    other = GridCA.create(tmp_path / "other", "/O=Grid/OU=x/CN=Other")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .sign(small, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    for bad, message in ((weak, "RSA of at least 2048"), (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "not a PEM"),
                         (b"x" * 9000, "exceeds")):
        with pytest.raises(CAError, match=message):
            check_request(bad)
        with pytest.raises(guestcred.GuestCredentialError):
            guestcred.issue(config, {"configured": True, "csr": bad.decode(), "port": 8443}, "10.77.0.10", "g")
    with pytest.raises(guestcred.GuestCredentialError, match="not a TCP port"):
        guestcred.issue(config, {"configured": True, "csr": "x", "port": 70000}, "10.77.0.10", "g")
    assert other.dn != ca.dn
    for bad in ("not pem", "-----BEGIN CERTIFICATE-----" + "A" * 20000, 42):
        with pytest.raises(ValueError):
            grid.install_certificate(env, {"certificate": bad})


class _Channel:
    def __init__(self, env, fail=None):
        self.env, self.fail, self.sent = env, fail, []

    def request(self, op, timeout, **fields):
        assert timeout <= guestcred.CERT_TIMEOUT
        if self.fail:
            raise self.fail
        self.sent.append((op, fields))
        return grid.install_certificate(self.env, fields)


def test_deliver_records_the_job_service_and_a_silent_guest_is_a_note_not_a_hang(site, env, tmp_path):
    from services.vmmanager.vmm.errors import GuestUnavailable
    from services.vmmanager.wire import JobService

    ca, config = site
    results = run_all(context(config, container=("sleep", "600")), env)
    status = {"ready": True, "steps": {n: r.as_report() for n, r in results.items()}}
    home = tmp_path / "home"
    home.mkdir()
    note = guestcred.deliver(config, _Channel(env, GuestUnavailable("guestd did not answer")), status,
                             "10.77.0.10", "guest-1", home)
    assert note.startswith("job service not started: guestd did not answer") and guestcred.job_service(home) is None
    channel = _Channel(env)
    try:
        note = guestcred.deliver(config, channel, status, "10.77.0.10", "guest-1", home)
        assert note == "job service https://10.77.0.10:8443/wsrf/services/JobService (started)"
        assert [op for op, _ in channel.sent] == ["certificate"]
        record = guestcred.job_service(home)
        assert record["dn"] == "/O=Grid/OU=vmgrid-guests/CN=host/10.77.0.10"

        class View:   # what the property reads: the instance's directory and state
            class inst:
                state = "Running"
            home = None
        View.home = home
        (el,) = JobService().elements(View)
        assert JobService.parse(el)["url"] == record["url"] and JobService.parse(el)["dn"] == record["dn"]
    finally:
        env.state["container"].stop()
    # a node without guest_ca (one the guest migrated to, trial T14) says why the container stays down; it said
    # nothing, and `vmgrid job list` then blamed the image
    channel.sent.clear()
    assert guestcred.deliver(VMManagerConfig(), channel, status, "10.77.0.10", "g", home) == (
        "job service not started: this node has no [vmmanager] guest_ca to issue the guest container's certificate "
        "(docs/jobs.md)")
    assert channel.sent == []
    assert guestcred.deliver(VMManagerConfig(), channel, {"ready": True, "steps": {}}, "10.77.0.10", "g",
                             home) is None          # a guest that asks nothing: nothing to say


def _guest_request():
    """A key and certificate request as a guest makes them (the VM's owner holds the key)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from security.pki import new_key
    key = new_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    return key, {"configured": True, "csr": csr, "port": 8443, "gridftp_port": 2812}


def _serve_as_guest(tmp_path, key, pem, ca):
    from gridftp import GridFTPServer
    from security.pki import Credential

    cert = x509.load_pem_x509_certificate(pem.encode())
    root = tmp_path / "served"
    root.mkdir()
    (root / "image").write_bytes(b"bytes of the guest owner's choosing\n")
    return GridFTPServer(root, "127.0.0.1", 0, credential=Credential(cert, key, ()), trust=ca.cert_dir,
                         anonymous=False).start()


@pytest.mark.parametrize("identifier", ["localhost", "central", "node1"])
def test_a_guest_certificate_names_its_leased_address_only(site, tmp_path, identifier):
    """The instance's identifier is its owner's choice: the node's certificate for her guest names the leased
    address only (attack11 F10: `vmgrid vm deploy ... localhost` gave the guest a site-CA certificate for
    DNS:localhost, and a GridFTP client checking the host by name took the guest for localhost)."""
    from gridftp import AuthenticationError, download
    from security.pki import load_credential

    ca, config = site
    key, detail = _guest_request()
    pem, record = guestcred.issue(config, detail, "10.77.0.10", identifier)
    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.IPAddress(ip_address("10.77.0.10"))]
    assert record["dn"] == "/O=Grid/OU=vmgrid-guests/CN=host/10.77.0.10"

    # served by the guest's owner and reached by the identifier: not that host
    node = ca.issue_host("node9", alt_names=["localhost"], out_dir=tmp_path / "node9")
    server = _serve_as_guest(tmp_path, key, pem, ca)
    try:
        with pytest.raises(AuthenticationError, match="does not name localhost"):
            download(f"gsiftp://localhost:{server.port}/image", tmp_path / "got",
                     credential=load_credential(node.cert_path, node.key_path), trust=ca.cert_dir, retries=0)
    finally:
        server.stop()


def test_a_node_never_stages_from_a_guest_whatever_address_it_names(site, tmp_path):
    """Where a site host is expected (a node staging an image), a guest's certificate is refused even at the
    address it names ([vmmanager] guest_dns / guest_ou), as for migration sources; a plain client takes it as the
    host of its own address."""
    from gridftp import download
    from services.faults import TransferFault
    from services.vmmanager.repository import RepositoryAccess

    ca, config = site
    key, detail = _guest_request()
    pem, _ = guestcred.issue(config, detail, "127.0.0.1", "guest-1")
    node = ca.issue_host("node8", out_dir=tmp_path / "node8")
    server = _serve_as_guest(tmp_path, key, pem, ca)
    url = f"gsiftp://127.0.0.1:{server.port}/image"
    try:
        got = download(url, tmp_path / "plain", credential=node, trust=ca.cert_dir, retries=0)
        assert got.size == (tmp_path / "served" / "image").stat().st_size
        assert guestcred.is_guest(config, "/O=Grid/OU=vmgrid-guests/CN=host/127.0.0.1")
        assert not guestcred.is_guest(config, node.subject)

        class Staging(RepositoryAccess):      # the repository's answer to "where is the image": this server
            def _location(self, image_id):
                return url

        staging = Staging("https://repository.invalid/", node, TrustStore(ca.cert_dir),
                          refuse_server=lambda dn: guestcred.is_guest(config, dn))
        with pytest.raises(TransferFault, match="a certificate refused here"):
            staging.fetch("img", "0" * 64, 36, tmp_path / "staged", lambda *a: None)
        assert not (tmp_path / "staged").exists()
    finally:
        server.stop()
