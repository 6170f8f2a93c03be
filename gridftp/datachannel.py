"""Data channels: MODE E (extended block) and stream-mode senders and receivers.

A sender hands out blocks of the byte ranges to send from one shared queue, so fast streams
take more of them; each stream thread writes a 17-byte header and then the payload with
``sendfile`` (or ``preadv`` into a reused buffer when the channel is TLS). A receiver thread
per connection reads the headers and ``splice``s each payload from the socket into the file at
its offset (TLS: ``recv_into`` a reused buffer, then ``pwrite``). End of file follows GFD.20: every stream ends with EOD, one stream announces the
number of streams in an EOF block.

Data channel caching (GFD.20): a stream that ends with EOD but without the close flag stays open, and the next
transfer of the same session may use it again without a new PORT/PASV (Globus clients do, for ``-r`` and ``-f``).
A sender made with ``keep_open`` ends its streams so and leaves them open; a receiver made with ``keep_open`` hands
back (:meth:`ModeEReceiver.close`) the connections that ended so; :func:`close_cached` ends cached connections.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from .control import is_tls
from .errors import AuthenticationError, ProtocolError, SizeLimitExceeded, TransferError
from .protocol import (BLOCK_HEADER, DESC_CLOSE, DESC_EOD, DESC_EOF, DESC_ERRORS, DESC_RESTART, MAX_PARALLELISM)
from .ranges import split_blocks

# a receiver's write failing for these is this side's storage: the reason to report, not the sender's abort it causes
LOCAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})

BLOCK_SIZE = 4 << 20            # payload bytes per MODE E block sent
RECV_BUFFER = 1 << 20           # reused receive buffer per connection
# A store refused past its bound is read to its end (and dropped) before the refusal is said, at most this many more
# bytes and seconds: a client answered while it still sends may miss the answer (globus-url-copy sending a pipe waited
# for ever when the reply came between two of its writes; cut, a sender's next write fails and it reads the reply).
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 30.0
DATA_TIMEOUT = 60.0             # seconds a data connection may stay silent
ACCEPT_TIMEOUT = 60.0           # seconds to wait for the first data connection

log = logging.getLogger(__name__)


TYPE_CHECKING = False   # what typing.TYPE_CHECKING is at run time, without importing typing (the command's start)
if TYPE_CHECKING:       # the interfaces, for type checkers and readers
    from typing import Protocol

    class Sink(Protocol):
        """Where received bytes go (a :class:`~gridftp.partial.PartialFile`, or a plain file for ESTO).

        A sink backed by a file may also have ``fd`` and ``record(start, end)``: plain TCP data is
        then spliced from the socket into the file at its offset without passing through user space,
        and ``record`` is told what landed.
        """

        def write(self, offset: int, data: memoryview) -> None: ...

    class Protection(Protocol):
        """Secures a data connection (PROT P): TLS handshake plus the DCAU identity check."""

        def wrap(self, sock: socket.socket, *, server_side: bool) -> socket.socket: ...


PIPE_SIZE = 1 << 20
RECORD_STEP = 4 << 20           # spliced bytes told to the sink at least this often (and at each block's end)


class Splicer:
    """Moves bytes from a socket into a file at an offset through a pipe (``splice``: no user-space copy)."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        try:
            fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass

    def move(self, sock: socket.socket, fd: int, pos: int, want: int) -> int:
        """Up to ``want`` bytes from ``sock`` into ``fd`` at ``pos``; 0 at end of stream."""
        n = os.splice(sock.fileno(), self.write_end, min(want, PIPE_SIZE), flags=os.SPLICE_F_MOVE)
        done = 0
        while done < n:
            done += os.splice(self.read_end, fd, n - done, offset_dst=pos + done, flags=os.SPLICE_F_MOVE)
        return n

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


class Worker:
    """Runs ``fn()`` in a daemon thread and keeps its result or the exception it raised."""

    def __init__(self, fn: Callable[[], object], name: str):
        self.value: object = None
        self.error: BaseException | None = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.value = self._fn()
        except BaseException as exc:      # handed to whoever joins
            self.error = exc

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True once the function has returned or raised."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class Throttle:
    """A token bucket shared by the streams of one transfer (bytes per second; 0 = unlimited): a sender takes
    before it sends, a receiver after it has read (then the TCP window slows the sender down).

    ``taken`` bytes went through it, ``waits`` of its takes had to wait (``waited`` seconds in all, as planned):
    its own accounting, which says that a transfer was held to the rate without timing it."""

    CHUNK = 256 << 10           # bytes sent between two waits when throttled

    def __init__(self, rate: float):
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._next = time.monotonic()
        self._cancel = threading.Event()
        self.taken = 0
        self.waits = 0
        self.waited = 0.0

    def take(self, n: int) -> None:
        """Wait until ``n`` more bytes may go (returns at once after :meth:`cancel`)."""
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
            delay = start - now
            self.taken += n
            if delay > 0:
                self.waits += 1
                self.waited += delay
        if delay > 0:
            self._cancel.wait(delay)

    def cancel(self) -> None:
        self._cancel.set()


