"""Slow and idle clients against the grid container (issue 9.3): a slow client never holds a request
thread, and the container ends connections that miss its deadlines (TLS handshake, request head, body
rate, keep-alive idle) or exceed its per-address cap. The real container on loopback with TLS from the
grid's host certificate; the clients are raw sockets that misbehave on purpose. No timing is asserted:
each test checks who was answered and who was cut off."""
from __future__ import annotations

import socket
import ssl
import time

import pytest

from security.tls import client_ssl_context, server_ssl_adapter
from services.container.server import ConnectionLimits, Container
from tests.fixtures.pki import grid_pki  # noqa: F401

pytestmark = pytest.mark.timeout(120)

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n"


@pytest.fixture
def serve(grid_pki):
    """serve(**limits) -> a started container with 2 request threads, TLS, and these limits."""
    started = []

    def start(**limits) -> Container:
        c = Container([], middleware=lambda app: app, ssl_adapter=server_ssl_adapter(grid_pki.host), threads=2,
                      limits=ConnectionLimits(**limits)).start()
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def connect(grid_pki, container: Container, source: str = "127.0.0.1", handshake: bool = True) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", container.port), timeout=60, source_address=(source, 0))
    if not handshake:
        return raw
    return client_ssl_context(grid_pki.cert_dir).wrap_socket(raw, server_hostname="localhost")


def read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (b"" if it just closed it)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, ssl.SSLError, ssl.SSLEOFError):
        pass
    return out


def get(grid_pki, container: Container, source: str = "127.0.0.1") -> bytes:
    with connect(grid_pki, container, source) as s:
        s.sendall(REQUEST + b"Connection: close\r\n\r\n")
        return read_all(s)


def test_slow_headers_do_not_hold_the_request_threads(serve, grid_pki):
    """Six clients that sent half a request head, against two request threads: a whole request is answered
    while all six still wait, and each of them is answered once it finishes its head."""
    c = serve(header_timeout=300)
    slow = [connect(grid_pki, c) for _ in range(6)]
    for s in slow:
        s.sendall(REQUEST)                          # no blank line: the head is not finished
    assert get(grid_pki, c).startswith(b"HTTP/1.1 200 ")
    for s in slow:
        s.sendall(b"Connection: close\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 200 ")
        s.close()


def test_a_request_head_that_misses_its_deadline_is_cut_off(serve, grid_pki):
    c = serve(header_timeout=0.5)
    with connect(grid_pki, c) as s:
        s.sendall(REQUEST)
        assert not read_all(s).startswith(b"HTTP/1.1 200")
    assert c.refused["header"] == 1
    assert get(grid_pki, c).startswith(b"HTTP/1.1 200 ")


def test_a_body_slower_than_the_minimum_rate_is_refused(serve, grid_pki):
    """A request announcing 16 MB and sending one byte (the attack) gets 408 once the grace is over."""
    c = serve(body_grace=0.5, body_min_rate=1024, max_body_bytes=32 * 1024 * 1024)
    with connect(grid_pki, c) as s:
        s.sendall(b"POST /wsrf/services/X HTTP/1.1\r\nHost: localhost\r\nContent-Length: 16777216\r\n\r\nx")
        assert read_all(s).startswith(b"HTTP/1.1 408 ")
    assert c.refused["body"] == 1


def test_a_body_over_the_size_limit_is_refused_before_it_is_read(serve, grid_pki):
    c = serve(max_body_bytes=1000)
    with connect(grid_pki, c) as s:
        s.sendall(b"POST /wsrf/services/X HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1001\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 413 ")


def _post(size: int) -> bytes:
    return (b"POST / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size
            + b"x" * size)


