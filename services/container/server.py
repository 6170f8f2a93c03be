"""The grid container process: services on one port, WS-Security in front of the SOAP application and
(by default) TLS from the host certificate.

A slow or idle client must not hold a request thread. So connections live in one asyncio event loop
(uvloop's, libuv), where httptools (llhttp, Node.js's HTTP/1.1 parser, in C) reads each request *whole*
under deadlines: the
TLS handshake (its steps computed on a TLS thread, not in the loop, in turns per client address:
tlsstream.py, turns.py), the request head, the body at a minimum rate, the wait for the next request on a
keep-alive connection, the response at a minimum rate; at most so many connections in all and per
client address. Only a complete, buffered request reaches a request thread, which runs the unchanged
WSGI application. The limits are ``[container.limits]`` (:class:`ConnectionLimits`, docs/configuration.md).
Until issue 13 §2's sixth pass the parser was h11 and the loop asyncio's own: both in Python, they held the
GIL for most of the loop's time (docs/benchmarks.md)."""
from __future__ import annotations

import asyncio
import io
import logging
import queue
import re
import resource
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from typing import Callable, Iterable
from urllib.parse import unquote

import httptools
import uvloop

from services.container.app import SoapApplication
from services.container.limits import FREE_BODY_BYTES, ConnectionLimits
from services.container.service import SoapService
from services.container.tlsstream import TLSStream
from services.container.turns import TurnGate, client_key

log = logging.getLogger("vmgrid.container")

Middleware = Callable[[Callable], Callable]