class Counter:
    """Bytes moved so far, one slot per stream (each slot written by one thread only)."""

    def __init__(self) -> None:
        self._slots: list[int] = []
        self._lock = threading.Lock()

    def slot(self) -> int:
        with self._lock:
            self._slots.append(0)
            return len(self._slots) - 1

    def add(self, slot: int, n: int) -> None:
        self._slots[slot] += n

    @property
    def total(self) -> int:
        return sum(self._slots)


# -- connections ---------------------------------------------------------------------------------
def set_idle_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose sends and receives fail after ``seconds`` of no progress.

    Kernel timeouts (SO_SNDTIMEO/SO_RCVTIMEO) rather than Python's, which put the socket in
    non-blocking mode where ``os.sendfile`` would fail with EAGAIN on a full send buffer. A TLS socket
    (never sent from with sendfile) gets Python's own timeout instead: on a blocking TLS socket Python's
    ssl takes a kernel timeout's EAGAIN for "want read" and waits again, for ever.
    """
    if is_tls(sock):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)


def set_buffers(sock: socket.socket, sbuf: int | None) -> None:
    """Apply an SBUF size; None leaves the kernel's autotuning alone (usually better)."""
    if sbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sbuf)


# The ports data connections are accepted on (a server's PASV/EPSV/SPAS, a client's PORT/EPRT/SPOR, which a node
# pulling a migration's files sends): Globus's own variable, "LOW,HIGH" (or "LOW-HIGH"), read at each listen; unset or
# empty: any ephemeral port. A site firewall opens that range (docs/gridftp.md, "Firewalls").
PORT_RANGE_ENV = "GLOBUS_TCP_PORT_RANGE"
PORT_RANGE_FORM = "expected LOW,HIGH, two ports 1 to 65535 in order (e.g. 50000,51000)"   # what a bad range is told


_BLANK = " \t\r\n"       # what may stand around the range and its ports (ASCII: no other blank)


def parse_port_range(text: str, what: str = PORT_RANGE_ENV) -> tuple[int, int] | None:
    """``"LOW,HIGH"`` or ``"LOW-HIGH"`` (1 to 65535, LOW <= HIGH) as a pair; ``""`` is None (any port); anything else
    a ValueError naming ``what`` and the form. A port is ASCII digits only: not what Python's ``int`` takes besides
    (``"5_0"``, ``"+5"``, other scripts' digits), which the Globus tools reading the same variable would not."""
    text = text.strip(_BLANK)
    if not text:
        return None
    low, sep, high = text.replace("-", ",", 1).partition(",")
    low, high = low.strip(_BLANK), high.strip(_BLANK)
    digits = bool(sep) and all(part.isascii() and part.isdigit() for part in (low, high))
    try:
        pair = (int(low), int(high)) if digits else None
    except ValueError:      # thousands of digits
        pair = None
    if pair is None or not 1 <= pair[0] <= pair[1] <= 65535:
        raise ValueError(f"{what}={text!r}: {PORT_RANGE_FORM}")
    return pair


def data_port_range() -> tuple[int, int] | None:
    """The range of :data:`PORT_RANGE_ENV` (None: any port); ValueError when it is not one."""
    return parse_port_range(os.environ.get(PORT_RANGE_ENV, ""))


_NAMED_RANGES: dict[str, str] = {}     # a range this process was given -> what gave it (name_port_range)


def name_port_range(text: str, origin: str) -> None:
    """What this process's listeners call the range ``text`` (its :data:`PORT_RANGE_ENV` now) in their messages:
    ``origin``, what set it (``--data-ports``, a configuration key), where the operator widens it."""
    _NAMED_RANGES[text.strip()] = origin


class NoFreeDataPort(OSError):
    """Every port of the data port range is in use (EADDRINUSE): the message names the range and where it came from."""


def open_listener(host: str, sbuf: int | None = None, backlog: int = 64) -> socket.socket:
    """A listening socket on ``host`` (the control connection's local address): on a port of the data port range
    (:data:`PORT_RANGE_ENV`, the first free one from a random place in it; OSError EADDRINUSE when none is), or on an
    ephemeral port when no range is set."""
    try:
        ports = data_port_range()
    except ValueError as exc:
        raise OSError(errno.EINVAL, str(exc)) from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if ports is None:
        candidates: Iterable[int] = (0,)
    else:
        low, high = ports
        start = random.randrange(low, high + 1)
        candidates = (*range(start, high + 1), *range(low, start))
    for port in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            set_buffers(sock, sbuf)   # before listen, so accepted sockets inherit the window scale
            # a port whose last data connection this side closed first (a listing, a MODE S download) is in
            # TIME_WAIT for a minute: without this no PASV could take it, and one user's listings emptied a narrow
            # range for everyone (attack16 G3); Linux still refuses a second listener on a port that has one
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or ports is None:
                raise
    origin = _NAMED_RANGES.get(os.environ.get(PORT_RANGE_ENV, "").strip(), PORT_RANGE_ENV)
    raise NoFreeDataPort(errno.EADDRINUSE, f"no free data port in {origin} {ports[0]},{ports[1]}")


