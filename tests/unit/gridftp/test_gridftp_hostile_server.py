"""The GridFTP client (`vmgrid transfer`, `vmgrid job get`, a node's image fetch) facing a hostile server: a control
reply trickled in a byte at a time, each byte within the socket's timeout, or a multi-line reply that never ends.
A raw socket server in a thread; the client with a short timeout, the test's own wait generous."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from gridftp.errors import GridFTPError
from gridftp.transfer import download

pytestmark = pytest.mark.timeout(180)


def _drip(conn):
    conn.sendall(b"220-welcome\r\n")
    while True:
        conn.sendall(b"x")
        time.sleep(0.2)


def _endless_reply(conn):
    conn.sendall(b"220-welcome\r\n")
    line = b" " + b"y" * 1000 + b"\r\n"
    while True:
        conn.sendall(line * 64)


@pytest.mark.parametrize("behave", [_drip, _endless_reply], ids=["a dripped greeting", "an endless greeting"])
def test_a_hostile_control_reply_ends_the_download_with_an_error(tmp_path, behave):
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        try:
            behave(conn)
        except OSError:
            pass
        finally:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    outcome: list[BaseException | None] = []

    def fetch():
        try:
            download(f"ftp://127.0.0.1:{srv.getsockname()[1]}/x", tmp_path / "x", timeout=3, retries=0)
            outcome.append(None)
        except BaseException as exc:       # noqa: B902 - recorded for the assertion below
            outcome.append(exc)

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(120)                      # far past the client's 3 s: a hang, not a slow machine
    srv.close()
    assert not worker.is_alive(), "the client still reads the reply"
    assert isinstance(outcome[0], GridFTPError), outcome
    assert not (tmp_path / "x").exists()