class _Refused(Exception):
    """A request refused before it reached the application: (status, reason)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class Container:
    """Serves ``services`` on ``host:port`` (0 = a free port). ``middleware`` wraps the SOAP
    application (WS-Security verification and response signing); ``ssl_adapter`` (its ``context``)
    turns on TLS; ``limits`` bounds what each connection may take."""

    def __init__(self, services: Iterable[SoapService], *, host: str = "127.0.0.1", port: int = 0,
                 middleware: Middleware, ssl_adapter=None, public_url: str | None = None,
                 threads: int = 16, validate_responses: bool = False, limits: ConnectionLimits | None = None,
                 public_host: str | None = None):
        self.services = list(services)
        self.public_host = public_host   # the host name in the default public URL (the host certificate's)
        self.app = SoapApplication(self.services, public_url=public_url, validate_responses=validate_responses)
        self.wsgi_app = middleware(self.app)
        self.limits = limits or ConnectionLimits()
        self.ssl_context = ssl_adapter.context if ssl_adapter is not None else None
        self.tls = ssl_adapter is not None
        self.threads = threads
        self.reuse_port = False
        self._bind = (host, port)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: _RequestThreads | None = None
        self._server: asyncio.base_events.Server | None = None
        self._stopped = threading.Event()
        self.open_connections = 0
        self.per_address: dict[str, int] = {}
        self.refused = {"connections": 0, "per-address": 0, "handshake": 0, "header": 0, "body": 0, "idle": 0,
                        "send": 0, "bad request": 0, "busy": 0}
        self.body_bytes = _BodyBytes(self.limits.max_body_bytes_held)   # request bodies held, over all connections
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.handshakes = TurnGate(self.limits.handshake_threads)   # TLS handshake steps in turns (turns.py)
        self._tls_pool: ThreadPoolExecutor | None = None
        self._server_name: str | None = None
        self._server_port = ""

    @property
    def host(self) -> str:
        return self._sock.getsockname()[0] if self._sock else self._bind[0]

    @property
    def listening(self) -> bool:
        """Whether the container's own port is bound (start() binds it before its services start theirs)."""
        return self._sock is not None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock else self._bind[1]

    @property
    def base_url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def public_base_url(self) -> str:
        """The configured public URL, else the bound address (the WSDL and the services' EPRs carry it)."""
        if self.app.public_url:
            return self.app.public_url
        host = self.public_host or (self.host if ":" not in self.host else f"[{self.host}]")
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def url(self, service: str) -> str:
        return f"{self.public_base_url}/wsrf/services/{service}"

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> "Container":
        """Bind and serve in a background thread; returns once the port is bound."""
        host, port = self._bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=self.reuse_port)
        bind = getattr(self.app, "bind", None)          # the application learns its addresses before any request
        if bind is not None:
            bind(self.public_base_url, self.base_url)
        _raise_open_files(self.limits.max_connections + self.threads + 256)
        self._pool = _RequestThreads(self.threads, "vmgrid-request")
        if self.ssl_context is not None:      # TLS handshake steps, off the event loop (tlsstream.py)
            self._tls_pool = ThreadPoolExecutor(self.limits.handshake_threads, thread_name_prefix="vmgrid-tls")
        self._loop = uvloop.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="vmgrid-container", daemon=True)
        self._thread.start()
        ready.wait()
        for s in self.services:
            s.start()
        log.info("serving %s at %s", ", ".join(s.name for s in self.services), self.base_url)
        return self

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._connection, sock=self._sock,
                                                                    limit=self.limits.max_header_bytes))
        ready.set()
        try:
            loop.run_until_complete(self._server.serve_forever())
        except asyncio.CancelledError:
            pass
        finally:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()
            self._stopped.set()

    def serve_forever(self) -> None:
        """Serve (starting first if needed) until interrupted (KeyboardInterrupt), then stop."""
        if self._thread is None:
            self.start()
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        try:
            if self._loop is not None and not self._stopped.is_set():
                def shut():
                    self._server.close()
                    for t in asyncio.all_tasks(self._loop):
                        t.cancel()
                try:
                    self._loop.call_soon_threadsafe(shut)
                except RuntimeError:          # the loop closed meanwhile
                    pass
                self._thread.join(10)
            if self._pool is not None:
                deadline = time.monotonic() + 2
                while self._in_flight and time.monotonic() < deadline:   # requests under way finish first
                    time.sleep(0.02)
                self._pool.shutdown()
            if self._tls_pool is not None:
                self._tls_pool.shutdown(wait=False, cancel_futures=True)
        finally:
            for s in self.services:
                s.close()
            close = getattr(self.wsgi_app, "close", None)   # the WS-Security middleware's replay cache
            if close is not None:
                close()

    def __enter__(self) -> "Container":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- one connection (in the event loop) ---------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        address = client_key(peer[0])    # IPv6: its /64 (one host may take any address of it), as the TLS turns
        lim = self.limits
        if self.open_connections >= lim.max_connections:
            self.refused["connections"] += 1
            writer.transport.abort()
            return
        if self.per_address.get(address, 0) >= lim.max_connections_per_address:
            self.refused["per-address"] += 1
            writer.transport.abort()
            return
        self.open_connections += 1
        self.per_address[address] = self.per_address.get(address, 0) + 1
        graceful = False
        try:
            if self.ssl_context is not None:
                tls = TLSStream(reader, writer, self.ssl_context)
                try:     # computed on the TLS threads in turns per address (tlsstream.py); the deadline counts the waits
                    async with asyncio.timeout(lim.handshake_timeout):
                        await tls.handshake(self._tls_pool, self.handshakes, address)
                except (asyncio.TimeoutError, ConnectionError, OSError) as exc:   # ssl.SSLError is an OSError
                    self.refused["handshake"] += 1
                    log.debug("TLS handshake with %s failed: %s", address, exc)
                    return
                reader = writer = tls
            graceful = await self._serve(reader, writer, peer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:      # the container stops
            pass
        finally:
            if graceful:                    # let the last response out (and TLS say close_notify), in bounded time
                writer.close()
                try:
                    async with asyncio.timeout(lim.body_grace):
                        await writer.wait_closed()
                except (TimeoutError, ConnectionError, OSError, asyncio.CancelledError):
                    pass
            writer.transport.abort()
            self.open_connections -= 1
            left = self.per_address[address] - 1
            if left:
                self.per_address[address] = left
            else:
                del self.per_address[address]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer) -> bool:
        """Answer the connection's requests one after the other (pipelined ones in order); True when the last
        answer went out whole (the connection is then closed gracefully), False when it is cut off."""
        inbound = _Inbound(self.limits, self.body_bytes)
        first = True
        try:
            while True:
                try:
                    request = await self._read_request(inbound, reader, writer, first)
                except _Refused as refused:
                    return await self._send_plain(writer, refused.status, str(refused))
                if request is None:          # the client closed, or kept the connection idle too long
                    return False
                first = False
                status, headers, chunks = await self._on_request_thread(self._environ(request, peer))
                keep = request.keep_alive and not inbound.closing
                sent = await self._send(writer, request, status, headers, chunks, keep)
                inbound.release(len(request.body))      # answered: its body is no longer held
                if not sent:
                    return False
                if not keep:
                    return True
        finally:
            inbound.release(inbound.charged)            # whatever this connection still held

    async def _read_request(self, inbound: "_Inbound", reader, writer, first: bool) -> "_Request | None":
        """The next request, read whole under the deadlines (at once if a pipelined one is waiting), or None
        when the client is gone or stayed idle too long."""
        lim = self.limits
        loop = self._loop
        ready = inbound.ready
        if ready:
            return ready.popleft()
        start = loop.time()
        head_deadline = start + (lim.header_timeout if first else lim.idle_timeout)
        started = first
        while True:
            if inbound.error is not None:          # after the requests parsed whole before it
                self.refused[inbound.error_kind] += 1
                raise _Refused(*inbound.error)
            if inbound.closing or inbound.eof:
                if inbound.partial:
                    raise _Refused(400, "the request ended before its body")
                return None
            now = loop.time()
            if not inbound.head_done:
                if inbound.partial and not started:
                    started = True
                    head_deadline = now + lim.header_timeout
                timeout = head_deadline - now
                kind = "header" if started else "idle"
            else:                                  # the body keeps up with body_min_rate after body_grace
                timeout = inbound.body_start + lim.body_grace + len(inbound.body) / lim.body_min_rate - now
                kind = "body"
            try:
                if timeout <= 0:
                    raise asyncio.TimeoutError
                async with asyncio.timeout(timeout):       # no extra task per read, unlike wait_for
                    data = await reader.read(65536)
            except asyncio.TimeoutError:
                self.refused[kind] += 1
                if kind == "idle":
                    return None
                raise _Refused(408, f"request {kind} too slow") from None
            if not started and data:
                started = True
                head_deadline = loop.time() + lim.header_timeout
            inbound.feed(data, loop)
            if inbound.continue_wanted:
                inbound.continue_wanted = False
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if ready:
                return ready.popleft()

    def _on_request_thread(self, environ: dict) -> asyncio.Future:
        """The application's answer to ``environ``, computed on a request thread. Leaner than
        ``loop.run_in_executor`` (which chains a concurrent future to an asyncio one through three callbacks
        and a condition variable): the thread hands the answer to the loop with one ``call_soon_threadsafe``.
        A request not yet started when the container stops is dropped with the pool's queue."""
        loop = self._loop
        answer = loop.create_future()

        def settle(result) -> None:
            if not answer.done():           # the connection's task may have been cancelled meanwhile
                answer.set_result(result)

        def work() -> None:
            try:
                result = self._call_app(environ)     # an Exception is already its 500 answer
            except BaseException:                    # anything else: still an answer, never a hung connection
                result = "500 Internal Server Error", [("Content-Type", "text/plain")], [b"internal error\n"]
                log.exception("a request thread failed")
            try:
                loop.call_soon_threadsafe(settle, result)
            except RuntimeError:            # the loop closed meanwhile (the container stopped)
                pass

        self._pool.submit(work)
        return answer

    def _environ(self, request: "_Request", peer) -> dict:
        body = request.body
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        if self._server_name is None:       # the bound address, once (not a getsockname per request)
            self._server_name, self._server_port = self.host, str(self.port)
        environ = {
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, encoding="latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self._server_name,
            "SERVER_PORT": self._server_port,
            "SERVER_PROTOCOL": f"HTTP/{request.http_version}",
            "REMOTE_ADDR": str(peer[0]),
            "REMOTE_PORT": str(peer[1]),
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if self.tls else "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        if self.tls:
            environ["HTTPS"] = "on"
        for name, value in request.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            if key in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
                continue
            value = value.decode("latin-1")
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
                continue
            key = "HTTP_" + key
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def _call_app(self, environ: dict):
        """Run the WSGI application on a request thread; the whole response, as (status, headers, chunks)."""
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            started: list = []

            def start_response(status, headers, exc_info=None):
                if exc_info and started:
                    raise exc_info[1].with_traceback(exc_info[2])
                started[:] = [status, headers]
                return lambda data: chunks.append(data)

            chunks: list[bytes] = []
            try:
                result = self.wsgi_app(environ, start_response)
                try:
                    chunks.extend(result)
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
            except Exception:
                log.exception("the application failed on %s %s", environ["REQUEST_METHOD"], environ["PATH_INFO"])
                return "500 Internal Server Error", [("Content-Type", "text/plain")], [b"internal error\n"]
            return started[0], started[1], chunks
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    async def _send(self, writer, request: "_Request", status: str, headers, chunks, keep: bool) -> bool:
        body = b"".join(chunks)
        head = [f"HTTP/1.1 {status}\r\n"]
        for k, v in headers:
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                head.append(f"{k}: {v}\r\n")
        head.append(f"Content-Length: {len(body)}\r\nServer: vmgrid\r\n")
        if not keep:
            head.append("Connection: close\r\n")
        head.append("\r\n")
        text = "".join(head)
        if not _RESPONSE_HEAD.fullmatch(text):     # what h11 refused to send: no answer, the connection is cut
            log.error("the application's response head is not valid HTTP: %r", text[:200])
            return False
        data = text.encode("latin-1")
        if body and request.method != "HEAD":
            data += body
        writer.write(data)
        if not writer.transport.get_write_buffer_size():   # all of it is with the kernel already (the common case):
            return True                                     # nothing to wait for (a lost connection shows at the next read)
        lim = self.limits
        try:
            async with asyncio.timeout(lim.body_grace + len(data) / lim.send_min_rate):   # no extra task per answer
                await writer.drain()
        except asyncio.TimeoutError:
            self.refused["send"] += 1
            try:     # the close resets: the kernel drops the megabytes it still held for the client that does not read
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
            except (AttributeError, OSError):
                pass
            return False
        return True

    async def _send_plain(self, writer, status: int, text: str) -> bool:
        """A short error answer before the connection closes (best effort); True when it went out."""
        try:
            body = (text + "\n").encode()
            writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await asyncio.wait_for(writer.drain(), 1.0)
            return True
        except (asyncio.TimeoutError, ConnectionError, OSError):
            return False


_LINGER_NONE = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() resets
_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
            431: "Request Header Fields Too Large"}