class Opening:
    """The data connections :func:`connect_streams` is opening, so that another thread may abort them: the
    server refused the transfer on the control channel (a STOR refused with 550 or 552), and a connection
    it will never accept (its TLS handshake never answered) must not hold the client until its timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.aborted = False

    def add(self, sock: socket.socket) -> bool:
        """Register a connection being opened; False if already aborted (then do not open it). A duplicate of
        its descriptor is kept: the TLS handshake detaches the socket object it is given."""
        with self._lock:
            if self.aborted:
                return False
            self._socks.append(sock.dup())
            return True

    def abort(self) -> None:
        """End every connection being opened (a blocked connect or handshake returns at once with an error)."""
        with self._lock:
            self.aborted = True
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """The connections are open (or failed): drop the duplicates (an abort from now on ends nothing)."""
        with self._lock:
            close_all(self._socks)
            self._socks = []


def connect_streams(addresses: Sequence[tuple[str, int]], per_address: int, *,
                    protection: Protection | None = None, sbuf: int | None = None,
                    timeout: float = DATA_TIMEOUT, opening: Opening | None = None) -> list[socket.socket]:
    """Open ``per_address`` connections to each address (the active side of a data channel).

    The connections (and their TLS handshakes) are made at the same time: one after the other
    would cost a round trip each, 0.4 s for eight streams on a 50 ms path. ``opening``, if given,
    may abort them meanwhile (:class:`Opening`).
    """
    targets = [(host, port) for host, port in addresses for _ in range(per_address)]
    results: list[socket.socket | BaseException | None] = [None] * len(targets)

    def open_one(i: int) -> None:
        host, port = targets[i]
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            if opening is not None and not opening.add(s):
                raise TransferError("aborted: the server refused the transfer")
            set_buffers(s, sbuf)
            s.settimeout(timeout)
            s.connect((host, port))
            if opening is not None and opening.aborted:     # aborted before the connect began: its
                raise TransferError("aborted: the server refused the transfer")    # shutdown found nothing
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_idle_timeout(s, timeout)
            results[i] = protection.wrap(s, server_side=False) if protection is not None else s
        except BaseException as exc:
            s.close()
            results[i] = exc

    threads = [threading.Thread(target=open_one, args=(i,), daemon=True) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if opening is not None:
        opening.close()
    socks = [r for r in results if isinstance(r, socket.socket)]
    failure = next((r for r in results if not isinstance(r, socket.socket)), None)
    if failure is None:
        return socks
    close_all(socks)
    if isinstance(failure, AuthenticationError):
        raise failure
    raise TransferError(f"cannot open data connection to {targets[0][0]}:{targets[0][1]}: {failure}") from failure


def close_all(socks: Iterable[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def close_cached(socks: Iterable[socket.socket], *, sender: bool) -> None:
    """End connections cached from an earlier MODE E transfer. The sender of their data says so first (a block
    with only the close flag, GFD.20), so that a receiver keeping them knows they are gone."""
    for s in socks:
        if sender:
            try:
                s.sendall(BLOCK_HEADER.pack(DESC_CLOSE, 0, 0))
            except (OSError, ValueError):
                pass
        try:
            s.close()
        except OSError:
            pass


def shutdown_listener(listener: socket.socket) -> None:
    """Wake a thread blocked in accept() on ``listener`` and close it."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


