"""A kept-alive connection the server closes as the next request goes out (its idle limit meeting the request)
is not an error for the caller: the transport sends the same bytes once more on a new connection. A real HTTP
peer on loopback (a socket server written for the test, so it can close at exactly that moment)."""
from __future__ import annotations

import socket
import threading

import pytest
import requests

from security.client import GridTransport

ANSWER = b"<answer/>"


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += conn.recv(65536)
    return body


def _answer(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))


class Peer:
    """Connection 1: answers its first request and closes when the second arrives, unanswered.
    Every later connection: answers each request (or, with ``always_drop``, closes on every second request)."""

    def __init__(self, always_drop: bool = False):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.bodies: list[bytes] = []
        self.connections = 0
        self.always_drop = always_drop
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            first = self.connections == 1
            with conn:
                served = 0
                while True:
                    body = _read_request(conn)
                    if not body:
                        break
                    self.bodies.append(body)
                    served += 1
                    if (first or self.always_drop) and served == 2:
                        break                      # closed without an answer
                    if self.always_drop and not first:
                        break
                    _answer(conn)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def transport(tmp_path):
    t = GridTransport(None, cert_dir=tmp_path)
    yield t
    t.session.close()


def test_a_request_meeting_the_servers_close_is_sent_again_unchanged(transport):
    peer = Peer()
    url = f"http://127.0.0.1:{peer.port}/svc"
    try:
        assert transport.post(url, b"<one/>", {"Content-Type": "text/xml"}).content == ANSWER
        response = transport.post(url, b"<two signed='x'/>", {"Content-Type": "text/xml"})
        assert response.content == ANSWER
        assert peer.bodies == [b"<one/>", b"<two signed='x'/>", b"<two signed='x'/>"]
        assert peer.connections == 2
    finally:
        peer.close()


def test_it_is_sent_again_once_only(transport):
    peer = Peer(always_drop=True)
    url = f"http://127.0.0.1:{peer.port}/svc"
    try:
        transport.post(url, b"<one/>", {"Content-Type": "text/xml"})
        with pytest.raises(requests.exceptions.ConnectionError):
            transport.post(url, b"<two/>", {"Content-Type": "text/xml"})
        assert peer.bodies == [b"<one/>", b"<two/>", b"<two/>"]
    finally:
        peer.close()


def test_a_refused_connection_is_not_retried(transport):
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(requests.exceptions.ConnectionError) as info:
        transport.post(f"http://127.0.0.1:{port}/svc", b"<x/>", {"Content-Type": "text/xml"})
    assert "refused" in str(info.value).lower()