# A response head as h11 would send it: a status of three digits and a reason, then header fields whose names are
# tokens and whose values hold no control characters (no CR or LF the application could smuggle a header with)
_RESPONSE_HEAD = re.compile(r"HTTP/1\.1 [1-9][0-9][0-9] [\t\x20-\x7e\x80-\xff]*\r\n"
                            r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [\t\x20-\x7e\x80-\xff]*\r\n)*\r\n")


class _RequestThreads:
    """The request threads: each runs the next piece of work from one queue. A lean ThreadPoolExecutor (no
    concurrent future or work item per request: the work hands its answer back to the loop itself); like the
    executor, a new thread starts only when none is idle, up to ``count``, so a few busy threads stay warm (lxml's
    per-thread state, caches) instead of the work rotating through all of them. Work not yet started when the
    container stops is dropped, as the executor's queue was."""

    def __init__(self, count: int, prefix: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._count = count
        self._prefix = prefix
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def submit(self, work: Callable[[], None]) -> None:
        self._queue.put(work)
        with self._lock:
            if self._idle > 0:
                self._idle -= 1          # that idle thread takes it
                return
            if len(self._threads) >= self._count:
                return                   # all busy: the work waits for the first one free
            t = threading.Thread(target=self._run, name=f"{self._prefix}_{len(self._threads)}", daemon=True)
            self._threads.append(t)
        t.start()

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None or self._stopping:
                return
            work()
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        self._stopping = True
        with self._lock:
            threads = len(self._threads)
        for _ in range(threads):
            self._queue.put(None)


class _Request:
    """One request read whole."""

    __slots__ = ("method", "target", "http_version", "headers", "body", "keep_alive")

    def __init__(self, method: str, target: bytes, http_version: str, headers: list, body: bytes,
                 keep_alive: bool):
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class _Inbound:
    """One connection's request parser: httptools (llhttp) calls back as it parses what :meth:`feed` gives it;
    each request parsed whole goes to ``ready`` (pipelined ones wait there in order). Sizes are checked as the
    bytes arrive: the request line and headers against ``max_header_bytes`` (431), the body against
    ``max_body_bytes`` (413, from its Content-Length before any of it is read); an invalid request is 400 (llhttp
    is strict: no Content-Length beside Transfer-Encoding, no whitespace or obsolete folding in headers; here also
    no HTTP/0.9 and no underscore in a header field name). A chunked body's trailer fields count against
    ``max_header_bytes`` and are dropped (llhttp hands them over as headers: kept, they grew without bound and
    overrode the head's Content-Type and SOAPAction). A
    request is kept alive when it is HTTP/1.1 without ``Connection: close`` (as h11 did: an HTTP/1.0 client's
    connection is closed after its answer)."""

    def __init__(self, limits: ConnectionLimits, held: "_BodyBytes | None" = None):
        self.max_header = limits.max_header_bytes
        self.max_body = limits.max_body_bytes
        self.held = held if held is not None else _BodyBytes(limits.max_body_bytes_held)
        self.charged = 0         # body bytes of this connection counted in ``held`` (parsed, waiting or answered)
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[_Request] = deque()
        self.error: tuple[int, str] | None = None    # (status, reason), answered once ``ready`` is empty
        self.error_kind = "bad request"
        self.closing = False     # an Upgrade or CONNECT: nothing more is parsed on this connection
        self.eof = False
        self.continue_wanted = False
        self._new()

    def _new(self) -> None:
        self.partial = False     # a request under way
        self.head_done = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0      # the request line and headers parsed so far
        self.head_fed = 0        # bytes fed while this request's head was under way
        self.body = bytearray()
        self.body_start = 0.0
        self.method = ""
        self.version = ""
        self.keep_alive = False

    def feed(self, data: bytes, loop) -> None:
        if not data:
            self.eof = True
            return
        if self.partial and not self.head_done:
            self.head_fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True
        except httptools.HttpParserError as exc:
            if self.error is None:
                self.error = (400, f"bad request: {exc}")
        if self.partial:
            if not self.head_done:
                if max(self.head_bytes, self.head_fed) > self.max_header:
                    self.error, self.error_kind = (431, "the request head is too large"), "bad request"
            elif not self.body_start:
                self.body_start = loop.time()

    # -- httptools' callbacks (inside feed_data) ----------------------------------------------------
    def on_message_begin(self) -> None:
        self.partial = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_done:       # a trailer field after a chunked body: counted against the head's limit, not kept
            if self.head_bytes > self.max_header and self.error is None:   # (nor let it override a header the
                self.error = (431, "the request trailers are too large")    # signature and routing already saw)
            return
        if b"_" in name and self.error is None:   # Content_Type would become CONTENT_TYPE beside Content-Type in WSGI
            self.error = (400, "bad request: a header field name with an underscore")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self.head_done = True
        self.method = p.get_method().decode("ascii")
        self.version = p.get_http_version()
        self.keep_alive = self.version == "1.1" and p.should_keep_alive()
        if self.head_bytes > self.max_header:
            self.error = (431, "the request head is too large")
        if self.version == "0.9" and self.error is None:    # a request line without a version: not HTTP/1.x
            self.error = (400, "bad request: HTTP/0.9 is not served")
        for name, value in self.headers:
            if name == b"content-length" and int(value) > self.max_body and self.error is None:
                self.error, self.error_kind = (413, f"a request body may not exceed {self.max_body} bytes"), "body"
            elif name == b"expect" and value.lower() == b"100-continue" and self.version == "1.1":
                self.continue_wanted = True
        if self.error is not None:        # a refused request gets its refusal, not an invitation to send the body
            self.continue_wanted = False

    def on_body(self, body: bytes) -> None:
        if self.error is not None:          # refused already: the rest of its body is not kept
            return
        self.body += body
        self.charged += len(body)
        self.held.count += len(body)
        if len(self.body) > self.max_body:   # a chunked body (no Content-Length) too long
            self.error, self.error_kind = (413, f"a request body may not exceed {self.max_body} bytes"), "body"
            self._drop_body()
        elif self.held.count > self.held.limit and len(self.body) > FREE_BODY_BYTES:
            self.error, self.error_kind = (503, "the container holds as many request bytes as it may "
                                                f"({self.held.limit} in all): try again later"), "busy"
            self._drop_body()

    def _drop_body(self) -> None:
        self.release(len(self.body))
        self.body.clear()

    def release(self, n: int) -> None:
        n = min(n, self.charged)
        self.charged -= n
        self.held.count -= n

    def on_message_complete(self) -> None:
        if self.error is None:
            self.ready.append(_Request(self.method, self.url, self.version, self.headers, bytes(self.body),
                                       self.keep_alive))
        self.continue_wanted = False
        self._new()


class _BodyBytes:
    """The request body bytes the container holds over all its connections, and its limit
    (``max_body_bytes_held``): a count kept by the event loop's thread alone (no lock)."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int):
        self.count = 0
        self.limit = limit


def _raise_open_files(wanted: int) -> None:
    """Let the process hold ``wanted`` descriptors if its hard limit allows (the soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
