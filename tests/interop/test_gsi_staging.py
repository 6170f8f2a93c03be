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
