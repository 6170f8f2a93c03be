"""Helpers shared by the GridFTP tests: files, a raw control connection, servers in threads and processes."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from gridftp.control import ControlChannel
from gridftp.protocol import BLOCK_HEADER, DESC_EOD, DESC_EOF, Reply, find_host_ports

REPO = Path(__file__).resolve().parents[3]
MiB = 1 << 20


def make_file(path: Path, size: int) -> Path:
    """A file of random bytes (every block distinct, so misplaced data cannot go unnoticed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, MiB)
            fh.write(os.urandom(n))
            left -= n
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RawFTP:
    """A bare control connection for conformance tests: send lines, read replies, move raw data."""

    def __init__(self, host: str, port: int, timeout: float = 10, source: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.ctl = ControlChannel(self.sock)
        self.greeting = self.ctl.read_reply()

    def cmd(self, line: str) -> Reply:
        self.ctl.send_line(line)
        return self.ctl.read_reply()

    def reply(self) -> Reply:
        return self.ctl.read_reply()

    def expect(self, line: str, code: int) -> Reply:
        reply = self.cmd(line)
        assert reply.code == code, f"{line!r}: expected {code}, got {reply.code} {reply.text}"
        return reply

    def login_anonymous(self) -> None:
        self.expect("USER anonymous", 331)
        self.expect("PASS test@", 230)

    def starttls(self, context: ssl.SSLContext) -> None:
        self.expect("AUTH TLS", 234)
        self.sock = self.ctl.start_tls(context, server_side=False)

    def pasv(self) -> tuple[str, int]:
        reply = self.expect("PASV", 227)
        return find_host_ports(reply.text)[0]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def noop_until_refused(session: RawFTP, every: float = 0.05, at_most: float = 30) -> Reply:
    """Send NOOP every ``every`` seconds until a reply is not 200 (a session closed for want of a transfer), which
    is returned; fails after ``at_most`` seconds."""
    for _ in range(int(at_most / every)):
        reply = session.cmd("NOOP")
        if reply.code != 200:
            return reply
        time.sleep(every)
    raise AssertionError(f"NOOPs still answered 200 after {at_most} s")


def read_stream(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_mode_e(conns: list[socket.socket]) -> tuple[dict[int, bytes], list[int]]:
    """Read MODE E blocks from already-accepted connections: ({offset: data}, descriptors seen)."""
    blocks: dict[int, bytes] = {}
    descs: list[int] = []
    for conn in conns:
        while True:
            header = _exact(conn, BLOCK_HEADER.size)
            desc, count, offset = BLOCK_HEADER.unpack(header)
            descs.append(desc)
            if count and not desc & DESC_EOF:
                blocks[offset] = _exact(conn, count)
            if desc & DESC_EOD:
                break
    return blocks, descs


def assemble(blocks: dict[int, bytes]) -> bytes:
    out = bytearray()
    for offset in sorted(blocks):
        data = blocks[offset]
        if len(out) < offset + len(data):
            out.extend(bytes(offset + len(data) - len(out)))
        out[offset:offset + len(data)] = data
    return bytes(out)


def send_mode_e(conn: socket.socket, blocks: list[tuple[int, bytes]], eod_count: int | None = 1) -> None:
    for offset, data in blocks:
        conn.sendall(BLOCK_HEADER.pack(0, len(data), offset) + data)
    if eod_count is not None:
        conn.sendall(BLOCK_HEADER.pack(DESC_EOF, 0, eod_count))
    conn.sendall(BLOCK_HEADER.pack(DESC_EOD | 4, 0, 0))


def _exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class ServerProcess:
    """`vmgrid gridftp-server` in a child process (so a test can SIGKILL it)."""

    def __init__(self, root: Path, *args: str, port: int = 0, env: dict | None = None):
        cmd = [sys.executable, "-m", "client.cli", "gridftp-server", "--root", str(root), "--port", str(port),
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def wait_for(predicate, timeout: float = 20, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


CLIENT_SCRIPT = """
import sys
from gridftp import download, upload
op, src, dst, parallel, state, rate = sys.argv[1:7]
if op == "download":
    download(src, dst, int(parallel), retries=0)
else:
    upload(src, dst, int(parallel), retries=0, state_dir=state, max_rate=float(rate))
print("done", flush=True)
"""


def client_process(op: str, src: str, dst: str, *, parallel: int = 4, state_dir: Path | None = None,
                   max_rate: float = 0) -> subprocess.Popen:
    """A download or upload in a child process (so a test can SIGKILL the client)."""
    return subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, op, src, str(dst), str(parallel),
                             str(state_dir or ""), str(max_rate)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cut_connections_to(port: int) -> None:
    """Destroy every TCP connection to 127.0.0.1:port in the kernel (`ss -K`): both ends see it break."""
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"], check=True,
                   capture_output=True)
