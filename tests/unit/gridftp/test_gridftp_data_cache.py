"""MODE E data channel caching on vmgrid's server (GFD.20; docs trial F16), on the wire: the streams of a transfer
end with EOD but no close flag and carry the session's next transfer without a new PORT/PASV; a new data setup, a
MODE/PROT/DCAU change, an error, ABOR or the idle timeout closes them; another session never gets them."""
from __future__ import annotations

import os
import socket

import pytest

import gridftp.server as server_module
from gridftp.protocol import BLOCK_HEADER, DESC_CLOSE, DESC_EOD, DESC_EOF, find_host_ports

from tests.unit.gridftp.gridftp_helpers import MiB, RawFTP, _exact, assemble, read_mode_e
from tests.unit.gridftp.test_gridftp_conformance import accept_n, ftp, listen, port_arg, writable  # noqa: F401


def _retr(session: RawFTP, path: str, conns: list[socket.socket]) -> tuple[bytes, list[int]]:
    assert session.cmd(f"RETR {path}").code == 150
    blocks, descs = read_mode_e(conns)
    assert session.reply().code == 226
    return assemble(blocks), descs


def _final(session: RawFTP) -> int:
    """The code of a transfer's final reply (markers skipped)."""
    while True:
        reply = session.reply()
        if not reply.preliminary:
            return reply.code


def _closed_by_peer(conn: socket.socket) -> list[int]:
    """Read a cached connection to its end: the descriptors of what came (a close block, then end of stream)."""
    descs = []
    conn.settimeout(10)
    while True:
        try:
            header = _exact(conn, BLOCK_HEADER.size)
        except EOFError:
            return descs
        descs.append(BLOCK_HEADER.unpack(header)[0])


def _mode_e_retr_setup(session: RawFTP, parallel: int = 3) -> socket.socket:
    listener = listen()
    for line in ("TYPE I", "MODE E", f"OPTS RETR Parallelism={parallel},{parallel},{parallel};",
                 f"PORT {port_arg(listener)}"):
        assert session.cmd(line).ok
    return listener


def test_retr_after_retr_reuses_the_data_connections(ftp, tree):  # noqa: F811
    listener = _mode_e_retr_setup(ftp)
    assert ftp.cmd("RETR /data/f3m").code == 150
    conns = accept_n(listener, 3)
    blocks, descs = read_mode_e(conns)
    assert ftp.reply().code == 226
    assert assemble(blocks) == (tree / "data" / "f3m").read_bytes()
    assert [d for d in descs if d & DESC_EOD] == [DESC_EOD] * 3         # ended, not closed
    listener.settimeout(0.5)
    for path in ("/data/small", "/data/f3m", "/data/empty"):      # no PORT: the same three connections carry them
        data, descs = _retr(ftp, path, conns)
        assert data == (tree / path.lstrip("/")).read_bytes()
        assert sum(1 for d in descs if d & DESC_EOF) == 1 and sum(1 for d in descs if d & DESC_EOD) == 3
    with pytest.raises(socket.timeout):
        listener.accept()                                           # no new connection was opened
    # a listing in MODE E rides on them too
    assert ftp.cmd("NLST /data").code == 150
    blocks, _ = read_mode_e(conns)
    assert ftp.reply().code == 226
    assert sorted(assemble(blocks).decode().split()) == ["empty", "f3m", "small"]


@pytest.mark.parametrize("change", ["PORT", "MODE S", "SBUF 65536", "parallelism", "ABOR", "error"])
def test_the_cached_connections_are_closed_when(ftp, tree, change, monkeypatch):  # noqa: F811
    monkeypatch.setattr(server_module, "DATA_CACHE_IDLE", 3600.0)     # closed at once, not by the idle timeout
    listener = _mode_e_retr_setup(ftp, 2)
    assert ftp.cmd("RETR /data/small").code == 150
    conns = accept_n(listener, 2)
    read_mode_e(conns)
    assert ftp.reply().code == 226
    if change == "PORT":
        ftp.expect(f"PORT {port_arg(listener)}", 200)
    elif change == "parallelism":           # a transfer over three: the two cached are closed, three opened
        ftp.expect("OPTS RETR Parallelism=3,3,3;", 200)
        assert ftp.cmd("RETR /data/f3m").code == 150
        fresh = accept_n(listener, 3)
        blocks, _ = read_mode_e(fresh)
        assert ftp.reply().code == 226
        assert assemble(blocks) == (tree / "data" / "f3m").read_bytes()
    elif change == "error":
        ftp.expect("RETR /data/nothing-here", 550)
    elif change == "ABOR":
        ftp.expect("ABOR", 226)
    else:
        ftp.expect(change, 200)
    for conn in conns:                      # the sender says it closes them (a close block), then closes
        assert _closed_by_peer(conn) == [DESC_CLOSE]
    if change in ("ABOR", "error"):
        ftp.expect("RETR /data/small", 503)     # and nothing is left to carry a transfer without a new PORT


def test_another_session_never_gets_the_cached_connections(start_server, tree):
    server = start_server()
    a, b = RawFTP("127.0.0.1", server.port), RawFTP("127.0.0.1", server.port)
    try:
        for s in (a, b):
            s.login_anonymous()
        listener = _mode_e_retr_setup(a, 2)
        assert a.cmd("RETR /data/small").code == 150
        conns = accept_n(listener, 2)
        read_mode_e(conns)
        assert a.reply().code == 226
        b.expect("MODE E", 200)
        b.expect("RETR /data/f3m", 503)         # b has no data setup of its own: a's connections are not b's
        data, _ = _retr(a, "/data/f3m", conns)  # and a's still serve a
        assert data == (tree / "data" / "f3m").read_bytes()
    finally:
        a.close()
        b.close()


