"""The local grid (client/localgrid.py: the demo's and the tests' grids) picks a free port for each service process;
another process may bind it before the service does (a test run beside this one took node1's port at its restart:
"cannot listen on 127.0.0.1:PORT: Address already in use"). A port it picked and lost is picked again; a port the
caller named is not."""
from __future__ import annotations

import socket

import pytest

from client import localgrid
from client.localgrid import LocalGrid


def test_a_lost_free_port_is_picked_again_and_a_named_one_is_not(tmp_path, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as taken, LocalGrid(tmp_path / "grid") as grid:
        lost = taken.getsockname()[1]
        picks = iter([lost])
        real = localgrid.free_port
        monkeypatch.setattr(localgrid, "free_port", lambda: next(picks, None) or real())
        sp = grid.start("authz1", ["authz"], {})
        assert sp.port != lost and sp.process.poll() is None
        assert f"cannot listen on 127.0.0.1:{lost}: Address already in use" in sp.log.read_text()
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{lost}: Address already in use"):
            grid.start("authz2", ["authz"], {}, port=lost)