def test_request_bodies_held_over_all_connections_are_bounded(serve, grid_pki):
    """Many connections each sending a large body (from many addresses, so the per-address cap does not help)
    cannot make the container hold more than max_body_bytes_held: past it a large body gets 503 (and is not
    kept); a small one (up to FREE_BODY_BYTES) is still answered; once the holder goes, large bodies are
    answered again and the count is back to zero."""
    from services.container.limits import FREE_BODY_BYTES

    c = serve(max_body_bytes_held=1 << 20, body_grace=300)
    holder = connect(grid_pki, c)
    holder.sendall(_post(2 << 20)[: -(1 << 20) - (100 << 10)])   # 900 KiB of a 2 MiB body, the rest never sent
    deadline = time.monotonic() + 60
    while c.body_bytes.count < 900 << 10:          # wait until the container has read it (not a timing assertion)
        assert time.monotonic() < deadline, c.body_bytes.count
        time.sleep(0.01)
    with connect(grid_pki, c, source="127.0.0.2") as s:
        try:
            s.sendall(_post(600 << 10))
        except (ssl.SSLError, OSError):             # refused mid-body: the container answers and closes meanwhile
            pass
        answer = read_all(s)
    # the 503 is read unless the close cut the client's sending off first (then the count says it)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert c.refused["busy"] == 1
    with connect(grid_pki, c, source="127.0.0.3") as s:
        s.sendall(_post(FREE_BODY_BYTES))
        assert not read_all(s).startswith(b"HTTP/1.1 503 ")
    holder.close()
    deadline = time.monotonic() + 60
    while c.body_bytes.count:                       # the holder's bytes are let go when its connection ends
        assert time.monotonic() < deadline, c.body_bytes.count
        time.sleep(0.01)
    with connect(grid_pki, c, source="127.0.0.2") as s:
        s.sendall(_post(600 << 10))
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 ") and not answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert c.body_bytes.count == 0


def test_an_idle_keep_alive_connection_is_closed(serve, grid_pki):
    c = serve(idle_timeout=0.5)
    with connect(grid_pki, c) as s:
        s.sendall(REQUEST + b"\r\n")                # keep-alive (HTTP/1.1 default)
        answer = read_all(s)                        # the answer, then the close when idle
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1
    assert c.refused["idle"] == 1


def test_a_tls_handshake_that_never_comes_is_cut_off_and_others_are_served(serve, grid_pki):
    c = serve(handshake_timeout=0.5)
    silent = connect(grid_pki, c, handshake=False)   # TCP only: the TLS handshake never starts
    assert get(grid_pki, c).startswith(b"HTTP/1.1 200 ")
    assert read_all(silent) == b""                  # closed by the container
    silent.close()


def test_connections_per_client_address_are_capped(serve, grid_pki):
    c = serve(max_connections_per_address=3, header_timeout=300)
    held = [connect(grid_pki, c) for _ in range(3)]
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        extra = connect(grid_pki, c)                # the fourth from 127.0.0.1: closed at once
        extra.sendall(REQUEST + b"\r\n")
        if not extra.recv(100):
            raise ConnectionError("closed")
    assert c.refused["per-address"] >= 1
    assert get(grid_pki, c, source="127.0.0.2").startswith(b"HTTP/1.1 200 ")   # another address is served
    for s in held:
        s.close()