def test_the_cached_connections_of_an_idle_session_are_closed(ftp, tree, monkeypatch):  # noqa: F811
    monkeypatch.setattr(server_module, "DATA_CACHE_IDLE", 0.3)
    listener = _mode_e_retr_setup(ftp, 2)
    assert ftp.cmd("RETR /data/small").code == 150
    conns = accept_n(listener, 2)
    read_mode_e(conns)
    assert ftp.reply().code == 226
    for conn in conns:
        conn.settimeout(20)
        assert _closed_by_peer(conn) == [DESC_CLOSE]


def _send(conn: socket.socket, blocks, eod_count: int | None, desc_end: int = DESC_EOD) -> None:
    for offset, data in blocks:
        conn.sendall(BLOCK_HEADER.pack(0, len(data), offset) + data)
    if eod_count is not None:
        conn.sendall(BLOCK_HEADER.pack(DESC_EOF, 0, eod_count))
    conn.sendall(BLOCK_HEADER.pack(desc_end, 0, 0))


def test_stor_after_stor_reuses_the_data_connections(writable, tree):  # noqa: F811
    writable.expect("MODE E", 200)
    addr = find_host_ports(writable.expect("PASV", 227).text)[0]
    a, b, c = (socket.create_connection(addr) for _ in range(3))
    first = os.urandom(2 * MiB + 5)
    assert writable.cmd("STOR /up/one").code == 150
    _send(a, [(0, first[:MiB])], 3)
    _send(b, [(MiB, first[MiB:])], None)
    _send(c, [], None)
    assert _final(writable) == 226
    assert (tree / "up" / "one").read_bytes() == first
    # no PASV: the same connections carry the next file; c is closed by the sender first (two streams now)
    second = os.urandom(MiB + 3)
    assert writable.cmd("STOR /up/two").code == 150
    c.sendall(BLOCK_HEADER.pack(DESC_CLOSE, 0, 0))
    _send(b, [(MiB, second[MiB:])], 2)
    _send(a, [(0, second[:MiB])], None)
    assert _final(writable) == 226
    assert (tree / "up" / "two").read_bytes() == second
    # a third with one more connection to the passive port, and the close flag this time: not kept
    third = os.urandom(3000)
    assert writable.cmd("STOR /up/three").code == 150
    d = socket.create_connection(addr)
    _send(d, [(0, third[:1000])], 3, DESC_EOD | DESC_CLOSE)
    _send(a, [(1000, third[1000:2000])], None, DESC_EOD | DESC_CLOSE)
    _send(b, [(2000, third[2000:])], None, DESC_EOD | DESC_CLOSE)
    assert _final(writable) == 226
    assert (tree / "up" / "three").read_bytes() == third
    for conn in (a, b, d):
        conn.settimeout(10)
        assert conn.recv(1) == b""              # the receiver closed them
    writable.expect("STOR /up/four", 503)       # nothing kept: a new PASV is needed
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["one", "three", "two"]


def test_a_cached_upload_connection_is_not_a_download_one(writable, tree):  # noqa: F811
    """Connections kept from an upload (the client sent on them) never carry a download: RETR needs a PORT."""
    writable.expect("MODE E", 200)
    addr = find_host_ports(writable.expect("PASV", 227).text)[0]
    a = socket.create_connection(addr)
    assert writable.cmd("STOR /up/one").code == 150
    _send(a, [(0, b"x" * 100)], 1)
    assert _final(writable) == 226
    writable.expect("RETR /up/one", 503)
    a.settimeout(10)
    assert a.recv(1) == b""                     # and the refused transfer closed them


@pytest.mark.parametrize("change", ["PROT C", "DCAU N"])
def test_tls_data_connections_are_reused_until_prot_or_dcau_changes(start_server, grid_pki, tree, change):  # noqa: F811
    """PROT P: the TLS data connection alice's client opened (and the server checked: DCAU A) carries her next
    upload as well; a PROT or DCAU change closes it (it was set up under the old ones)."""
    from gridftp.tls import TLSConfig
    server = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, upload_area="/up", anonymous=False,
                          require_private_data=False)
    tls = TLSConfig(grid_pki.alice.proxy, grid_pki.cert_dir)
    s = RawFTP("127.0.0.1", server.port)
    try:
        s.starttls(tls.client_context)
        for line in ("PBSZ 0", "PROT P", "USER :globus-mapping:", "TYPE I", "MODE E"):
            assert s.cmd(line).ok
        addr = find_host_ports(s.expect("PASV", 227).text)[0]
        assert s.cmd("STOR /up/one").code == 150
        conn = tls.client_context.wrap_socket(socket.create_connection(addr, timeout=10))
        payloads = [os.urandom(100_000), os.urandom(5000)]
        _send(conn, [(0, payloads[0])], 1)
        assert _final(s) == 226
        assert s.cmd("STOR /up/two").code == 150        # no PASV: over the same TLS connection
        _send(conn, [(0, payloads[1])], 1)
        assert _final(s) == 226
        assert [(tree / "up" / n).read_bytes() for n in ("one", "two")] == payloads
        s.expect(change, 200)
        assert conn.recv(1) == b""                      # closed by the server
        s.expect("STOR /up/three", 503)
    finally:
        s.close()
