"""Signed SOAP's HTTPS exchange without requests: kept-alive TLS connections to one origin (``http.client`` over an
``ssl.SSLContext`` that trusts exactly the grid's CA directory and checks the host name), a timeout on every
connect and read, and answers read only up to a bound. requests and urllib3 prepared each call anew (URL parsing,
header merging, adapter and pool look-ups, hooks): about a quarter of a node's CPU per deploy+destroy.

Stable API:

    pool = HTTPSPool(url, client_ssl_context(cert_dir), timeout=120, max_answer=limits.max_bytes)
    pool = HTTPSPool(url, context, connect_to=checked)      # connect to these addresses only (never resolved again)
    answer = pool.post(body_bytes, {"Content-Type": ..., "SOAPAction": ...})   # .status_code .headers .content
    pool.close()

A failure to get an answer raises :class:`HTTPSError` (connection refused, TLS refused, timeout, an answer over
the bound, a broken answer). The timeout bounds each exchange whole, not only each read: a server that drips its
answer (or its TLS handshake, or its headers) a byte at a time is cut off when the exchange's time is up (one
watchdog thread per process shuts the connection's socket down). A kept-alive connection the server closed as the
request went out (its idle limit met the request: no byte of an answer came back) is retried once on a new
connection with the same bytes: never re-signed, so if the server did act on the first copy its replay cache
refuses the second.

``connect_to``: the socket addresses (``(family, sockaddr)`` as ``socket.getaddrinfo`` gives them) a caller checked
the URL's host name against (a policy on the addresses a node may call: services.wsrf.notification.ConsumerPolicy).
Connections go to these, in order, and the name is never resolved again (a name that answers another address later,
DNS rebinding, is not followed); the Host header, TLS SNI and the certificate's check still use the URL's name.
"""
from __future__ import annotations

import heapq
import http.client
import itertools
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlsplit

__all__ = ["Answer", "HTTPSError", "HTTPSPool", "AnswerTooLarge"]

MAX_IDLE = 16         # idle connections kept per origin (one per thread that called at once)


class HTTPSError(OSError):
    """No answer from the server (refused, TLS failure, timeout, a broken or oversized answer)."""


class AnswerTooLarge(HTTPSError):
    """The answer is longer than the bound: not read further, the connection dropped."""


_OFF = object()      # an entry's socket once its exchange has ended (disarmed)


class _Watchdog:
    """Deadlines of exchanges under way: past its deadline, an exchange's socket is shut down (at the descriptor,
    whatever object wraps it: a TLS handshake under way too), so the read that waits on it ends at once. One daemon
    thread per process, started at the first exchange; arming and disarming take a lock and a heap push.

    An entry holds the socket object, never its descriptor's number: a socket closed before its entry was disarmed
    (http.client and ssl close theirs on some errors) has no descriptor any more, and shutting it down fails, where a
    number could by then name another connection of the process (a server's, a transfer's) and cut that one."""

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._disarmed = 0          # entries in the heap whose exchange ended before their deadline

    def arm(self, deadline: float) -> list:
        """An entry [deadline, seq, socket, fired]; its socket is set (``watch``) once it exists."""
        entry = [deadline, next(self._seq), None, False]
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="https-deadlines", daemon=True)
                self._thread.start()
            if self._disarmed > 1024 and self._disarmed * 2 > len(self._heap):     # calls that ended: dropped
                self._compact()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[2] is not _OFF]
        heapq.heapify(self._heap)
        self._disarmed = 0

    def watch(self, entry: list, sock: socket.socket) -> None:
        with self._cond:
            if entry[2] is _OFF:                # disarmed
                return
            entry[2] = sock
            if entry[3]:                        # already past its deadline as the socket was made
                _shutdown(sock)

    def disarm(self, entry: list) -> bool:
        """Stop watching (before the socket is closed: its descriptor may be reused); whether it fired."""
        with self._cond:
            if entry[2] is not _OFF:
                entry[2] = _OFF
                if not entry[3]:                # still in the heap
                    self._disarmed += 1
            return entry[3]

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2] is _OFF):
                    entry = heapq.heappop(self._heap)
                    if entry[2] is _OFF:
                        self._disarmed -= 1
                    elif not entry[3]:
                        entry[3] = True          # not connected yet (None): watch shuts it down when it is
                        if entry[2] is not None:
                            _shutdown(entry[2])
                # a wake-up at most every quarter second, however many calls end (each leaves its entry until its
                # deadline): a deadline is kept to within that
                self._cond.wait(max(self._heap[0][0] - now, 0.25) if self._heap else None)