def _abort_all(socks: Iterable[socket.socket]) -> None:
    """Unblock every thread using these sockets."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def recv_exact(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view``; returns the bytes read (less than asked only at end of stream)."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            break
        got += n
    return got


# -- sending payloads --------------------------------------------------------------------------------
def send_file_range(sock: socket.socket, fd: int, offset: int, length: int,
                    add: Callable[[int], None], throttle: Throttle | None = None) -> None:
    """``sendfile`` a range of a file to a plain socket: no copy through user space."""
    out = sock.fileno()
    end = offset + length
    step = Throttle.CHUNK if throttle is not None else length
    while offset < end:
        if throttle is not None:
            throttle.take(min(step, end - offset))
        n = os.sendfile(out, fd, offset, min(step, end - offset))
        if n == 0:
            raise TransferError("source file shrank while being sent")
        offset += n
        add(n)


def send_copied_range(sock: socket.socket, source: int | bytes, offset: int, length: int,
                      add: Callable[[int], None], buf: bytearray, throttle: Throttle | None = None) -> None:
    """Send a range through a reused buffer (TLS sockets, in-memory sources)."""
    step = min(len(buf), Throttle.CHUNK) if throttle is not None else len(buf)
    if not isinstance(source, int):
        for pos in range(offset, offset + length, step):
            n = min(step, offset + length - pos)
            if throttle is not None:
                throttle.take(n)
            sock.sendall(memoryview(source)[pos:pos + n])
            add(n)
        return
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        if throttle is not None:
            throttle.take(min(step, end - offset))
        n = os.preadv(source, [view[: min(step, end - offset)]], offset)
        if n == 0:
            raise TransferError("source file shrank while being sent")
        sock.sendall(view[:n])
        offset += n
        add(n)


# -- MODE E sender --------------------------------------------------------------------------------
MIN_BLOCK = 256 << 10


class ModeESender:
    """Sends byte ranges of a file (or a bytes object) over parallel MODE E connections.

    Blocks are handed out in file order from one queue, so a faster stream takes more of them.
    They are ``block_size`` long while much remains and shrink towards :data:`MIN_BLOCK` near the
    end, so that no stream is left finishing a large block while the others idle. ``shift`` is
    subtracted from file offsets in block headers (ERET sends a section as if it began at 0).
    """

    def __init__(self, source: int | bytes, ranges: Iterable[tuple[int, int]], *, shift: int = 0,
                 block_size: int = BLOCK_SIZE, throttle: Throttle | None = None,
                 counter: Counter | None = None, keep_open: bool = False):
        self.source = source
        self.keep_open = keep_open      # end each stream with EOD only, and leave it open for the next transfer
        self.shift = shift
        self.throttle = throttle
        self.counter = counter or Counter()
        self.block_size = block_size
        self._ranges = [(a, b) for a, b in ranges if b > a]
        self._remaining = sum(b - a for a, b in self._ranges)
        self._streams = 1
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._socks: list[socket.socket] = []

    def _next_block(self) -> tuple[int, int] | None:
        with self._lock:
            if not self._ranges:
                return None
            start, end = self._ranges[0]
            share = self._remaining // (4 * self._streams)
            length = min(end - start, max(MIN_BLOCK, min(self.block_size, share)))
            if start + length < end:
                self._ranges[0] = (start + length, end)
            else:
                self._ranges.pop(0)
            self._remaining -= length
            return start, length

    def cancel(self) -> None:
        """Stop sending (ABOR, or another stream failed); the receiver sees no EOF."""
        self._cancel.set()
        if self.throttle is not None:
            self.throttle.cancel()
        _abort_all(self._socks)

    def run(self, socks: Sequence[socket.socket]) -> int:
        """Send everything over ``socks`` and close them (with ``keep_open``: only if the transfer failed);
        returns payload bytes sent."""
        self._socks = list(socks)
        self._streams = max(1, len(socks))
        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._stream, args=(s, i, len(socks), errors),
                                    name=f"gridftp-send-{i}", daemon=True) for i, s in enumerate(socks)]
        start_total = self.counter.total
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not self.keep_open or errors or self._cancel.is_set():
            close_all(socks)
        if self._cancel.is_set() and not errors:
            raise TransferError("transfer aborted")
        if errors:
            err = errors[0]
            if isinstance(err, TransferError):
                raise err
            raise TransferError(f"data connection failed while sending: {err}") from err
        return self.counter.total - start_total

    def _stream(self, sock: socket.socket, index: int, count: int, errors: list) -> None:
        send_blocks(self, sock, index, count, errors, shift=self.shift, throttle=self.throttle)


def send_blocks(sender, sock: socket.socket, index: int, count: int, errors: list, *, shift: int = 0,
                throttle: Throttle | None = None) -> None:
    """One stream of a MODE E sender: the blocks ``sender._next_block()`` hands out, read from ``sender.source`` (a
    file descriptor, spliced on a plain socket, or bytes), then EOD (and EOF on the first stream), with the close flag
    unless the sender has ``keep_open``. A failure is put in ``errors`` and cancels the sender's other streams."""
    slot = sender.counter.slot()
    buf = None
    add = lambda n: sender.counter.add(slot, n)   # noqa: E731
    try:
        while not sender._cancel.is_set():
            block = sender._next_block()
            if block is None:
                break
            offset, length = block
            source = sender.source           # read after the block: a followed file is opened by _next_block
            header = BLOCK_HEADER.pack(0, length, offset - shift)
            if not is_tls(sock) and isinstance(source, int):
                sock.sendall(header, socket.MSG_MORE)
                send_file_range(sock, source, offset, length, add, throttle)
            else:
                buf = buf if buf is not None else bytearray(min(BLOCK_SIZE, 1 << 20))
                sock.sendall(header)
                send_copied_range(sock, source, offset, length, add, buf, throttle)
        if sender._cancel.is_set():
            return
        if index == 0:
            sock.sendall(BLOCK_HEADER.pack(DESC_EOF, 0, count))
        end = DESC_EOD if getattr(sender, "keep_open", False) else DESC_EOD | DESC_CLOSE    # stays open, or closes
        sock.sendall(BLOCK_HEADER.pack(end, 0, 0))
    except (OSError, ValueError, TransferError) as exc:
        if not sender._cancel.is_set():
            errors.append(exc)
            sender.cancel()


