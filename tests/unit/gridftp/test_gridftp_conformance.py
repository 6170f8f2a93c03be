"""Protocol conformance of the GridFTP server: every command's reply codes, bad sequences and arguments,
denied paths, and the data each transfer command puts on the wire (real sockets on 127.0.0.1)."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
import zlib

import pytest

from gridftp.protocol import BLOCK_HEADER, DESC_EOD, DESC_EOF, find_host_ports, format_host_port
from gridftp.ranges import RangeSet

from tests.unit.gridftp.gridftp_helpers import (MiB, RawFTP, assemble, make_file, read_mode_e, read_stream,
                                                 send_mode_e, sha256_of)


@pytest.fixture
def ftp(start_server):
    """A logged-in anonymous session on a read-only server."""
    server = start_server()
    session = RawFTP("127.0.0.1", server.port)
    session.login_anonymous()
    yield session
    session.close()


@pytest.fixture
def writable(start_server):
    """A logged-in anonymous session on a server whose upload area /up is writable (test-only flag)."""
    server = start_server(upload_area="/up", insecure_anonymous_writes=True)
    session = RawFTP("127.0.0.1", server.port)
    session.login_anonymous()
    session.server = server
    yield session
    session.close()


def listen() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(10)
    return sock


def port_arg(listener: socket.socket) -> str:
    return format_host_port(*listener.getsockname())


def accept_n(listener: socket.socket, n: int) -> list[socket.socket]:
    return [listener.accept()[0] for _ in range(n)]


# -- login and session ---------------------------------------------------------------------------------
def test_greeting_and_login_sequence(start_server):
    server = start_server()
    s = RawFTP("127.0.0.1", server.port)
    assert s.greeting.code == 220
    s.expect("PASS nobody@", 503)                 # PASS before USER
    s.expect("SIZE /data/small", 530)             # not logged in
    s.expect("RETR /data/small", 530)
    s.expect("PASV", 530)
    s.expect("PWD", 530)
    s.expect("USER anonymous", 331)
    s.expect("PASS someone@", 230)
    s.expect("USER anonymous", 503)               # already logged in
    s.expect("PASS again@", 503)
    s.expect("QUIT", 221)
    assert s.sock.recv(10) == b""                 # the server closed the connection


def test_anonymous_is_refused_unless_enabled(start_server):
    server = start_server(anonymous=False)
    s = RawFTP("127.0.0.1", server.port)
    reply = s.expect("USER anonymous", 530)
    assert "disabled" in reply.text
    s.expect("PASS x@", 503)


def test_named_users_need_tls(ftp, start_server):
    server = start_server()
    s = RawFTP("127.0.0.1", server.port)
    assert "AUTH TLS" in s.expect("USER alice", 530).text


def test_unknown_and_malformed_commands(ftp):
    ftp.expect("XYZZY", 500)
    ftp.expect("123 456", 500)
    ftp.expect("", 500)
    ftp.ctl.sock.sendall(b"NOOP " + b"x" * 40000 + b"\r\n")   # longer than any legal line
    assert ftp.reply().code == 500
    ftp.expect("NOOP", 200)                        # the session survives


def test_informational_commands(ftp):
    ftp.expect("NOOP", 200)
    assert "UNIX" in ftp.expect("SYST", 215).text
    help_text = ftp.expect("HELP", 214).text
    for verb in ("RETR", "STOR", "ERET", "ESTO", "SPAS", "SPOR", "CKSM", "SBUF"):
        assert verb in help_text
    assert ftp.expect("SITE HELP", 214).code == 214
    ftp.expect("SITE CLIENTINFO appname=test;", 250)
    ftp.expect("SITE FROBNICATE", 504)
    status = ftp.expect("STAT", 211)
    assert "anonymous" in status.text


def test_feat_lists_the_gridftp_extensions(ftp):
    reply = ftp.expect("FEAT", 211)
    feats = {line.strip().split(" ")[0] for line in reply.lines[1:-1]}
    for feat in ("PARALLEL", "ERET", "ESTO", "SPAS", "SPOR", "SBUF", "SIZE", "MDTM", "REST", "CKSM", "MLST"):
        assert feat in feats
    assert "AUTH" not in feats                     # no credential on this server: no AUTH TLS offered
    cksm = next(line for line in reply.lines if line.strip().startswith("CKSM"))
    for alg in ("SHA256", "MD5", "ADLER32"):
        assert alg in cksm


def test_type_mode_stru(ftp):
    ftp.expect("TYPE I", 200)
    ftp.expect("TYPE A", 200)
    ftp.expect("TYPE L 8", 200)
    ftp.expect("TYPE", 501)
    ftp.expect("TYPE X", 504)
    ftp.expect("MODE E", 200)
    ftp.expect("MODE S", 200)
    ftp.expect("MODE B", 504)
    ftp.expect("MODE Z", 501)
    ftp.expect("STRU F", 200)
    ftp.expect("STRU R", 504)
    ftp.expect("STRU Q", 501)


def test_navigation_stays_inside_the_tree(ftp):
    assert ftp.expect("PWD", 257).text.startswith('"/"')
    ftp.expect("CWD /data", 250)
    assert '"/data"' in ftp.expect("PWD", 257).text
    ftp.expect("CWD small", 550)                  # a file, not a directory
    ftp.expect("CWD /nope", 550)
    ftp.expect("CDUP", 250)
    ftp.expect("CWD ../../../..", 250)            # .. never climbs above /
    assert ftp.expect("PWD", 257).text.startswith('"/"')
    ftp.expect("SIZE data/small", 213)            # relative to the working directory
    ftp.expect("CWD", 501)


def test_size_and_mdtm(ftp, tree):
    assert ftp.expect("SIZE /data/f3m", 213).text == str(3 * MiB + 17)
    assert ftp.expect("SIZE /data/empty", 213).text == "0"
    ftp.expect("SIZE /data", 550)
    ftp.expect("SIZE /data/nope", 550)
    ftp.expect("SIZE", 501)
    mdtm = ftp.expect("MDTM /data/small", 213).text
    expected = time.strftime("%Y%m%d%H%M%S", time.gmtime(os.stat(tree / "data" / "small").st_mtime))
    assert mdtm == expected
    ftp.expect("MDTM /nope", 550)


@pytest.mark.parametrize("alg,fn", [
    ("SHA256", lambda b: hashlib.sha256(b).hexdigest()),
    ("MD5", lambda b: hashlib.md5(b).hexdigest()),
    ("ADLER32", lambda b: f"{zlib.adler32(b):08x}"),
    ("SHA1", lambda b: hashlib.sha1(b).hexdigest()),
    ("SHA512", lambda b: hashlib.sha512(b).hexdigest()),
])
def test_cksm_algorithms_whole_and_ranges(ftp, tree, alg, fn):
    data = (tree / "data" / "f3m").read_bytes()
    assert ftp.expect(f"CKSM {alg} 0 -1 /data/f3m", 213).text == fn(data)
    assert ftp.expect(f"CKSM {alg.lower()} 1000 5000 /data/f3m", 213).text == fn(data[1000:6000])
    assert ftp.expect(f"CKSM {alg} {len(data)} 0 /data/f3m", 213).text == fn(b"")


def test_one_identitys_cksms_are_hashed_one_at_a_time(start_server, tree, monkeypatch):
    """One user asking CKSMs of large ranges from many sessions at once had them all hashed at once (each range a
    new cache key): every CPU of the server's host. Now one identity's hashing runs one at a time (and at most
    one per CPU in all). Observed by wrapping the real hash_file: each call waits for a second one to start
    beside it (up to 3 s), and the most that ran at once is counted."""
    import gridftp.server as server_module

    real_hash_file = server_module.hash_file
    running, most = [0], [0]
    both = threading.Barrier(2)
    lock = threading.Lock()

    def watched(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            both.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass
        try:
            return real_hash_file(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(server_module, "hash_file", watched)
    server = start_server()
    sessions = [RawFTP("127.0.0.1", server.port) for _ in range(2)]
    for s in sessions:
        s.login_anonymous()
    replies = []
    threads = [threading.Thread(target=lambda s=s, n=n: replies.append(s.cmd(f"CKSM SHA256 {n} 100 /data/f3m").code))
               for n, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert replies == [213, 213]
    assert most[0] == 1


def test_cksm_bad_arguments(ftp):
    ftp.expect("CKSM CRC99 0 -1 /data/small", 504)
    ftp.expect("CKSM SHA256 x -1 /data/small", 501)
    ftp.expect("CKSM SHA256 0 -5 /data/small", 501)
    ftp.expect("CKSM SHA256 0 2000 /data/small", 501)   # beyond the end of a 1000-byte file
    ftp.expect("CKSM SHA256 0 -1", 501)
    ftp.expect("CKSM SHA256 0 -1 /data/nope", 550)
    ftp.expect("CKSM SHA256 0 -1 /data", 550)


def test_rest_opts_sbuf_allo_scks_arguments(ftp):
    ftp.expect("REST 100", 350)
    ftp.expect("REST 0-10,20-30", 350)
    ftp.expect("REST", 501)
    ftp.expect("REST abc", 501)
    ftp.expect("REST 10-5", 501)
    ftp.expect("REST 0-10,x", 501)
    # numbers Python's int() refuses (over 4,300 digits) or that no 64-bit offset holds: a 501, and the session
    # goes on (the uncaught ValueError ended it)
    for huge in ("9" * 5000, "0-" + "9" * 5000, "9" * 30, "0-" + "9" * 30):
        ftp.expect("REST " + huge, 501)
    ftp.expect("NOOP", 200)
    ftp.expect("OPTS RETR Parallelism=4,4,4;", 200)
    ftp.expect("OPTS RETR Parallelism=2;", 200)
    ftp.expect("OPTS RETR StripeLayout=Partitioned;Parallelism=3,1,8;", 200)
    ftp.expect("OPTS RETR Parallelism=0,1,1;", 501)
    ftp.expect("OPTS RETR Parallelism=a,b,c;", 501)
    ftp.expect("OPTS RETR Parallelism=1000,1,1;", 501)
    ftp.expect("OPTS RETR Colour=blue;", 501)
    ftp.expect("OPTS UTF8 ON", 200)
    ftp.expect("OPTS FROB", 501)
    ftp.expect("SBUF 1048576", 200)
    ftp.expect("SITE BUFSIZE 65536", 200)
    ftp.expect("SBUF abc", 501)
    ftp.expect("SBUF 10", 501)
    ftp.expect("ALLO 12345", 200)
    ftp.expect("ALLO lots", 501)
    ftp.expect("SCKS SHA256 00ff", 200)
    ftp.expect("SCKS CRC99 00ff", 504)
    ftp.expect("SCKS SHA256", 501)


def test_data_port_commands(ftp):
    ftp.expect("PORT 127,0,0,1,4,1", 200)
    ftp.expect("PORT 127,0,0,1,0,21", 501)         # privileged port: no FTP bounce
    ftp.expect("PORT 127,0,0,1,300,1", 501)
    ftp.expect("PORT 1,2,3", 501)
    ftp.expect("EPRT |1|127.0.0.1|5000|", 200)
    ftp.expect("EPRT |2|::1|5000|", 501)           # not the control connection's address (see the bounce tests)
    ftp.expect("EPRT |1|::1|5000|", 501)
    ftp.expect("EPRT |1|127.0.0.1|99999|", 501)
    ftp.expect("EPRT nonsense", 501)
    host, port = ftp.pasv()
    assert host == "127.0.0.1" and port > 1024
    assert re.search(r"\(\|\|\|\d+\|\)", ftp.expect("EPSV", 229).text)
    ftp.expect("SPAS", 503)                        # striped modes need MODE E
    ftp.expect("SPOR 127,0,0,1,4,1", 503)
    ftp.expect("MODE E", 200)
    spas = ftp.expect("SPAS", 229)
    assert len(spas.lines) >= 3 and find_host_ports(spas.text)
    ftp.expect("SPOR 127,0,0,1,4,1 127,0,0,1,4,2", 200)
    ftp.expect("SPOR", 501)
    ftp.expect("SPOR 127,0,0,1,0,80", 501)


def test_transfer_needs_a_data_connection_set_up(ftp, writable):
    ftp.expect("TYPE I", 200)
    ftp.expect("RETR /data/small", 425)            # stream mode, neither PORT nor PASV
    ftp.expect("MODE E", 200)
    ftp.pasv()
    ftp.expect("RETR /data/small", 503)            # MODE E: the sender connects, so RETR needs PORT/SPOR
    writable.expect("MODE E", 200)
    writable.expect("PORT 127,0,0,1,4,1", 200)
    writable.expect("STOR /up/x", 503)             # MODE E: the receiver listens, so STOR needs PASV/SPAS
    writable.expect("RETR /data/nope", 550)        # missing file is reported before any data set-up


# -- transfers: stream mode ------------------------------------------------------------------------------
def test_retr_stream_mode_passive_and_rest(ftp, tree):
    data = (tree / "data" / "f3m").read_bytes()
    ftp.expect("TYPE I", 200)
    addr = ftp.pasv()
    conn = socket.create_connection(addr)
    assert ftp.cmd("RETR /data/f3m").code == 150
    assert read_stream(conn) == data
    assert ftp.reply().code == 226
    addr = ftp.pasv()
    ftp.expect("REST 3000000", 350)
    conn = socket.create_connection(addr)
    assert ftp.cmd("RETR /data/f3m").code == 150
    assert read_stream(conn) == data[3000000:]
    assert ftp.reply().code == 226
    ftp.pasv()
    ftp.expect(f"REST {len(data) + 1}", 350)
    ftp.expect("RETR /data/f3m", 554)              # restart beyond the end
    ftp.pasv()
    ftp.expect("REST 0-10,20-30", 350)
    ftp.expect("RETR /data/f3m", 554)              # scattered ranges need MODE E
    addr = ftp.pasv()
    ftp.expect("REST 0-3000000", 350)              # one range from 0 is an offset
    conn = socket.create_connection(addr)
    assert ftp.cmd("RETR /data/f3m").code == 150
    assert read_stream(conn) == data[3000000:]
    assert ftp.reply().code == 226


def test_retr_stream_mode_active(ftp, tree):
    listener = listen()
    ftp.expect(f"PORT {port_arg(listener)}", 200)
    assert ftp.cmd("RETR /data/small").code == 150
    conn, _ = listener.accept()
    assert read_stream(conn) == (tree / "data" / "small").read_bytes()
    assert ftp.reply().code == 226


# -- transfers: MODE E ---------------------------------------------------------------------------------------
def test_retr_mode_e_parallel_streams(ftp, tree):
    data = (tree / "data" / "f3m").read_bytes()
    listener = listen()
    for line in ("TYPE I", "MODE E", "OPTS RETR Parallelism=3,3,3;", f"PORT {port_arg(listener)}"):
        assert ftp.cmd(line).ok
    assert ftp.cmd("RETR /data/f3m").code == 150
    conns = accept_n(listener, 3)                  # the sender opens the connections
    blocks, descs = read_mode_e(conns)
    assert ftp.reply().code == 226
    assert assemble(blocks) == data
    assert sum(1 for d in descs if d & DESC_EOD) == 3
    eofs = [d for d in descs if d & DESC_EOF]
    assert len(eofs) == 1


def test_spor_cannot_make_the_server_open_thousands_of_connections(ftp, tree):
    """SPOR named as many host-ports as a 32 KiB line holds (some 1,800), each then got OPTS RETR's parallelism
    (up to 64) of connections, each opened by a thread of its own: one RETR made the server start some 115,000
    threads and sockets, enough to take every descriptor of the process (the repository's container with it).
    Now SPOR takes at most 64 host-ports and a RETR opens at most 64 connections in all."""
    data = (tree / "data" / "f3m").read_bytes()
    listener = listen()
    listener.listen(1024)
    for line in ("TYPE I", "MODE E", "OPTS RETR Parallelism=64;"):
        assert ftp.cmd(line).ok
    ftp.expect("SPOR " + " ".join([port_arg(listener)] * 65), 501)
    ftp.expect("SPOR " + " ".join([port_arg(listener)] * 8), 200)
    assert ftp.cmd("RETR /data/f3m").code == 150
    conns = accept_n(listener, 64)                  # 8 x 64 = 512 without the bound
    blocks, descs = read_mode_e(conns)
    assert ftp.reply().code == 226
    assert assemble(blocks) == data and sum(1 for d in descs if d & DESC_EOD) == 64
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()                           # no 65th connection
    for c in conns:
        c.close()
    listener.close()


def test_retr_mode_e_rest_ranges_sends_only_the_missing(ftp, tree):
    data = (tree / "data" / "f3m").read_bytes()
    held = RangeSet([(0, 1_000_000), (2_000_000, 2_500_000)])
    listener = listen()
    for line in ("TYPE I", "MODE E", "OPTS RETR Parallelism=2,2,2;", f"PORT {port_arg(listener)}",
                 f"REST {held.format()}"):
        assert ftp.cmd(line).ok
    assert ftp.cmd("RETR /data/f3m").code == 150
    blocks, _ = read_mode_e(accept_n(listener, 2))
    assert ftp.reply().code == 226
    got = RangeSet((off, off + len(b)) for off, b in blocks.items())
    assert got == RangeSet(held.missing(0, len(data)))
    for off, b in blocks.items():
        assert data[off:off + len(b)] == b


@pytest.mark.parametrize("mode", ["S", "E"])
def test_eret_partial_retrieve(ftp, tree, mode):
    data = (tree / "data" / "f3m").read_bytes()
    listener = listen()
    for line in ("TYPE I", f"MODE {mode}", f"PORT {port_arg(listener)}"):
        assert ftp.cmd(line).ok
    assert ftp.cmd("ERET P 1000000 123457 /data/f3m").code == 150
    conn, _ = listener.accept()
    if mode == "E":
        blocks, _ = read_mode_e([conn])
        assert min(blocks) == 0                    # offsets are relative to the section
        payload = assemble(blocks)
    else:
        payload = read_stream(conn)
    assert ftp.reply().code == 226
    assert payload == data[1000000:1123457]
    ftp.expect("ERET X 1 2 /data/f3m", 501)
    ftp.expect("ERET P a 2 /data/f3m", 501)


def test_listings(ftp, tree):
    ftp.expect("TYPE A", 200)
    names = {}
    for verb in ("NLST", "LIST", "MLSD"):
        addr = ftp.pasv()
        conn = socket.create_connection(addr)
        assert ftp.cmd(f"{verb} /data").code == 150
        names[verb] = read_stream(conn).decode()
        assert ftp.reply().code == 226
    assert set(names["NLST"].split()) == {"empty", "f3m", "small"}
    assert re.search(r"^-r.* 3145745 .* f3m\r$", names["LIST"], re.M)
    assert "type=file;size=1000;" in names["MLSD"]
    mlst = ftp.expect("MLST /data/small", 250)
    assert "size=1000" in mlst.text and "type=file" in mlst.text
    assert "small" in ftp.expect("STAT /data", 213).text
    ftp.expect("MLST /nope", 550)


def test_paths_cannot_escape_the_tree(ftp, tree, tmp_path):
    outside = tmp_path / "secret"
    outside.write_text("secret")
    (tree / "data" / "link").symlink_to(outside)
    (tree / "data" / "dirlink").symlink_to(tmp_path)
    ftp.expect("SIZE /data/link", 550)
    ftp.expect("SIZE /data/dirlink/secret", 550)
    ftp.expect("SIZE /../secret", 550)
    ftp.expect("CKSM MD5 0 -1 ../../secret", 550)
    ftp.expect("CWD /data/dirlink", 550)


def test_names_with_control_characters_are_neither_served_nor_listed(ftp, tree):
    """A name with a control character (a local process, a job, can make one) is left out of every listing: a
    CR/LF in it would forge a listing's lines, an ESC reach the reader's terminal. No path holding one (C0 or DEL)
    can be asked for either."""
    forged = "x\r\ntype=file;size=1; forged"
    (tree / "data" / forged).write_text("no")
    (tree / "data" / "esc\x1b[2Jname").write_text("no")
    ftp.expect("TYPE A", 200)
    for verb in ("NLST", "LIST", "MLSD"):
        addr = ftp.pasv()
        conn = socket.create_connection(addr)
        assert ftp.cmd(f"{verb} /data").code == 150
        listing = read_stream(conn).decode()
        assert ftp.reply().code == 226
        assert "forged" not in listing and "\x1b" not in listing and "small" in listing, verb
    for name in ("esc\x1b[2Jname", "tab\tname", "del\x7fname"):
        assert "control characters" in ftp.expect(f"SIZE /data/{name}", 550).text


def test_denied_paths_via_authorization_callback(start_server):
    decisions = []

    def authorize(dn, op, path):
        decisions.append((dn, op, path))
        return path not in ("/data/f3m", "/data/absent") and not (op == "list" and path == "/data")

    server = start_server(authorize=authorize)
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    s.expect("SIZE /data/small", 213)
    # a path one may not read: the same answer whether it exists or not (no oracle), naming both causes
    assert s.expect("SIZE /data/f3m", 550).text == "/data/f3m: no such file, or permission denied."
    assert s.expect("SIZE /data/absent", 550).text == "/data/absent: no such file, or permission denied."
    assert s.expect("SIZE /data/missing", 550).text == "/data/missing: no such file or directory."   # one may read
    s.expect("CKSM SHA256 0 -1 /data/f3m", 550)
    s.expect("MDTM /data/f3m", 550)
    s.pasv()
    s.expect("RETR /data/f3m", 550)
    s.pasv()
    s.expect("LIST /data", 550)
    s.expect("CWD /data", 550)
    assert (None, "read", "/data/small") in decisions          # anonymous sessions have no DN
    assert (None, "read", "/data/f3m") in decisions


def test_a_failing_authorization_callback_denies(start_server):
    def authorize(dn, op, path):
        raise RuntimeError("policy store unavailable")

    server = start_server(authorize=authorize)
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    s.expect("SIZE /data/small", 550)


# -- uploads -------------------------------------------------------------------------------------------------------
def test_anonymous_sessions_are_read_only(start_server, tree):
    server = start_server(upload_area="/up")           # an upload area, but no test-only write flag
    ftp = RawFTP("127.0.0.1", server.port)
    ftp.login_anonymous()
    ftp.pasv()
    assert "read-only" in ftp.expect("STOR /up/new", 550).text
    ftp.expect("MKD /up/dir", 550)
    ftp.expect("DELE /data/small", 550)
    ftp.expect("RNFR /data/small", 550)
    ftp.expect("ESTO A 0 /up/new", 550)
    assert not (tree / "up" / "new").exists()


def test_writes_only_inside_the_upload_area(writable, tree):
    writable.pasv()
    assert "upload area" in writable.expect("STOR /data/new", 550).text
    writable.expect("DELE /data/small", 550)
    writable.expect("MKD /data/x", 550)
    assert (tree / "data" / "small").exists()


@pytest.mark.parametrize("command", ["STOR /up/x.vmgrid-part", "STOR /data/new", "RETR /up/absent",
                                     "RETR /up/x.vmgrid-part.ranges", "LIST /nowhere"])
def test_a_refused_transfer_closes_its_passive_listener(writable, command):
    """Whatever refuses a transfer command (a reserved name, the upload area, a missing path), the passive port it
    was to use is closed with the refusal: nothing listens there for a client to connect to later."""
    host, port = writable.pasv()
    assert writable.cmd(command).code in (550, 553)
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=5).close()
    writable.pasv()                                   # the session goes on
    assert writable.cmd("STOR /up/after.bin").code == 150


def test_stor_stream_mode(writable, tree):
    payload = os.urandom(200_000)
    addr = writable.pasv()
    writable.expect(f"ALLO {len(payload)}", 200)
    assert writable.cmd("STOR /up/s.bin").code == 150
    conn = socket.create_connection(addr)
    conn.sendall(payload)
    conn.close()
    assert writable.reply().code == 226
    assert (tree / "up" / "s.bin").read_bytes() == payload
    assert writable.expect("CKSM SHA256 0 -1 /up/s.bin", 213).text == hashlib.sha256(payload).hexdigest()


def test_stor_mode_e_out_of_order_blocks_and_markers(writable, tree):
    payload = os.urandom(3 * MiB)
    writable.expect("MODE E", 200)
    writable.expect(f"ALLO {len(payload)}", 200)
    writable.expect(f"SCKS SHA256 {hashlib.sha256(payload).hexdigest()}", 200)
    addr = find_host_ports(writable.expect("SPAS", 229).text)[0]
    assert writable.cmd("STOR /up/e.bin").code == 150
    a, b = socket.create_connection(addr), socket.create_connection(addr)
    send_mode_e(a, [(2 * MiB, payload[2 * MiB:])], eod_count=None)
    time.sleep(0.6)                                     # markers go out every 0.2 s on this server
    send_mode_e(b, [(0, payload[:MiB]), (MiB, payload[MiB:2 * MiB])], eod_count=2)
    replies = []
    while True:
        r = writable.reply()
        replies.append(r)
        if not r.preliminary:
            break
    assert replies[-1].code == 226
    assert (tree / "up" / "e.bin").read_bytes() == payload
    markers = RangeSet()
    for r in replies:
        if r.code == 111:
            markers.update(RangeSet.parse(r.text.split()[-1]))
    assert markers == RangeSet([(0, len(payload))])
    first_111 = next(r for r in replies if r.code == 111)
    assert RangeSet.parse(first_111.text.split()[-1]) == RangeSet([(2 * MiB, 3 * MiB)])
    assert any(r.code == 112 and "Stripe Bytes Transferred" in r.text for r in replies)


def test_a_mode_e_store_takes_at_most_64_data_connections(writable, tree):
    """A MODE E STOR accepted every data connection a client opened, each with a receiving thread of its own:
    thousands of them from one client cost the server process as many threads and descriptors. The 65th now
    fails the store (what arrived is kept for a restart, as for any failed store)."""
    writable.expect("TYPE I", 200)
    writable.expect("MODE E", 200)
    addr = writable.pasv()
    assert writable.cmd("STOR /up/many").code == 150
    conns = [socket.create_connection(addr) for _ in range(65)]
    final = writable.reply()
    while final.preliminary:
        final = writable.reply()
    assert final.code >= 400 and "more than 64 data connections" in final.text
    for c in conns:
        c.close()
    assert not (tree / "up" / "many").exists()


def test_stor_checksum_mismatch_is_refused_and_nothing_appears(writable, tree):
    payload = os.urandom(100_000)
    addr = writable.pasv()
    writable.expect(f"SCKS SHA256 {'0' * 64}", 200)
    assert writable.cmd("STOR /up/bad.bin").code == 150
    conn = socket.create_connection(addr)
    conn.sendall(payload)
    conn.close()
    assert writable.reply().code == 554
    assert not (tree / "up" / "bad.bin").exists()
    assert list((tree / "up").iterdir()) == []


def test_stor_cut_then_restart_with_rest_ranges(writable, tree):
    payload = os.urandom(3 * MiB)
    writable.expect("MODE E", 200)
    writable.expect(f"ALLO {len(payload)}", 200)
    addr = writable.pasv()
    assert writable.cmd("STOR /up/r.bin").code == 150
    conn = socket.create_connection(addr)
    conn.sendall(BLOCK_HEADER.pack(0, MiB, MiB) + payload[MiB:2 * MiB])
    conn.close()                                    # cut: no EOD, no EOF
    replies = [writable.reply()]
    while replies[-1].preliminary:
        replies.append(writable.reply())
    assert replies[-1].code == 426
    held = RangeSet()
    for r in replies:
        if r.code == 111:
            held.update(RangeSet.parse(r.text.split()[-1]))
    assert held == RangeSet([(MiB, 2 * MiB)])
    assert not (tree / "up" / "r.bin").exists()         # not under its final name
    writable.expect("SIZE /up/r.bin", 550)
    writable.expect("SIZE /up/r.bin.vmgrid-part", 550)  # the machinery's files are not served
    assert "r.bin" not in writable.expect("STAT /up", 213).text   # nor listed

    # claiming more than the server holds is refused
    writable.expect(f"ALLO {len(payload)}", 200)
    addr = writable.pasv()
    writable.expect(f"REST 0-{2 * MiB}", 350)
    writable.expect("STOR /up/r.bin", 554)

    writable.expect(f"ALLO {len(payload)}", 200)
    writable.expect(f"SCKS SHA256 {hashlib.sha256(payload).hexdigest()}", 200)
    addr = writable.pasv()
    writable.expect(f"REST {held.format()}", 350)
    assert writable.cmd("STOR /up/r.bin").code == 150
    conn = socket.create_connection(addr)
    send_mode_e(conn, [(0, payload[:MiB]), (2 * MiB, payload[2 * MiB:])])
    final = writable.reply()
    while final.preliminary:
        final = writable.reply()
    assert final.code == 226
    assert sha256_of(tree / "up" / "r.bin") == hashlib.sha256(payload).hexdigest()
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["r.bin"]      # sidecar and part file gone


def test_stor_with_corrupt_flagged_block_is_not_committed(writable, tree):
    payload = os.urandom(100_000)
    writable.expect("MODE E", 200)
    writable.expect(f"ALLO {len(payload)}", 200)
    addr = writable.pasv()
    assert writable.cmd("STOR /up/c.bin").code == 150
    conn = socket.create_connection(addr)
    conn.sendall(BLOCK_HEADER.pack(32, len(payload), 0) + payload)   # 32: "suspected errors in data block"
    conn.sendall(BLOCK_HEADER.pack(DESC_EOF, 0, 1) + BLOCK_HEADER.pack(DESC_EOD, 0, 0))
    final = writable.reply()
    while final.preliminary:
        final = writable.reply()
    assert final.code == 451
    assert not (tree / "up" / "c.bin").exists()


def test_esto_adjusted_store(writable, tree):
    target = tree / "up" / "patch.bin"
    target.write_bytes(b"A" * 1000)
    writable.expect("MODE E", 200)
    addr = writable.pasv()
    assert writable.cmd("ESTO A 500 /up/patch.bin").code == 150
    conn = socket.create_connection(addr)
    send_mode_e(conn, [(0, b"B" * 100), (100, b"C" * 50)])
    final = writable.reply()
    while final.preliminary:
        final = writable.reply()
    assert final.code == 226
    assert target.read_bytes() == b"A" * 500 + b"B" * 100 + b"C" * 50 + b"A" * 350
    writable.expect("ESTO X 0 /up/patch.bin", 501)
    writable.pasv()
    writable.expect("ESTO A 0 /data/small", 550)


def test_namespace_commands_in_the_upload_area(writable, tree):
    assert writable.expect("MKD /up/dir", 257).text.startswith('"/up/dir"')
    writable.expect("MKD /up/dir", 550)
    (tree / "up" / "dir" / "f").write_bytes(b"x")
    writable.expect("RNTO /up/g", 503)                 # RNTO without RNFR
    writable.expect("RNFR /up/dir/f", 350)
    writable.expect("RNTO /up/dir/g", 250)
    assert (tree / "up" / "dir" / "g").exists()
    writable.expect("RMD /up/dir", 550)                # not empty
    writable.expect("DELE /up/dir/g", 250)
    writable.expect("DELE /up/dir/g", 550)
    writable.expect("RMD /up/dir", 250)
    writable.expect("APPE /up/x", 502)
    writable.expect("STOU", 502)


# -- aborts, limits, TLS commands without TLS -----------------------------------------------------------------------
def test_abor_stops_a_transfer_and_the_session_goes_on(start_server, tree):
    make_file(tree / "data" / "big", 8 * MiB)
    server = start_server(max_rate=2 * MiB)            # slow enough to be mid-transfer when ABOR comes
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    addr = s.pasv()
    conn = socket.create_connection(addr)
    assert s.cmd("RETR /data/big").code == 150
    received = []
    reader = threading.Thread(target=lambda: received.append(read_stream(conn)))
    reader.start()
    time.sleep(0.5)
    s.ctl.sock.sendall(b"\xff\xf4\xff\xf2ABOR\r\n")     # Telnet IP and Synch before ABOR (RFC 959)
    assert s.reply().code == 426
    assert s.reply().code == 226
    reader.join(10)
    assert 0 < len(received[0]) < 8 * MiB
    s.expect("NOOP", 200)
    s.expect("ABOR", 226)                              # nothing to abort


def test_too_many_sessions_get_421(start_server):
    server = start_server(max_sessions=1)
    first = RawFTP("127.0.0.1", server.port)
    second = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    assert second.recv(100).startswith(b"421")
    first.close()


def test_security_commands_without_tls(ftp, start_server):
    server = start_server()
    s = RawFTP("127.0.0.1", server.port)
    s.expect("AUTH GSSAPI", 504)
    s.expect("AUTH TLS", 431)                          # no host credential configured
    s.expect("PBSZ 0", 503)
    s.expect("PROT P", 503)
    s.expect("DCAU A", 503)
    s.expect("CCC", 533)
    s.expect("ADAT abc", 503)
    ftp.expect("AUTH TLS", 503)                        # after login


def test_size_limits_without_and_with_allo(start_server, tree):
    server = start_server(upload_area="/up", insecure_anonymous_writes=True, max_file_size=MiB)
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    s.expect(f"ALLO {MiB + 1}", 552)
    s.expect("MODE E", 200)
    addr = s.pasv()
    assert s.cmd("STOR /up/huge").code == 150
    conn = socket.create_connection(addr)
    conn.sendall(BLOCK_HEADER.pack(DESC_EOF, 0, 1)
                 + BLOCK_HEADER.pack(DESC_EOD, 10, 1 << 40) + b"x" * 10)     # a block far past the limit
    final = s.reply()
    while final.preliminary:
        final = s.reply()
    # no ALLO announced a size: the bound is the server's, which the 552 names (it said "426 ... beyond the announced
    # size 1048576", a size nobody announced)
    assert final.code == 552 and f"Files may not exceed {MiB} bytes here (the server's max_file_size)" in final.text
    assert "announced" not in final.text
    assert not (tree / "up" / "huge").exists()
    assert list((tree / "up").iterdir()) == []           # nor its partial file
    # with ALLO, the bound is the size announced: more than that is the client's error (426, naming it)
    s.expect("ALLO 10", 200)
    addr = s.pasv()
    assert s.cmd("STOR /up/small").code == 150
    conn = socket.create_connection(addr)
    conn.sendall(BLOCK_HEADER.pack(0, 20, 0) + b"y" * 20)
    final = s.reply()
    while final.preliminary:
        final = s.reply()
    assert final.code == 426 and "beyond the announced size 10" in final.text


def _send_all(conn: socket.socket, chunks) -> BaseException | None:
    """Send every chunk, then end the stream: None, or the error that stopped the sender (a reset)."""
    try:
        for chunk in chunks:
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
    except OSError as exc:
        return exc
    return None


@pytest.mark.parametrize("mode", ["S", "E"])
def test_a_store_past_its_bound_is_read_to_its_end_before_the_refusal(start_server, tree, monkeypatch, mode):
    """A STOR without ALLO running past max_file_size: the server cut the data connection at the bound (a reset
    under the sender's next write) and answered 552 at once; globus-url-copy sending a pipe, answered between two
    of its writes, waited for ever (the interop test's hang). Now what the sender still sends is read and dropped,
    the sender finishes without a reset, and the 552 comes after its end; nothing is kept. The drain is bounded:
    past DRAIN_BYTES the connection is cut (the sender's write fails) and the 552 is said all the same."""
    from gridftp import datachannel
    server = start_server(upload_area="/up", insecure_anonymous_writes=True, max_file_size=MiB)
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    s.expect(f"MODE {mode}", 200)
    piece = b"x" * MiB

    def chunks(n):
        if mode == "S":
            return [piece] * n
        return [BLOCK_HEADER.pack(DESC_EOF, 0, 1)] + [
            BLOCK_HEADER.pack(DESC_EOD if i == n - 1 else 0, MiB, i * MiB) + piece for i in range(n)]

    for sent, drain_bytes, reset in ((32, datachannel.DRAIN_BYTES, False), (96, 4 * MiB, True)):
        monkeypatch.setattr(datachannel, "DRAIN_BYTES", drain_bytes)
        addr = s.pasv()
        assert s.cmd("STOR /up/big").code == 150
        conn = socket.create_connection(addr)
        stopped = _send_all(conn, chunks(sent))     # 32 MiB: far more than the sockets' buffers hold
        final = _final(s)
        conn.close()
        assert (stopped is not None) == reset, stopped
        assert final.code == 552 and f"Files may not exceed {MiB} bytes here" in final.text, final.text
        assert list((tree / "up").iterdir()) == []


class _QuotaSpace:
    """The served tree with a quota of ``quota`` bytes on /up (what a repository's upload area has)."""

    def __new__(cls, root, quota):
        from gridftp.filespace import LocalFileSpace

        class Space(LocalFileSpace):
            def quota(self, vpath):
                return (self.root / "up", quota) if vpath.startswith("/up/") else None
        return Space(root)


def _final(s: RawFTP):
    final = s.reply()
    while final.preliminary:
        final = s.reply()
    return final


def test_an_upload_area_quota_refuses_what_does_not_fit_and_keeps_nothing_of_it(start_server, tree):
    """A quota on the upload area: a STOR whose ALLO does not fit gets 552 before its 150; one without ALLO
    (MODE S or E) is cut at the room left, 552 naming the quota and the usage, its partial file removed; two
    stores at once share the room (each is granted its ALLO, or all that is left). Without the quota any
    upload of any size landed (up to the 1 TiB per-file cap)."""
    (tree / "up" / "old").write_bytes(b"o" * 40_000)
    server = start_server(_QuotaSpace(tree, 100_000), upload_area="/up", insecure_anonymous_writes=True)
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    s.expect("ALLO 60001", 200)
    s.pasv()
    refused = s.expect("STOR /up/big", 552)                  # no 150: nothing is written
    assert "40000 of your 100000 bytes" in refused.text
    assert not (tree / "up" / "big").exists() and not list((tree / "up").glob("big*"))
    # without ALLO, in stream mode: cut at the room left (60,000 bytes), refused, nothing kept
    addr = s.pasv()
    assert s.cmd("STOR /up/big").code == 150
    conn = socket.create_connection(addr)
    try:
        conn.sendall(b"x" * 70_000)
    except OSError:
        pass
    conn.close()
    final = _final(s)
    assert final.code == 552 and "quota" in final.text and "100000 of your 100000 bytes" in final.text
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["old"]
    # ESTO at an offset past the room: refused before its 150, no empty file made for it (one was left behind)
    s.pasv()
    assert s.cmd("ESTO A 60000 /up/esto").code == 552
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["old"]
    # MODE E, a block past the room
    s.expect("MODE E", 200)
    addr = s.pasv()
    assert s.cmd("STOR /up/big").code == 150
    conn = socket.create_connection(addr)
    conn.sendall(BLOCK_HEADER.pack(DESC_EOF, 0, 1) + BLOCK_HEADER.pack(DESC_EOD, 65_000, 0) + b"x" * 65_000)
    final = _final(s)
    assert final.code == 552 and "quota" in final.text
    conn.close()
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["old"]
    # what fits is stored; replacing a file counts it once
    s.expect("MODE S", 200)
    for _ in range(2):
        addr = s.pasv()
        assert s.cmd("STOR /up/fits").code == 150
        conn = socket.create_connection(addr)
        conn.sendall(b"f" * 60_000)
        conn.close()
        assert _final(s).code == 226
    assert (tree / "up" / "fits").stat().st_size == 60_000
    s.expect("DELE /up/fits", 250)
    # two stores at once: the first is granted its ALLO, the second only what is left
    other = RawFTP("127.0.0.1", server.port)
    other.login_anonymous()
    s.expect("ALLO 50000", 200)
    s.pasv()
    assert s.cmd("STOR /up/one").code == 150                 # waits for its data connection
    other.expect("ALLO 20000", 200)
    other.pasv()
    assert "90000 of your 100000 bytes" in other.expect("STOR /up/two", 552).text
    s.ctl.sock.sendall(b"ABOR\r\n")
    assert s.reply().code == 426 and s.reply().code == 226
    other.expect("ALLO 20000", 200)
    other.pasv()
    assert other.cmd("STOR /up/two").code == 150             # the aborted store's room is free again
    other.ctl.sock.sendall(b"ABOR\r\n")
    assert other.reply().code == 426 and other.reply().code == 226
    other.close()
    # what an abandoned upload left counts, and DELE of its name removes it (and its restart state)
    s.expect("DELE /up/one", 250)
    s.expect("DELE /up/two", 250)
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["old"]
    s.expect("MODE S", 200)
    s.expect("ALLO 50000", 200)
    addr = s.pasv()
    assert s.cmd("STOR /up/left").code == 150
    conn = socket.create_connection(addr)
    conn.sendall(b"l" * 30_000)
    conn.close()
    assert _final(s).code == 451                             # 30,000 of the 50,000 announced: kept to restart
    left = sum(p.stat().st_size for p in (tree / "up").glob("left.vmgrid-part*"))
    assert left >= 30_000
    s.expect("ALLO 40000", 200)
    s.pasv()
    assert f"{40_000 + left} of your 100000 bytes" in s.expect("STOR /up/more", 552).text
    s.expect("DELE /up/left", 250)
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["old"]
    s.expect("ALLO 40000", 200)
    s.pasv()
    assert s.cmd("STOR /up/more").code == 150
    s.close()


def test_a_quota_bounds_the_number_of_names_too(start_server, tree):
    """Empty files cost no bytes of a quota but an inode each: any VO member could fill the repository's file
    system with millions of them (or of directories, MKD) in their upload area. A quota's directory now holds at
    most max_quota_names files and directories; replacing or deleting one is always possible."""
    server = start_server(_QuotaSpace(tree, 100_000), upload_area="/up", insecure_anonymous_writes=True,
                          max_quota_names=3)
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()

    def store(name: str) -> int:
        addr = s.pasv()
        reply = s.cmd(f"STOR /up/{name}")
        if reply.code != 150:
            return reply.code
        socket.create_connection(addr).close()        # an empty file
        return _final(s).code

    assert [store(n) for n in ("a", "b")] == [226, 226]
    s.expect("MKD /up/d", 257)
    s.pasv()
    refused = s.cmd("STOR /up/c")
    assert refused.code == 552 and "at most 3 files and directories" in refused.text
    assert s.cmd("MKD /up/e").code == 552
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["a", "b", "d"]
    assert store("a") == 226                           # replacing a name takes no new one
    s.expect("DELE /up/b", 250)
    assert store("c") == 226
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["a", "c", "d"]


def test_one_path_is_stored_by_one_session_at_a_time(writable, start_server, tree):
    other = RawFTP("127.0.0.1", writable.server.port)
    other.login_anonymous()
    writable.pasv()
    assert writable.cmd("STOR /up/same").code == 150          # waits for its data connection
    other.pasv()
    other.expect("STOR /up/same", 450)
    writable.ctl.sock.sendall(b"ABOR\r\n")
    assert writable.reply().code == 426
    assert writable.reply().code == 226
    other.pasv()
    assert other.cmd("STOR /up/same").code == 150             # free again


def test_a_226_after_abor_means_the_path_is_free(writable, monkeypatch):
    """Issue 9: the 226 that closes an aborted STOR was sent before the session released the path,
    so a client's next STOR of it could meet 450. Records the order of the two events on the server."""
    from gridftp.control import ControlChannel
    from gridftp.server import GridFTPServer

    events: list[str] = []
    send_reply, release = ControlChannel.send_reply, GridFTPServer.release

    def recording_send(channel, code, text):
        events.append(f"reply {code}")
        send_reply(channel, code, text)

    def recording_release(server, vpath):
        events.append(f"release {vpath}")
        release(server, vpath)

    monkeypatch.setattr(ControlChannel, "send_reply", recording_send)
    monkeypatch.setattr(GridFTPServer, "release", recording_release)
    writable.pasv()
    assert writable.cmd("STOR /up/again").code == 150
    writable.ctl.sock.sendall(b"ABOR\r\n")
    assert writable.reply().code == 426
    assert writable.reply().code == 226
    assert events.index("release /up/again") < events.index("reply 226")
    # and a STOR that completes: its 226 comes after the release as well
    events.clear()
    addr = writable.pasv()
    conn = socket.create_connection(addr)
    assert writable.cmd("STOR /up/again").code == 150
    conn.sendall(b"12345")
    conn.close()
    assert writable.reply().code == 226
    assert events.index("release /up/again") < events.index("reply 226")


def _another_host() -> str | None:
    """A local address that is not loopback (the one a route to TEST-NET-1 would leave from; no packet is sent), or
    None: a session from it counts as another host than any loopback address."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_connections_that_never_log_in_cannot_hold_the_server(start_server):
    """One host opening control connections and never logging in (idle, or trickling a line a byte at a time)
    held every session until idle_timeout (900 s), and NOOPs kept them for ever: no one else could connect.
    The host is loopback (all of 127.0.0.0/8 is one host for the bound, as for the logged-in ones); the other host
    connects from a local address that is not loopback."""
    other = _another_host()
    if other is None:
        pytest.skip("no local address other than loopback to connect from as another host")
    server = start_server(max_sessions=8, login_timeout=2)
    attacker = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.settimeout(30)
        s.connect(("127.0.0.1", server.port))
        attacker.append(s)
    greetings = [s.recv(200) for s in attacker]
    assert [g[:3] for g in greetings] == [b"220", b"220", b"421"]    # one host: at most 8 // 4 not logged in
    legit = RawFTP("127.0.0.1", server.port, source=other)            # another host still gets in
    legit.login_anonymous()
    legit.expect("NOOP", 200)
    # the waiting connections are closed at the login deadline, NOOPs or a trickled line notwithstanding
    idle, trickle = attacker[0], attacker[1]
    idle.sendall(b"NOOP\r\n")
    assert idle.recv(200).startswith(b"200")
    for byte in b"NOO":
        trickle.sendall(bytes([byte]))
    for s in (idle, trickle):
        tail = b""
        while chunk := s.recv(200):                   # the server ends them (a test timeout otherwise)
            tail += chunk
        assert tail == b"" or tail.startswith(b"421")
    for s in attacker:
        s.close()
    legit.close()
