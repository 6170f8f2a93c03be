"""Fixtures of the GridFTP tests: a served tree and servers on 127.0.0.1, port 0, stopped after each test."""
from __future__ import annotations

import pytest

from gridftp import GridFTPServer

from tests.unit.gridftp.gridftp_helpers import MiB, make_file


@pytest.fixture
def tree(tmp_path):
    """A served directory: /data/small (1000 bytes), /data/f3m (3 MiB + 17), /data/empty, /up/ (upload area)."""
    root = tmp_path / "served"
    make_file(root / "data" / "small", 1000)
    make_file(root / "data" / "f3m", 3 * MiB + 17)
    (root / "data" / "empty").write_bytes(b"")
    (root / "up").mkdir()
    return root


@pytest.fixture
def start_server(tree):
    """start_server(**GridFTPServer kwargs) -> a started server over `tree` (anonymous read-only by default)."""
    servers = []

    def start(root=None, **kwargs) -> GridFTPServer:
        kwargs.setdefault("anonymous", True)
        kwargs.setdefault("marker_interval", 0.2)
        server = GridFTPServer(root or tree, "127.0.0.1", 0, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()
