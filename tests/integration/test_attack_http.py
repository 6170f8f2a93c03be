"""The container's HTTP front end (httptools/llhttp) attacked from outside as a client with no credential:
request framing and header tricks. The real container on loopback (plain HTTP: the framing is the same under
TLS) with an application that records what reached it; the clients are raw sockets. Each test checks what
was answered and what the application saw."""
from __future__ import annotations

import socket
import time

import pytest

from services.container.server import ConnectionLimits, Container

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def served():
    seen: list[dict] = []

    def app(environ, start_response):
        seen.append({k: v for k, v in environ.items() if k.startswith("HTTP_") or k == "CONTENT_TYPE"}
                    | {"body": environ["wsgi.input"].read()})
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]

    c = Container([], middleware=lambda _: app, threads=2, limits=ConnectionLimits(max_header_bytes=8192)).start()
    yield c, seen
    c.stop()


def exchange(c: Container, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", c.port), timeout=60) as s:
        try:
            s.sendall(data)
        except OSError:          # cut off while sending: what it answered before is still read
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"


def test_trailer_fields_do_not_override_the_head(served):
    """A trailer after the signed body may not change the Content-Type or SOAPAction the request was routed on."""
    c, seen = served
    answer = exchange(c, CHUNKED + b"SOAPAction: evil\r\nContent-Type: text/evil\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert seen == [{"HTTP_HOST": "x", "HTTP_CONNECTION": "close", "body": b"abc"}]


def test_trailer_fields_beyond_the_head_limit_are_refused(served):
    """Trailer fields without end (each a header field to llhttp) are cut off at the head's limit: 431, and
    nothing reaches the application (they were kept, one Python tuple each: hundreds of MB a second)."""
    c, seen = served
    answer = exchange(c, CHUNKED + b"a:b\r\n" * 4000 + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert seen == []


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent_Type: text/evil\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nSOAP_Action: y\r\nSOAPAction: x\r\nConnection: close\r\n\r\n",
    b"GET /\r\n\r\n",                                        # HTTP/0.9
], ids=["underscore-content-type", "underscore-soapaction", "http09"])
def test_ambiguous_requests_are_refused(served, request_bytes):
    c, seen = served
    assert exchange(c, request_bytes).startswith(b"HTTP/1.1 400 ")
    assert seen == []


@pytest.mark.parametrize("request_bytes", [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
], ids=["te-and-cl", "two-cl", "cl-plus", "cl-list", "chunk-size-overflow", "chunk-bare-lf", "te-gzip",
        "te-identity", "bare-lf", "obs-fold", "space-before-colon", "nul-in-value", "cl-overflow", "h2-preface"])
def test_smuggling_and_framing_tricks_are_refused(served, request_bytes):
    """Each is answered 400 and closed; nothing (in particular no smuggled second request) reaches the app."""
    c, seen = served
    answer = exchange(c, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1
    assert seen == []


def test_chunk_extensions_are_ignored(served):
    c, seen = served
    answer = exchange(c, b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3;a=b\r\nabc\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and seen[0]["body"] == b"abc"


def test_upgrade_and_connect_end_the_connection(served):
    """Nothing after an Upgrade or CONNECT request is parsed as HTTP (no tunnel, no second request)."""
    c, seen = served
    for first in (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                  b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n"):
        answer = exchange(c, first + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.count(b"HTTP/1.1 ") == 1
    assert len(seen) == 2


def test_a_body_over_the_limit_is_not_invited_with_100_continue(served):
    """Expect: 100-continue with a Content-Length over max_body_bytes: the 413 alone, no "100 Continue" first
    (which told the client to send the 16 MiB it would then be cut off in)."""
    c, seen = served
    answer = exchange(c, b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 999999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert seen == []


def test_a_client_that_never_reads_its_answer_is_cut_off():
    """Slow read: a client asks for a large answer and reads nothing; once the kernel's buffers are full the
    container waits body_grace plus the answer's size at send_min_rate, then closes the connection (the rest is
    never sent: a reset, not megabytes trickled out by the kernel after the close), and answers another client
    meanwhile."""
    big = b"x" * (48 << 20)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [big if environ["PATH_INFO"] == "/big" else b"ok\n"]

    c = Container([], middleware=lambda _: app, threads=2,
                  limits=ConnectionLimits(body_grace=0.2, send_min_rate=32 << 20)).start()
    try:
        with socket.create_connection(("127.0.0.1", c.port), timeout=60) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            assert exchange(c, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200 ")
            while not c.refused["send"]:
                time.sleep(0.05)
            ended = None
            try:
                while s.recv(1 << 20):
                    pass
            except OSError as exc:
                ended = exc
        assert isinstance(ended, ConnectionResetError)   # reset: the kernel sends none of what it still held
    finally:
        c.stop()
