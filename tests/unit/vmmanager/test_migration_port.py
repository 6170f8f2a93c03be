"""A node's migration face on a port it cannot take (trial14 U4): named with [vmmanager] migration_port, at the node's
start (Exports.listen, a ValueError `vmgrid serve` prints in one line: tests/integration/test_serve_start_checks.py)
and, where the face opens at the first migration out, in the migration's fault and the node's log. Real sockets, the
real export (services.vmmanager.migration.Exports)."""
from __future__ import annotations

import logging
import socket

import pytest

from services.faults import MigrationFault
from services.vmmanager.migration import Exports

TARGET = "https://localhost:1/wsrf/services/VMManagerService"


@pytest.fixture
def held():
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield holder.getsockname()[1]


def _exports(grid_pki, tmp_path, port: int) -> Exports:
    (tmp_path / "instances" / "inst-1").mkdir(parents=True)
    exports = Exports(tmp_path / "instances", grid_pki.host, grid_pki.trust(), "https://localhost:2/wsrf/services/x")
    exports.port = port
    return exports


def test_a_held_migration_port_stops_the_nodes_start_naming_the_key(grid_pki, tmp_path, held):
    exports = _exports(grid_pki, tmp_path, held)
    with pytest.raises(ValueError) as caught:
        exports.listen()
    assert str(caught.value) == (f"[vmmanager] migration_port = {held}: the migration face cannot listen on it: "
                                 f"Address already in use (another process listens on it: give a free port, or 0 for "
                                 f"any)")
    assert exports.face is None


def test_a_face_that_cannot_open_at_a_migration_out_names_the_key_and_warns(grid_pki, tmp_path, held, caplog):
    """Before: the MigrationFault said only "[Errno 98] Address already in use" and the node logged nothing."""
    exports = _exports(grid_pki, tmp_path, held)
    with caplog.at_level(logging.WARNING, logger="vmgrid.vmmanager.migration"):
        with pytest.raises(MigrationFault) as caught:
            exports.open("inst-1", ["disk.qcow2"], TARGET)
    assert caught.value.description == (f"[vmmanager] migration_port {held} of the source is in use: tell the site's "
                                        f"operator")
    assert caught.value.cause == "MigrationPort"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"migration face: [vmmanager] migration_port {held} of the source is in use: migrations out fail until the "
        f"node's operator mends it"]


def test_the_face_listens_from_the_start_on_a_free_port(grid_pki, tmp_path):
    from client.localgrid import free_port

    exports = _exports(grid_pki, tmp_path, free_port())
    try:
        exports.listen()
        assert exports.face is not None and exports.face.server.port == exports.port
        base = exports.open("inst-1", ["disk.qcow2"], TARGET)      # the same face serves the migration
        assert base.endswith(f":{exports.port}")
    finally:
        exports.stop()