# -- MODE E receiver ----------------------------------------------------------------------------
class ModeEReceiver:
    """Receives one MODE E transfer over any number of connections into a sink.

    Offsets in block headers get ``shift`` added (ESTO). ``limit``: no byte may land at or past
    this offset (the announced size). Complete when the EOF block's count of EODs has arrived.

    ``drain``: a block past ``limit`` makes :class:`SizeLimitExceeded` the transfer's error, but the transfer is read to
    its end (every block after it dropped, within :data:`DRAIN_BYTES` and :data:`DRAIN_SECONDS`) before it is done, so
    that the sender has finished sending when it is told.

    ``keep_open``: the connections whose stream ended with EOD but no close flag are kept for the next transfer
    (:meth:`close` hands them back). A connection cached from an earlier transfer (``add_connection(reused=True)``)
    that the sender closes (the close flag, or end of stream) before a block of this transfer is dropped quietly:
    the sender may carry a transfer over fewer connections than before.
    """

    def __init__(self, sink: Sink, *, shift: int = 0, limit: int | None = None,
                 counter: Counter | None = None, buffer_size: int = RECV_BUFFER, keep_open: bool = False,
                 throttle: Throttle | None = None, drain: bool = False):
        self.sink = sink
        self.throttle = throttle        # shared by the streams; every block's bytes are taken as they are read
        self.drain = drain
        self._drain_left = DRAIN_BYTES
        self._drain_until: float | None = None
        self.shift = shift
        self.limit = limit
        self.counter = counter or Counter()
        self.buffer_size = buffer_size
        self.keep_open = keep_open
        self.kept: list[socket.socket] = []
        self.eod_expected: int | None = None
        self.eods = 0
        self.connections = 0
        self.corrupt_blocks: list[tuple[int, int]] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._local = threading.local()
        self._on_done: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once complete or failed (see :attr:`error`)."""
        return self._done.wait(timeout)

    def add_connection(self, sock: socket.socket, *, reused: bool = False) -> None:
        """Start receiving on one more data connection (``reused``: cached from an earlier transfer)."""
        with self._lock:
            self.connections += 1
            self._socks.append(sock)
        t = threading.Thread(target=self._serve, args=(sock, reused), name="gridftp-recv", daemon=True)
        self._threads.append(t)
        t.start()

    def when_done(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the transfer is complete or failed (at once if it is)."""
        with self._lock:
            if not self._done.is_set():
                self._on_done.append(fn)
                return
        fn()

    def _finish(self) -> None:
        """Mark the transfer complete or failed and tell those waiting (:meth:`when_done`)."""
        with self._lock:
            self._done.set()
            waiting, self._on_done = self._on_done, []
        for fn in waiting:
            fn()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None and not self._done.is_set():
                self.error = exc
        if self.throttle is not None:
            self.throttle.cancel()
        self._finish()
        _abort_all(self._socks)

    def close(self) -> list[socket.socket]:
        """Close every connection and wait for the receiving threads; with ``keep_open``, after a complete transfer,
        the connections that ended with EOD but no close flag are left open and returned (the next transfer's)."""
        with self._lock:
            kept = list(self.kept) if self.keep_open and self._done.is_set() and self.error is None else []
        others = [s for s in self._socks if s not in kept]
        _abort_all(others)
        for t in self._threads:
            t.join(timeout=10)
        close_all(others)
        return kept

    def _drop(self, sock: socket.socket) -> None:
        """A cached connection the sender closed before using it in this transfer: one connection less."""
        with self._lock:
            self.connections -= 1

    def _eod(self) -> None:
        with self._lock:
            self.eods += 1
            complete = self.eod_expected is not None and self.eods >= self.eod_expected
        if complete:
            self._finish()

    def _eof(self, expected: int) -> None:
        with self._lock:
            if self.eod_expected is not None and self.eod_expected != expected:
                raise ProtocolError("two EOF blocks disagree on the stream count")
            self.eod_expected = expected
            complete = self.eods >= expected
        if complete:
            self._finish()

    def _serve(self, sock: socket.socket, reused: bool = False) -> None:
        slot = self.counter.slot()
        fresh = reused              # nothing of this transfer has come over this cached connection yet
        header = bytearray(BLOCK_HEADER.size)
        hview = memoryview(header)
        buf = bytearray(self.buffer_size)
        view = memoryview(buf)
        plain = not is_tls(sock)
        try:
            while not self._done.is_set():
                got = recv_exact(sock, hview)
                if got == 0 and fresh:
                    self._drop(sock)
                    return
                if got == 0:
                    raise TransferError("data connection closed before end of data")
                if got < len(header):
                    raise TransferError("data connection closed inside a block header")
                desc, count, offset = BLOCK_HEADER.unpack(header)
                if desc & DESC_CLOSE and not desc & (DESC_EOD | DESC_EOF) and not count:
                    if not fresh:       # GFD.20 lets a sender close only a connection whose data has ended
                        raise ProtocolError("a data connection was closed before its end of data (EOD)")
                    self._drop(sock)
                    return
                fresh = False
                if desc & DESC_EOF:
                    if count:
                        raise ProtocolError("EOF block carries data")
                    self._eof(offset)
                elif count:
                    self._receive_block(sock, desc, count, offset, view, plain, slot)
                if desc & DESC_EOD:
                    if self.keep_open and not desc & DESC_CLOSE:
                        with self._lock:
                            self.kept.append(sock)
                    self._eod()
                    return
        except (OSError, TransferError, ProtocolError, ValueError) as exc:
            if not self._done.is_set():
                if isinstance(exc, OSError) and exc.errno in LOCAL_WRITE_ERRNOS:    # this side's disk, not the link
                    local = TransferError(f"cannot store the data here: {exc.strerror}")
                    local.local = True
                    self.fail(local)
                else:
                    self.fail(exc if isinstance(exc, (TransferError, ProtocolError))
                              else TransferError(f"data connection failed: {exc}"))
        except BaseException as exc:  # never lose an error in a thread
            self.fail(exc)
        finally:
            splicer = getattr(self._local, "splicer", None)
            if splicer is not None:
                splicer.close()
                self._local.splicer = None

    def _splicer(self) -> Splicer:
        local = self._local
        if getattr(local, "splicer", None) is None:
            local.splicer = Splicer()
        return local.splicer

    def _receive_block(self, sock: socket.socket, desc: int, count: int, offset: int,
                       view: memoryview, plain: bool, slot: int) -> None:
        start = offset + self.shift
        discard = bool(desc & (DESC_ERRORS | DESC_RESTART))
        if self.limit is not None and start + count > self.limit:
            over = SizeLimitExceeded(f"block {start}+{count} beyond the announced size {self.limit}")
            if not self.drain:
                raise over
            with self._lock:
                if self.error is None:
                    self.error = over
                    self._drain_until = time.monotonic() + DRAIN_SECONDS
        if self.drain and self._drain_until is not None:      # past the bound: read to the end, keep nothing
            with self._lock:
                self._drain_left -= count
                spent = self._drain_left < 0 or time.monotonic() > self._drain_until
            if spent:
                raise self.error if isinstance(self.error, SizeLimitExceeded) else SizeLimitExceeded(
                    f"block {start}+{count} beyond the announced size {self.limit}")
            discard = True
        throttle = self.throttle
        if desc & DESC_ERRORS:
            self.corrupt_blocks.append((start, start + count))
        pos = start
        end = start + count
        size = len(view)
        fd = getattr(self.sink, "fd", None)
        if plain and not discard and fd is not None and hasattr(self.sink, "record"):
            splicer = self._splicer()
            step = end - pos if throttle is None else Throttle.CHUNK
            noted = pos             # what landed up to here has been recorded
            try:
                while pos < end:
                    n = splicer.move(sock, fd, pos, min(end - pos, step))
                    if n == 0:
                        raise TransferError("data connection closed inside a block")
                    pos += n
                    self.counter.add(slot, n)
                    if throttle is not None:
                        throttle.take(n)
                    if pos - noted >= RECORD_STEP:
                        self.sink.record(noted, pos)
                        noted = pos
            finally:
                if pos > noted:     # the whole block, or what landed of it before a failure
                    self.sink.record(noted, pos)
            return
        while pos < end:
            want = min(size if throttle is None else min(size, Throttle.CHUNK), end - pos)
            if plain:
                n = sock.recv_into(view, want, socket.MSG_WAITALL)
            else:
                n = sock.recv_into(view, want)
            if n == 0:
                raise TransferError("data connection closed inside a block")
            if not discard:
                self.sink.write(pos, view[:n])
            pos += n
            self.counter.add(slot, n)
            if throttle is not None:
                throttle.take(n)


