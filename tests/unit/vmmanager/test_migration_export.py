"""A node's migration export (services.vmmanager.migration.Exports): the GridFTP server its target pulls an instance's
files from takes [gridftp]'s bounds on sessions and refuses guest containers' certificates at login (attack G10's
fix: guests have no rights there). Real GridFTP logins with certificates issued as a node issues them."""
from __future__ import annotations

import pytest

import gridftp
from services.vmmanager.migration import Exports

TARGET = "https://localhost:1/wsrf/services/VMManagerService"


@pytest.fixture
def export(grid_pki, tmp_path):
    (tmp_path / "instances" / "inst-1").mkdir(parents=True)
    (tmp_path / "instances" / "inst-1" / "disk.qcow2").write_bytes(b"disk" * 1000)
    exports = Exports(tmp_path / "instances", grid_pki.host, grid_pki.trust(), "https://localhost:2/wsrf/services/x",
                      {"guests": ["/O=Grid/OU=vmgrid-guests/*"], "max_sessions": 8, "max_sessions_per_identity": 3,
                       "host_sessions": 2})
    base = exports.open("inst-1", ["disk.qcow2"], TARGET)
    exports.complete("inst-1")
    yield exports, f"{base}/inst-1/disk.qcow2"
    exports.close("inst-1")
    exports.stop()


def test_a_guest_whose_address_is_the_targets_host_name_is_refused_at_login(export, grid_pki, tmp_path):
    """A guest's certificate names its address, and host_authorizer(target) took it for the target's host when the
    names agreed (a one-host site: localhost): its owner read the migrating instance's disk. Now 530 at login; the
    target's host credential still pulls the file."""
    exports, url = export
    guest = grid_pki.issue_guest("localhost")
    assert guest.identity == "/O=Grid/OU=vmgrid-guests/CN=host/localhost"
    with pytest.raises(gridftp.GridFTPError, match="530 /O=Grid/OU=vmgrid-guests/CN=host/localhost is a guest "
                                                   "container's certificate: guests have no rights on this server."):
        gridftp.download(url, tmp_path / "stolen", 1, credential=guest, trust=grid_pki.trust())
    assert not (tmp_path / "stolen").exists()
    gridftp.download(url, tmp_path / "pulled", 1, credential=grid_pki.host, trust=grid_pki.trust())
    assert (tmp_path / "pulled").read_bytes() == b"disk" * 1000


def test_the_export_takes_the_gridftp_sections_bounds(export, grid_pki):
    exports, _ = export
    server = exports.face.server
    assert (server.max_sessions, server.max_sessions_per_identity, server.host_sessions) == (8, 3, 2)
    assert server.refuse_guests and server.is_guest("/O=Grid/OU=vmgrid-guests/CN=host/10.99.0.5")


def test_serve_gives_a_node_the_gridftp_section_and_its_guest_ou(grid_pki, tmp_path):
    """build_vmmanager ([gridftp], [vmmanager] guest_ou and guest_dns) hands them to the node's export."""
    from services.container.assemble import build_vmmanager
    from services.container.config import Config, GridFTPConfig
    from services.vmmanager.config import VMManagerConfig
    from services.vmmanager.vmm import LibvirtTestDriver

    cfg = Config()
    cfg.container.state_dir = str(tmp_path / "state")
    cfg.security.cert_dir = str(grid_pki.cert_dir)
    cfg.security.host_cert = str(grid_pki.host_cert_path)
    cfg.security.host_key = str(grid_pki.host_key_path)
    cfg.enforcement.authz_url = "https://localhost:1/wsrf/services/AuthorizationService"
    cfg.vmmanager = VMManagerConfig(node="n1", repository="https://localhost:1/wsrf/services/VMRepositoryService",
                                    guest_ou="site-guests", guest_dns=["/O=Grid/OU=other-guests/*"])
    cfg.gridftp = GridFTPConfig(max_sessions=16, transfer_idle_timeout=30, passive_per_identity=3, passive_wait=5)
    service = build_vmmanager(cfg, vmm=LibvirtTestDriver())
    try:
        assert service.core.exports.server_options == {
            "guests": ["/O=Grid/OU=other-guests/*", "/O=Grid/OU=site-guests/*"], "max_sessions": 16,
            "transfer_idle_timeout": 30, "passive_per_identity": 3, "passive_wait": 5}
    finally:
        service.close()
