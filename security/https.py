"""Signed SOAP's HTTPS exchange without requests: kept-alive TLS connections to one origin (``http.client`` over an
``ssl.SSLContext`` that trusts exactly the grid's CA directory and checks the host name), a timeout on every
connect and read, and answers read only up to a bound. requests and urllib3 prepared each call anew (URL parsing,
header merging, adapter and pool look-ups, hooks): about a quarter of a node's CPU per deploy+destroy.

Stable API:

    pool = HTTPSPool(url, client_ssl_context(cert_dir), timeout=120, max_answer=limits.max_bytes)
    answer = pool.post(body_bytes, {"Content-Type": ..., "SOAPAction": ...})   # .status_code .headers .content
    pool.close()

A failure to get an answer raises :class:`HTTPSError` (connection refused, TLS refused, timeout, an answer over
the bound, a broken answer). A kept-alive connection the server closed as the request went out (its idle limit
met the request: no byte of an answer came back) is retried once on a new connection with the same bytes: never
re-signed, so if the server did act on the first copy its replay cache refuses the second.
"""
from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlsplit

__all__ = ["Answer", "HTTPSError", "HTTPSPool", "AnswerTooLarge"]

MAX_IDLE = 16         # idle connections kept per origin (one per thread that called at once)


class HTTPSError(OSError):
    """No answer from the server (refused, TLS failure, timeout, a broken or oversized answer)."""


class AnswerTooLarge(HTTPSError):
    """The answer is longer than the bound: not read further, the connection dropped."""


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

    def __init__(self, url: str, context: ssl.SSLContext, *, timeout: float = 60.0, max_answer: int = 8 << 20):
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
        conn, reused = self._connection()
        try:
            return self._exchange(conn, body, headers, timeout)
        except _DROPPED as exc:
            if not reused:
                raise HTTPSError(f"{self.url}: connection broken: {exc}") from None
        # a kept-alive connection closed by the server as the request went out: no answer came; once more, anew
        conn = self._connection_new()
        try:
            return self._exchange(conn, body, headers, timeout)
        except (http.client.HTTPException, OSError) as exc:
            raise _error(self.url, exc) from None

    def _connection_new(self) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _exchange(self, conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str],
                  timeout: float | None) -> Answer:
        keep = False
        try:
            if timeout is not None:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
            conn.request("POST", self.path, body=body, headers=headers)
            resp = conn.getresponse()
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.max_answer:
                raise AnswerTooLarge(f"{self.url} answered {length} bytes; the limit is {self.max_answer}")
            content = resp.read(self.max_answer + 1)
            if len(content) > self.max_answer:
                raise AnswerTooLarge(f"{self.url} answered more than {self.max_answer} bytes")
            if not resp.isclosed():
                resp.read(1)         # the answer's end (a chunked answer's last chunk): nothing more must be there
                if not resp.isclosed():
                    raise AnswerTooLarge(f"{self.url} answered more than {self.max_answer} bytes")
            keep = not resp.will_close
            return Answer(resp.status, resp.msg, content)
        except _DROPPED:
            raise
        except HTTPSError:
            raise
        except (http.client.HTTPException, OSError) as exc:
            raise _error(self.url, exc) from None
        finally:
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