def _drain_stream(sock: socket.socket, view: memoryview, throttle: Throttle | None) -> None:
    """Read and drop what a MODE S sender still sends after its bound, until it closes or the drain's bounds end."""
    deadline = time.monotonic() + DRAIN_SECONDS
    left = DRAIN_BYTES
    try:
        while left > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
            n = sock.recv_into(view, min(len(view), left))
            if n == 0:
                return
            left -= n
            if throttle is not None:
                throttle.take(n)
    except (OSError, ValueError):      # cut, timed out, or closed by an abort: the refusal is said all the same
        return


# -- the passive side: accepting data connections ------------------------------------------------
HANDSHAKE_TIMEOUT = 10.0        # seconds an accepted data connection has to finish its TLS handshake and DCAU
MAX_HANDSHAKING = 8             # accepted connections of one listener in handshake at once
MAX_STRAYS_LOGGED = 16          # strays logged one by one per transfer (the rest are counted)


class _Gate:
    """Admits the data connections of one passive listener that prove themselves.

    A connection from an address ``allow`` refuses (``DCAU N``: no identity to check) is dropped at
    once. Every other is handshaken (TLS and the DCAU check, ``protection``) on a short-lived thread
    of its own, within :data:`HANDSHAKE_TIMEOUT` and at most :data:`MAX_HANDSHAKING` at once; one that
    fails (garbage, clear text, a wrong or no certificate, a stall) is logged and dropped, and the
    wait goes on. So anyone who can reach the port cannot fail another user's transfer, nor make the
    right peer wait behind a handshake that never ends.
    """

    def __init__(self, listener: socket.socket, protection: Protection | None,
                 allow: Callable[[str], bool] | None, deliver: Callable[[socket.socket], bool], what: str,
                 wake: socket.socket | None = None):
        self.listener = listener
        self.wake = wake                # readable: stop waiting at once (the listener outlives this wait)
        self.protection = protection
        self.allow = allow
        self.deliver = deliver          # True: taken; False: not wanted any more (closed here)
        self.what = what
        self.strays = 0
        self.last_refusal: AuthenticationError | None = None
        self._lock = threading.Lock()
        # in handshake -> (when it must be done, a duplicate of it to cut it with: wrapping detaches the original,
        # and a blocking TLS handshake retries a kernel receive timeout for ever)
        self._pending: dict[socket.socket, tuple[float, socket.socket]] = {}
        self.closed = False

    def _stray(self, peer, reason: object) -> None:
        with self._lock:
            self.strays += 1
            count = self.strays
        if count <= MAX_STRAYS_LOGGED:
            log.warning("%s: dropped a data connection from %s: %s", self.what, _peer_text(peer), reason)
        elif count == MAX_STRAYS_LOGGED + 1:
            log.warning("%s: more stray data connections; the rest are counted, not logged", self.what)

    def step(self) -> None:
        """Accept at most one connection (waits up to 0.2 s); cut handshakes past their time."""
        now = time.monotonic()
        with self._lock:
            late = [cutter for until, cutter in self._pending.values() if until < now]
            pending = len(self._pending)
        for s in late:
            _abort_all([s])         # its thread fails, logs and closes it
        if pending >= MAX_HANDSHAKING:
            time.sleep(0.05)
            return
        # while handshakes run, back soon: the caller sees at once one that has proved itself (accept_one's
        # loop would otherwise sit in accept for the rest of 0.2 s, added to every TLS stream-mode transfer)
        wait = 0.01 if pending else 0.2
        if self.wake is not None:
            ready, _, _ = select.select([self.listener, self.wake], [], [], wait)
            if self.listener not in ready:
                return
        self.listener.settimeout(wait)
        try:
            conn, peer = self.listener.accept()
        except socket.timeout:
            return
        if self.allow is not None and not self.allow(peer[0]):
            conn.close()
            self._stray(peer, "not the client's address nor a configured data peer (DCAU N)")
            return
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            conn.close()
            self._stray(peer, exc)
            return
        if self.protection is None:
            set_idle_timeout(conn, DATA_TIMEOUT)
            self._hand_over(conn)
            return
        set_idle_timeout(conn, HANDSHAKE_TIMEOUT)
        try:
            cutter = conn.dup()
        except OSError as exc:
            conn.close()
            self._stray(peer, exc)
            return
        with self._lock:
            self._pending[conn] = (now + HANDSHAKE_TIMEOUT, cutter)
        threading.Thread(target=self._handshake, args=(conn, peer), name="gridftp-data-handshake",
                         daemon=True).start()

    def _handshake(self, conn: socket.socket, peer) -> None:
        try:
            wrapped = self.protection.wrap(conn, server_side=True)
        except (OSError, ValueError, AuthenticationError) as exc:
            conn.close()
            if isinstance(exc, AuthenticationError):
                self.last_refusal = exc
            self._stray(peer, exc)
            return
        finally:
            with self._lock:
                _, cutter = self._pending.pop(conn)
            cutter.close()
        set_idle_timeout(wrapped, DATA_TIMEOUT)
        self._hand_over(wrapped)

    def _hand_over(self, conn: socket.socket) -> None:
        if self.closed or not self.deliver(conn):
            conn.close()

    def close(self) -> None:
        """Stop: cut every handshake in progress (the listener is the caller's)."""
        self.closed = True
        with self._lock:
            pending = [cutter for _, cutter in self._pending.values()]
        _abort_all(pending)

    def no_one_came(self) -> TransferError | AuthenticationError:
        """The error of a wait that ended with no proven connection: 432 if some failed their DCAU."""
        if self.last_refusal is not None:
            return AuthenticationError(f"no data connection proved the expected identity ({self.strays} dropped; "
                                       f"the last: {self.last_refusal})")
        return TransferError("no data connection arrived" + (f" ({self.strays} dropped)" if self.strays else ""))