def _shutdown(sock: socket.socket) -> None:
    """Shut the socket's descriptor down, at the socket level (ssl.SSLSocket.shutdown would also drop its TLS state
    under the thread reading it); a socket already closed has no descriptor: nothing happens."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


_WATCHDOG = _Watchdog()


def _watchdog_after_fork() -> None:
    """A forked child (a container's worker) starts with a watchdog of its own: the parent's thread is not there, and
    its lock may have been held at the fork."""
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


os.register_at_fork(after_in_child=_watchdog_after_fork)


def _pinned(addresses: tuple[tuple[int, tuple], ...]):
    """A ``create_connection`` for http.client that connects to ``addresses`` (in order, the first that answers)
    instead of resolving the host it is given."""
    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        error: OSError = OSError(f"no address to connect to for {address[0]}")
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error
    return create_connection


class _WatchedHTTP(http.client.HTTPConnection):
    """An HTTP connection that hands its socket to the watchdog as soon as it is connected."""
    deadline_entry: list | None = None

    def connect(self) -> None:
        super().connect()
        if self.deadline_entry is not None:
            _WATCHDOG.watch(self.deadline_entry, self.sock)


class _WatchedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection that hands its TCP socket to the watchdog before the TLS handshake."""
    deadline_entry: list | None = None

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        entry = self.deadline_entry
        if entry is not None:
            _WATCHDOG.watch(entry, self.sock)
        # the TLS socket takes the descriptor over (the plain one is detached): watched before its handshake
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host, do_handshake_on_connect=False)
        if entry is not None:
            _WATCHDOG.watch(entry, self.sock)
        try:
            self.sock.do_handshake()
        except BaseException:
            self.sock.close()
            raise


@dataclass
class Answer:
    """An HTTP answer read whole (the names of a requests.Response that SOAP callers read)."""
    status_code: int
    headers: Message
    content: bytes
    encoding: str | None = None