def test_a_large_response_arrives_whole_before_the_connection_closes(grid_pki):
    """Closing after `Connection: close` lets the whole response (and TLS close_notify) out first."""
    payload = bytes(range(256)) * 8192                 # 2 MiB

    def big(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [payload]

    c = Container([], middleware=lambda app: big, ssl_adapter=server_ssl_adapter(grid_pki.host), threads=2).start()
    try:
        answer = get(grid_pki, c)
    finally:
        c.stop()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == payload


def test_the_body_limit_is_the_ws_security_message_limit():
    from security.safexml import DEFAULT_MAX_BYTES
    assert ConnectionLimits().max_body_bytes == DEFAULT_MAX_BYTES


def client_hello(grid_pki) -> bytes:
    """The first flight of a real TLS client (its ClientHello), as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_ssl_context(grid_pki.cert_dir).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_clients_stalled_in_their_handshake_hold_no_tls_thread(serve, grid_pki):
    """One TLS thread; twelve clients from one address send half a ClientHello and stop: a client from
    another address completes its handshake and is answered while all twelve still wait."""
    c = serve(handshake_threads=1, handshake_timeout=300)
    hello = client_hello(grid_pki)
    stalled = [connect(grid_pki, c, source="127.0.0.3", handshake=False) for _ in range(12)]
    for s in stalled:
        s.sendall(hello[:len(hello) // 2])
    assert get(grid_pki, c, source="127.0.0.2").startswith(b"HTTP/1.1 200 ")
    assert c.refused["handshake"] == 0
    for s in stalled:
        s.close()


def test_a_crowd_of_handshakes_from_one_address_and_one_from_another_are_all_answered(serve, grid_pki):
    """Thirty clients from one address and one from another connect at once, one TLS thread: every one is
    answered (they wait for their turns, none is refused), and the gate is free afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    c = serve(handshake_threads=1)
    sources = ["127.0.0.4"] * 30 + ["127.0.0.5"]
    with ThreadPoolExecutor(len(sources)) as pool:
        answers = list(pool.map(lambda src: get(grid_pki, c, source=src), sources))
    assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
    assert c.handshakes.passed >= 31 and c.handshakes.busy == 0 and c.handshakes.queued == 0
    assert c.refused["handshake"] == 0


def test_a_client_that_breaks_off_its_handshake_is_counted_and_others_are_served(serve, grid_pki):
    """Half a ClientHello, then the client closes: the container counts a failed handshake, frees the
    connection, and answers the next client."""
    c = serve()
    s = connect(grid_pki, c, handshake=False)
    s.sendall(client_hello(grid_pki)[:20])
    s.close()
    assert get(grid_pki, c, source="127.0.0.2").startswith(b"HTTP/1.1 200 ")
    deadline = time.monotonic() + 60                          # the loop notices the close in its own time
    while (c.refused["handshake"] < 1 or c.open_connections) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.refused["handshake"] == 1
    assert c.per_address == {}


# -- HTTP/1.1 as the parser (httptools, llhttp) must read it: one container with an echo application ---------------
@pytest.fixture(scope="module")
def echo(grid_pki):
    """A container whose application answers each request with its method, path and body (1 KiB head limit,
    4 KiB body limit)."""
    pki = grid_pki

    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"] or 0))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["REQUEST_METHOD"].encode(), b" ", environ["PATH_INFO"].encode(), b" ", body]

    c = Container([], middleware=lambda _app: app, ssl_adapter=server_ssl_adapter(pki.host), threads=2,
                  limits=ConnectionLimits(max_header_bytes=1024, max_body_bytes=4096)).start()
    yield pki, c
    c.stop()


def answers(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(status line, body) of each response in ``raw`` (bodies framed by Content-Length)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(v) for k, _, v in (line.partition(b": ") for line in lines[1:]) if k.lower() == b"content-length")
        out.append((lines[0], rest[:length]))
        raw = rest[length:]
    return out


def test_pipelined_requests_are_answered_in_order(echo):
    pki, c = echo
    with connect(pki, c) as s:
        s.sendall(b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                  b"POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n1\r\nf\r\n0\r\n\r\n"
                  b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = answers(read_all(s))
    assert got == [(b"HTTP/1.1 200 OK", b"POST /one abc"), (b"HTTP/1.1 200 OK", b"POST /two def"),
                   (b"HTTP/1.1 200 OK", b"GET /three ")]


def test_an_http_1_0_request_is_answered_and_its_connection_closed(echo):
    pki, c = echo
    with connect(pki, c) as s:
        s.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        raw = read_all(s)                           # returns: the container closed the connection
    assert answers(raw) == [(b"HTTP/1.1 200 OK", b"GET /old ")] and b"Connection: close" in raw


def test_a_client_expecting_100_continue_gets_it_before_sending_the_body(echo):
    pki, c = echo
    with connect(pki, c) as s:
        s.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        interim = s.recv(100)
        assert interim.startswith(b"HTTP/1.1 100 ") and interim.endswith(b"\r\n\r\n")
        s.sendall(b"ok" + REQUEST.replace(b"GET /", b"GET /next") + b"Connection: close\r\n\r\n")
        assert answers(read_all(s)) == [(b"HTTP/1.1 200 OK", b"POST /e ok"), (b"HTTP/1.1 200 OK", b"GET /next ")]


@pytest.mark.parametrize("request_bytes, status", [
    (REQUEST + b"X-Long: " + b"a" * 2000 + b"\r\n\r\n", b"431"),                      # the head over 1 KiB
    (REQUEST + b"X: 1\r\n" * 200 + b"\r\n", b"431"),                                   # in many small lines
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 1024
     + b"\r\n1000\r\n" + b"y" * 4096 + b"\r\n0\r\n\r\n", b"413"),                    # a chunked body over 4 KiB
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", b"400"),  # smuggling
    (REQUEST + b"Bad Name: x\r\n\r\n", b"400"),
    (b"\x16\x03\x01garbage\r\n\r\n", b"400"),
])
def test_bad_requests_get_their_answer_and_the_connection_closes(echo, request_bytes, status):
    pki, c = echo
    with connect(pki, c) as s:
        s.sendall(REQUEST + b"\r\n" + request_bytes)       # a good request first: answered, then the bad one
        got = answers(read_all(s))
    assert [line.split(b" ")[1] for line, _ in got] == [b"200", status]
