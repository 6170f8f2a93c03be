"""The signed-SOAP transport's own HTTPS connections (security/https.py, GridTransport.post): TLS checked against
the grid's CA directory and the host name, answers read only up to the parser's byte limit, kept-alive
connections reused and shared by threads, and the screened answer handed on so that it is parsed once. Real
cheroot servers over HTTPS on loopback."""
from __future__ import annotations

import socket
import ssl
import threading

import pytest
import requests
from lxml import etree

from security import safexml
from security.client import GridTransport, GridWSSE
from security.https import HTTPSError, HTTPSPool
from security.tls import client_ssl_context
from tests.fixtures.drip import dripping_listener
from tests.fixtures.pki import serve_wsgi

ANSWER = b"<?xml version='1.0'?><answer xmlns='urn:test'>fine</answer>"


class Counting:
    """A WSGI app answering ``body`` (chunked when ``chunked``), counting the connections it saw."""

    def __init__(self, body: bytes = ANSWER, chunked: bool = False):
        self.body = body
        self.chunked = chunked
        self.peers: set = set()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            self.peers.add((environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT")))
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = [("Content-Type", "text/xml")]
        if not self.chunked:
            headers.append(("Content-Length", str(len(self.body))))
        start_response("200 OK", headers)
        if self.chunked:     # no length announced: the server streams it in pieces
            return [self.body[i:i + 1000] for i in range(0, len(self.body), 1000)]
        return [self.body]


def _transport(grid_pki, limits: safexml.Limits | None = None) -> GridTransport:
    return GridTransport(GridWSSE(grid_pki.alice.proxy, grid_pki.trust()), limits=limits)


def test_a_server_of_an_untrusted_ca_or_another_host_name_is_refused(grid_pki):
    rogue = grid_pki.untrusted_ca.issue_host("localhost", key=grid_pki.keys.take())
    transport = _transport(grid_pki)
    with serve_wsgi(Counting(), rogue) as srv:
        with pytest.raises(requests.exceptions.ConnectionError, match="certificate verify failed"):
            transport.post(f"https://localhost:{srv.bind_addr[1]}/svc", b"<x/>", {"Content-Type": "text/xml"})
    with serve_wsgi(Counting(), grid_pki.issue_host("elsewhere.example")) as srv:   # trusted, another host's name
        with pytest.raises(requests.exceptions.ConnectionError, match="certificate verify failed"):
            transport.post(f"https://localhost:{srv.bind_addr[1]}/svc", b"<x/>", {"Content-Type": "text/xml"})
    with serve_wsgi(Counting(), grid_pki.host) as srv:
        assert transport.post(f"https://localhost:{srv.bind_addr[1]}/svc", b"<x/>",
                              {"Content-Type": "text/xml"}).content == ANSWER
    transport.close()


def test_a_pool_without_certificate_and_host_name_checks_is_refused(grid_pki):
    lax = client_ssl_context(grid_pki.cert_dir)
    lax.check_hostname = False
    with pytest.raises(ValueError, match="verify"):
        HTTPSPool("https://localhost:1/svc", lax)
    lax.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verify"):
        HTTPSPool("https://localhost:1/svc", lax)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_answer_longer_than_the_parser_accepts_is_not_read_on(grid_pki, chunked):
    big = b"<a>" + b"x" * 20_000 + b"</a>"
    transport = _transport(grid_pki, safexml.Limits(max_bytes=10_000))
    with serve_wsgi(Counting(big, chunked=chunked), grid_pki.host) as srv:
        url = f"https://localhost:{srv.bind_addr[1]}/svc"
        with pytest.raises(requests.exceptions.ConnectionError, match="10000"):
            transport.post(url, b"<x/>", {"Content-Type": "text/xml"})
        roomy = _transport(grid_pki, safexml.Limits(max_bytes=len(big)))
        assert roomy.post(url, b"<x/>", {"Content-Type": "text/xml"}).content == big   # the bound itself passes
        roomy.close()
    transport.close()


def test_connections_are_kept_alive_and_shared_by_threads(grid_pki):
    app = Counting()
    transport = _transport(grid_pki)
    with serve_wsgi(app, grid_pki.host) as srv:
        url = f"https://localhost:{srv.bind_addr[1]}/svc"
        for _ in range(5):
            assert transport.post(url, b"<x/>", {"Content-Type": "text/xml"}).status_code == 200
        assert len(app.peers) == 1                      # one connection for calls in turn
        answers, start = [], threading.Barrier(4)

        def call():
            start.wait(10)
            answers.append(transport.post(url, b"<x/>", {"Content-Type": "text/xml"}).content)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert answers == [ANSWER] * 4
        assert 1 <= len(app.peers) <= 5                 # calls at once opened connections of their own, at most one each
    transport.close()


def test_post_xml_hands_on_the_answer_it_screened(grid_pki):
    transport = _transport(grid_pki)
    with serve_wsgi(Counting(), grid_pki.host) as srv:
        envelope = etree.fromstring(b"<e:Envelope xmlns:e='http://schemas.xmlsoap.org/soap/envelope/'/>")
        response = transport.post_xml(f"https://localhost:{srv.bind_addr[1]}/svc", envelope, {})
    assert response.envelope is not None
    assert (etree.QName(response.envelope).localname, response.envelope.text) == ("answer", "fine")
    transport.close()


@pytest.mark.parametrize("notify", [True, False], ids=["close_notify", "no-close_notify"])
def test_a_kept_alive_tls_connection_the_server_closed_while_idle_is_not_an_error(grid_pki, notify):
    """The server answers, then closes the connection (its idle limit; with or without TLS's close_notify): the
    next call goes out on a new connection, sent once."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(grid_pki.host_cert_path), str(grid_pki.host_key_path))
    listener = socket.create_server(("127.0.0.1", 0))
    bodies, connections = [], []

    def serve():
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            connections.append(raw)
            try:
                tls = server_ctx.wrap_socket(raw, server_side=True)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += tls.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += tls.recv(65536)
                bodies.append(body)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(ANSWER), ANSWER))
                if notify:
                    tls.unwrap().close()
                else:
                    tls.shutdown(socket.SHUT_RDWR)     # the TCP connection ends, no TLS alert
                    tls.close()
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    transport = _transport(grid_pki)
    url = f"https://localhost:{listener.getsockname()[1]}/svc"
    try:
        for n in range(3):
            assert transport.post(url, b"<call n='%d'/>" % n, {"Content-Type": "text/xml"}).content == ANSWER
        assert bodies == [b"<call n='0'/>", b"<call n='1'/>", b"<call n='2'/>"]
        assert len(connections) == 3
    finally:
        listener.close()
        transport.close()


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_server_that_drips_its_handshake_or_answer_is_cut_off_at_the_calls_timeout(grid_pki, scheme):
    """Each read gets a byte well within the timeout: only a bound on the exchange as a whole ends it. Over https
    the drip is a TLS record announced long (the handshake never completes), over http an answer's headers."""
    first = b"\x16\x03\x03\x40\x00" if scheme == "https" else b"HTTP/1.1 200 OK\r\nX-Drip: "
    listener, stop = dripping_listener(first)
    try:
        pool = HTTPSPool(f"{scheme}://localhost:{listener.getsockname()[1]}/svc", client_ssl_context(grid_pki.cert_dir),
                         timeout=60)
        with pytest.raises(OSError, match=r"timed out \(no whole answer within 1\.5 s\)"):
            pool.post(b"<x/>", {"Content-Type": "text/xml"}, timeout=1.5)
        with pytest.raises(OSError, match=r"timed out \(no whole answer within 1\.5 s\)"):
            pool.get("/svc?wsdl", timeout=1.5)
        pool.close()
    finally:
        stop.set()
        listener.close()


def test_the_watchdog_never_cuts_a_connection_that_took_over_a_closed_sockets_descriptor():
    """An exchange's socket closed before its deadline entry was disarmed (http.client and ssl close theirs on some
    errors) leaves the entry in the watchdog's heap. Its descriptor's number is reused at once by the next socket the
    process opens (here a socket pair, as a server's accepted connection would): when the stale entry's deadline
    passes, that new connection must go on. The watchdog held the number and shut the new connection down."""
    import time

    from security.https import _WATCHDOG

    old = socket.socket()
    entry = _WATCHDOG.arm(time.monotonic() + 0.05)
    _WATCHDOG.watch(entry, old)
    number = old.fileno()
    old.close()                                           # closed, not disarmed
    a, b = socket.socketpair()
    try:
        assert number in (a.fileno(), b.fileno())         # the lowest free descriptor: the closed one's
        deadline = time.monotonic() + 30
        while not entry[3] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert entry[3], "the stale entry's deadline never fired"
        a.sendall(b"still here")
        assert b.recv(100) == b"still here"
        b.sendall(b"and back")
        assert a.recv(100) == b"and back"
    finally:
        _WATCHDOG.disarm(entry)
        a.close()
        b.close()


class Hosts(Counting):
    """Counting, and the Host header of each request."""

    def __init__(self):
        super().__init__()
        self.hosts: list[str] = []

    def __call__(self, environ, start_response):
        self.hosts.append(environ.get("HTTP_HOST", ""))
        return super().__call__(environ, start_response)


def test_a_pool_given_addresses_connects_there_and_checks_the_certificate_for_the_name(grid_pki):
    """``connect_to`` (attack12 G12): the pool of https://pinned.test:PORT (a name no resolver knows) connects to the
    address it is given, sends the name as Host and SNI, and checks the server's certificate for the name: a
    server with pinned.test's certificate answers, one with localhost's is refused. Before: the pool resolved the
    name itself (no such option; 'Name or service not known')."""
    named = grid_pki.issue_host("pinned.test")
    app = Hosts()
    with serve_wsgi(app, named) as srv:
        port = srv.bind_addr[1]
        checked = tuple((f, sa) for f, _, _, _, sa in socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM))
        pool = HTTPSPool(f"https://pinned.test:{port}/svc", client_ssl_context(grid_pki.cert_dir), timeout=10,
                         connect_to=checked)
        try:
            assert pool.post(b"<x/>", {"Content-Type": "text/xml"}).content == ANSWER
            assert pool.get("/svc?wsdl").status_code == 200
        finally:
            pool.close()
        assert app.hosts == [f"pinned.test:{port}"] * 2
    with serve_wsgi(Hosts(), grid_pki.host) as srv:      # localhost's certificate at that address: refused
        port = srv.bind_addr[1]
        pool = HTTPSPool(f"https://pinned.test:{port}/svc", client_ssl_context(grid_pki.cert_dir), timeout=10,
                         connect_to=((socket.AF_INET, ("127.0.0.1", port)),))
        with pytest.raises(HTTPSError, match="certificate verify failed"):
            pool.post(b"<x/>", {"Content-Type": "text/xml"})
        pool.close()