def _peer_text(peer) -> str:
    return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"


def accept_connections(listener: socket.socket, receiver: ModeEReceiver, *,
                       protection: Protection | None = None, timeout: float = ACCEPT_TIMEOUT,
                       on_first: Callable[[], None] | None = None,
                       max_connections: int = MAX_PARALLELISM, allow: Callable[[str], bool] | None = None,
                       what: str = "MODE E receiver") -> threading.Thread:
    """Accept data connections for ``receiver`` in a thread until it completes or fails. Connections that do
    not prove themselves (``allow``, ``protection``: see :class:`_Gate`) are dropped and logged; one proven
    connection past ``max_connections`` (each costs a socket and a receiving thread) fails the transfer."""
    first = [True]

    def deliver(conn: socket.socket) -> bool:
        with lock:
            if receiver.done:
                return False
            if receiver.connections >= max_connections:
                receiver.fail(TransferError(f"more than {max_connections} data connections"))
                return False
            if first[0] and on_first is not None:
                on_first()
            first[0] = False
            receiver.add_connection(conn)
            return True

    lock = threading.Lock()
    # the receiver's end wakes the wait for connections at once: the listener may stay open for the next transfer
    # (data channel caching), so closing it cannot be what ends the wait
    wake, waker = socket.socketpair()

    def wake_up() -> None:
        try:
            waker.send(b"\0")
        except OSError:
            pass

    receiver.when_done(wake_up)
    gate = _Gate(listener, protection, allow, deliver, what, wake)

    def run() -> None:
        deadline = time.monotonic() + timeout
        try:
            while not receiver.done:
                try:
                    gate.step()
                except (OSError, ValueError) as exc:       # ValueError: select on the listener closed meanwhile
                    if not receiver.done:
                        receiver.fail(TransferError(f"data listener failed: {exc}"))
                    return
                if receiver.connections == 0 and time.monotonic() > deadline:
                    receiver.fail(gate.no_one_came())
        finally:
            gate.close()
            close_all([wake, waker])
            if receiver.error is not None:
                # the connections the sender opened that are still in the listener's queue are reset now: its
                # threads sending into them (the server of a download this side gave up, its disk full) would
                # wait until their timeouts, and this side on the server's reply (a 120 s hang in a CI run)
                shutdown_listener(listener)

    t = threading.Thread(target=run, name="gridftp-accept", daemon=True)
    t.start()
    return t