class HTTPSPool:
    """Kept-alive HTTPS connections to the origin of ``url`` (its path is where every POST goes), shared by threads:
    each call takes an idle connection (or opens one) and gives it back after reading the whole answer."""

    def __init__(self, url: str, context: ssl.SSLContext, *, timeout: float = 60.0, max_answer: int = 8 << 20,
                 connect_to: tuple[tuple[int, tuple], ...] | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http"):
            raise ValueError(f"{url}: not an http(s) URL")
        if parts.scheme == "https" and (context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname):
            raise ValueError("the TLS context must verify the server's certificate and host name")
        self.url = url
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = parts.path or "/"
        if parts.query:
            self.path += "?" + parts.query
        self.context = context if parts.scheme == "https" else None
        self.timeout = timeout
        self.max_answer = max_answer
        if connect_to is not None and not connect_to:
            raise ValueError(f"{url}: no address to connect to")
        self.connect_to = tuple(connect_to) if connect_to is not None else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if not _closed_by_peer(conn):
                return conn, True
            conn.close()        # the server closed it while idle (its idle limit): as urllib3 does, a new one
        return self._connection_new(), False

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def post(self, body: bytes, headers: dict[str, str], *, timeout: float | None = None) -> Answer:
        """POST ``body`` to the URL's path; the whole answer, or HTTPSError."""
        return self.request("POST", self.path, body, headers, timeout=timeout)

    def get(self, path: str, *, timeout: float | None = None) -> Answer:
        """GET ``path`` (of this origin: a WSDL, a schema); the whole answer (bounded as a POST's), or HTTPSError.
        A redirect is an answer like any other (status 3xx): never followed."""
        return self.request("GET", path, None, {}, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str], *,
                timeout: float | None = None) -> Answer:
        conn, reused = self._connection()
        try:
            return self._exchange(conn, method, path, body, headers, timeout)
        except _DROPPED as exc:
            if not reused:
                raise HTTPSError(f"{self.url}: connection broken: {exc}") from None
        # a kept-alive connection closed by the server as the request went out: no answer came; once more, anew
        conn = self._connection_new()
        try:
            return self._exchange(conn, method, path, body, headers, timeout)
        except (http.client.HTTPException, OSError) as exc:
            raise _error(self.url, exc) from None

    def _connection_new(self) -> http.client.HTTPConnection:
        if self.context is not None:
            conn = _WatchedHTTPS(self.host, self.port, timeout=self.timeout, context=self.context)
        else:
            conn = _WatchedHTTP(self.host, self.port, timeout=self.timeout)
        if self.connect_to is not None:        # the checked addresses; the host name stays the Host header and SNI
            conn._create_connection = _pinned(self.connect_to)
        return conn

    def _exchange(self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
                  headers: dict[str, str], timeout: float | None) -> Answer:
        keep = False
        limit = timeout if timeout is not None else self.timeout
        entry = _WATCHDOG.arm(time.monotonic() + limit)
        conn.deadline_entry = entry
        if conn.sock is not None:
            _WATCHDOG.watch(entry, conn.sock)
        try:
            if timeout is not None:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
            except _DROPPED:
                if _WATCHDOG.disarm(entry):
                    raise HTTPSError(f"{self.url}: timed out (no whole answer within {limit:g} s)") from None
                raise
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.max_answer:
                raise AnswerTooLarge(f"{self.url} answered {length} bytes; the limit is {self.max_answer}")
            content = resp.read(self.max_answer + 1)
            if len(content) > self.max_answer:
                raise AnswerTooLarge(f"{self.url} answered more than {self.max_answer} bytes")
            if length is not None and length.isdigit() and len(content) < int(length):
                if _WATCHDOG.disarm(entry):
                    raise HTTPSError(f"{self.url}: timed out (no whole answer within {limit:g} s)")
                raise HTTPSError(f"{self.url}: the answer was cut short: {len(content)} of its {length} bytes")
            if not resp.isclosed():
                resp.read(1)         # the answer's end (a chunked answer's last chunk): nothing more must be there
                if not resp.isclosed():
                    raise AnswerTooLarge(f"{self.url} answered more than {self.max_answer} bytes")
            keep = not resp.will_close
            if _WATCHDOG.disarm(entry):
                keep = False
                raise HTTPSError(f"{self.url}: timed out (no whole answer within {limit:g} s)")
            return Answer(resp.status, resp.msg, content)
        except _DROPPED:
            raise
        except HTTPSError:
            raise
        except (http.client.HTTPException, OSError) as exc:
            # the watchdog's cut, or a read that waited the whole limit by itself (a loaded machine can starve a
            # dripping peer's bytes past it): the same bound, named the same way
            if _WATCHDOG.disarm(entry) or isinstance(exc, (socket.timeout, TimeoutError)):
                raise HTTPSError(f"{self.url}: timed out (no whole answer within {limit:g} s)") from None
            raise _error(self.url, exc) from None
        finally:
            _WATCHDOG.disarm(entry)
            conn.deadline_entry = None
            if keep:
                self._give_back(conn)
            else:
                conn.close()

    def close(self) -> None:
        """Close the idle connections (calls under way close theirs when done)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


# a kept-alive connection that broke before any answer came back (the server closed it: with or without TLS's
# close_notify, as the request went out or as its answer was awaited)
_DROPPED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
            ssl.SSLEOFError, ssl.SSLZeroReturnError)


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle connection can be read from (the server's close, or bytes nobody asked for): not reusable."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _error(url: str, exc: BaseException) -> HTTPSError:
    if isinstance(exc, HTTPSError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return HTTPSError(f"{url}: certificate verify failed: {exc.verify_message}")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return HTTPSError(f"{url}: timed out")
    if isinstance(exc, ConnectionRefusedError):
        return HTTPSError(f"{url}: Connection refused")
    return HTTPSError(f"{url}: {type(exc).__name__}: {exc}")
