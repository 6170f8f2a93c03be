"""A node configured to stage with GSI (`[vmmanager] staging_gsi = true`) deploys an image staged from the
VMRepository's GridFTP face over AUTH GSSAPI: the repository's server offers GSI beside AUTH TLS, the node
authenticates with the GSI mechanism and delegates its proxy, the bytes are verified by sha256 as always.
(vmgrid on both ends: the Globus side of GSI is in test_gsi_globus.py.)"""
from __future__ import annotations

import logging

import pytest

from tests.fixtures.grid import start_grid
from tests.fixtures.pki import grid_pki  # noqa: F401

pytestmark = pytest.mark.interop


def test_a_node_stages_over_gsi(grid_pki, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="gridftp.server")
    grid = start_grid(grid_pki, tmp_path / "g", staging_gsi=True)
    try:
        ws = grid.register()
        vm = grid.vmm(grid_pki.alice)
        instance = vm.deploy(ws, "over-gsi", 300, wait=True)
        assert any("authenticated by GSI" in r.getMessage() for r in caplog.records)
        vm.destroy(instance.ref)
    finally:
        grid.close()


def test_a_node_without_staging_gsi_at_a_gsi_only_repository_is_told_the_key(grid_pki, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    """The repository's GridFTP face answering AUTH TLS with 504 (as a globus-gridftp-server does) and a node with
    staging_gsi = false: the deployment fails with the one thing the node's operator sets, [vmmanager] staging_gsi
    (trial15 X12's hint said "add --gsi", a `vmgrid transfer` flag no node has); with the key the same deployment
    runs."""
    from gridftp import server as server_module
    from services.faults import VMGridFault

    original = server_module._Session.cmd_AUTH

    def gsi_only(self, arg):
        if arg.upper() != "GSSAPI":
            raise server_module._Reply(504, "Unknown authentication type.")
        return original(self, arg)

    monkeypatch.setattr(server_module._Session, "cmd_AUTH", gsi_only)
    grid = start_grid(grid_pki, tmp_path / "g")
    try:
        ws = grid.register()
        vm = grid.vmm(grid_pki.alice)
        with pytest.raises(VMGridFault) as refused:
            vm.deploy(ws, "tls-only", 300, wait=True)
        said = str(refused.value)
        assert "server refused AUTH TLS: 504 Unknown authentication type." in said, said
        assert ("this node stages with AUTH TLS: its operator sets staging_gsi = true in the node's [vmmanager] "
                "configuration to stage with AUTH GSSAPI (Globus GSI)") in said, said
        assert "--gsi" not in said, said
    finally:
        grid.close()
    grid = start_grid(grid_pki, tmp_path / "g2", staging_gsi=True)
    try:
        ws = grid.register()
        vm = grid.vmm(grid_pki.alice)
        instance = vm.deploy(ws, "over-gsi", 300, wait=True)
        vm.destroy(instance.ref)
    finally:
        grid.close()