def accept_one(listener: socket.socket, *, protection: Protection | None = None,
               timeout: float = ACCEPT_TIMEOUT, allow: Callable[[str], bool] | None = None,
               what: str = "stream-mode transfer") -> socket.socket:
    """Accept the one data connection of a stream-mode transfer (passive side): the first that proves
    itself (see :class:`_Gate`) within ``timeout``; strays before it are dropped and logged."""
    chosen: list[socket.socket] = []
    finished = [False]
    arrived = threading.Event()
    lock = threading.Lock()

    def deliver(conn: socket.socket) -> bool:
        with lock:
            if chosen or finished[0]:
                return False
            chosen.append(conn)
        arrived.set()
        return True

    gate = _Gate(listener, protection, allow, deliver, what)
    deadline = time.monotonic() + timeout
    try:
        while not arrived.is_set():
            if time.monotonic() > deadline:
                raise gate.no_one_came()
            try:
                gate.step()
            except OSError as exc:
                if arrived.is_set():
                    break
                raise TransferError(f"no data connection arrived: {exc}") from exc
    except BaseException:
        with lock:
            finished[0] = True
        close_all(chosen)       # one that won as the wait ended
        raise
    finally:
        with lock:
            finished[0] = True
        gate.close()
    return chosen[0]


# -- stream mode -----------------------------------------------------------------------------------
def send_stream(sock: socket.socket, source: int | bytes, start: int, end: int, *,
                throttle: Throttle | None = None, counter: Counter | None = None) -> int:
    """MODE S: send ``[start, end)`` and close (closing is the end of file)."""
    counter = counter or Counter()
    slot = counter.slot()

    def add(n: int) -> None:
        counter.add(slot, n)

    plain = not is_tls(sock) and isinstance(source, int)
    buf = None if plain else bytearray(1 << 20)
    try:
        for offset, length in split_blocks([(start, end)], BLOCK_SIZE):
            if plain:
                send_file_range(sock, source, offset, length, add, throttle)
            else:
                send_copied_range(sock, source, offset, length, add, buf, throttle)
        if is_tls(sock):
            try:
                sock.unwrap()       # close_notify: in stream mode the close IS the end of file
            except (OSError, ValueError):
                pass
    except (OSError, ValueError) as exc:
        raise TransferError(f"data connection failed while sending: {exc}") from exc
    finally:
        sock.close()
    return end - start


def receive_stream(sock: socket.socket, sink: Sink, start: int, *, limit: int | None = None,
                   counter: Counter | None = None, throttle: Throttle | None = None, drain: bool = False) -> int:
    """MODE S: receive until the sender closes; bytes land from ``start`` on (each read taken from ``throttle``).
    Bytes past ``limit`` raise :class:`SizeLimitExceeded`; with ``drain``, once the rest the sender sends has been
    read and dropped (within :data:`DRAIN_BYTES` and :data:`DRAIN_SECONDS`)."""
    counter = counter or Counter()
    slot = counter.slot()
    buf = bytearray(RECV_BUFFER if throttle is None else min(RECV_BUFFER, Throttle.CHUNK))
    view = memoryview(buf)
    pos = start
    try:
        while True:
            n = sock.recv_into(view)
            if n == 0:
                break
            if limit is not None and pos + n > limit:
                over = SizeLimitExceeded(f"more data than the announced size {limit}")
                if drain:
                    _drain_stream(sock, view, throttle)
                raise over
            sink.write(pos, view[:n])
            pos += n
            counter.add(slot, n)
            if throttle is not None:
                throttle.take(n)
    except OSError as exc:
        raise TransferError(f"data connection failed while receiving: {exc}") from exc
    finally:
        sock.close()
    return pos - start
