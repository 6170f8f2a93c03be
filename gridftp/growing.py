"""A file sent while another party still writes it: a RETR that follows the file as it grows.

The writer (a VMM saving a guest's memory state) appends to the file; the reader (the node the guest moves
to) wants the bytes as soon as they are on disk, not after the save: across a WAN the transfer then
overlaps the save, and the data connections and the session are set up before the first byte exists.

Server side, a :class:`Growth` says where the file stands: *pending* (not begun: a RETR waits), *growing*
(serve what is there, wait for more), *complete* (serve the rest and finish), *failed* (abort the RETR).
The first ``head`` bytes are held back until the file is complete and sent last: a writer may rewrite its
header when it is done (libvirt writes its save header with the magic ``LibvirtQemudPart`` first and
rewrites it as ``LibvirtQemudSave`` at offset 0 once the save completed). MODE E blocks carry their
offsets (GFD.20), so the order in which they are sent does not matter to the receiver. A file space serves
a growing file by returning its Growth from :meth:`FileSpace.growing`; once complete the file is an ordinary
one (SIZE, REST, CKSM, any client). The writer's contract: it only appends beyond ``head``; the reader
verifies the whole file's digest once it has it, which catches any other write.

Client side, :class:`Following` opens the session, sends RETR at once (the server holds it until the file
grows) and writes every block at its offset; its result is the bytes held. Nothing is verified there: the
caller knows the final digest only once the writer is done.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .datachannel import (BLOCK_SIZE, Counter, ModeEReceiver, Worker, _abort_all, accept_connections, close_all,
                          send_blocks, shutdown_listener)
from .errors import ProtocolError, TransferError

HEAD = 64 * 1024          # bytes held back until the file is complete (libvirt's save header is 92 bytes)
MIN_GROWTH = 256 * 1024   # a block of a growing file waits for at least this much (or the end)
POLL = 0.005              # seconds between looks at a growing file

PENDING, GROWING, COMPLETE, FAILED = "pending", "growing", "complete", "failed"


class Growth:
    """Where a file being written stands, told by its writer: :meth:`begin`, then :meth:`complete` or
    :meth:`fail`. ``stream`` False: nothing is served before it is complete (a disk image the writer may
    change anywhere until then)."""

    def __init__(self, path: Path, *, head: int = HEAD, stream: bool = True):
        self.path = Path(path)
        self.head = head if stream else 0
        self.stream = stream
        self.state = PENDING
        self.reason = ""
        self._changed = threading.Condition()

    def begin(self) -> None:
        """The writer starts now: the file at ``path`` (from now on) is the one to serve."""
        with self._changed:
            if self.state == PENDING:
                self.state = GROWING
                self._changed.notify_all()

    def complete(self) -> None:
        with self._changed:
            if self.state in (PENDING, GROWING):
                self.state = COMPLETE
                self._changed.notify_all()

    def fail(self, reason: str) -> None:
        with self._changed:
            if self.state != FAILED:
                self.state, self.reason = FAILED, reason
                self._changed.notify_all()

    def wait(self, timeout: float) -> str:
        """The state after at most ``timeout`` seconds (sooner when it changes)."""
        with self._changed:
            self._changed.wait(timeout)
            return self.state


class GrowingSender:
    """Sends a growing file over MODE E connections: blocks in file order as the file grows, the held-back
    head once it is complete, then EOD on every stream and EOF on the first (as :class:`ModeESender`)."""

    def __init__(self, growth: Growth, *, counter: Counter | None = None, block_size: int = BLOCK_SIZE):
        self.growth = growth
        self.counter = counter or Counter()
        self.block_size = block_size
        self.fd: int | None = None
        self._cursor = growth.head
        self._head_sent = growth.head == 0
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._socks: list[socket.socket] = []

    def cancel(self) -> None:
        self._cancel.set()
        _abort_all(self._socks)

    def _open(self) -> bool:
        if self.fd is None:
            try:
                self.fd = os.open(self.growth.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                return False
        return True

    def _next_block(self) -> tuple[int, int] | None:
        """(offset, length) of the next block to send, waiting while the file grows; None when all is sent."""
        while not self._cancel.is_set():
            state = self.growth.state
            if state == FAILED:
                raise TransferError(f"the file was not completed: {self.growth.reason}")
            with self._lock:
                ready = state == COMPLETE or (state == GROWING and self.growth.stream)
                if ready and self._open():
                    size = os.fstat(self.fd).st_size
                    if state == COMPLETE:
                        if self._cursor < size:
                            start = self._cursor
                            self._cursor = min(size, start + self.block_size)
                            return start, self._cursor - start
                        if not self._head_sent:
                            self._head_sent = True
                            if min(size, self.growth.head):
                                return 0, min(size, self.growth.head)
                        return None
                    if size - self._cursor >= MIN_GROWTH:
                        start = self._cursor
                        self._cursor = min(size, start + self.block_size)
                        return start, self._cursor - start
                elif state == COMPLETE:
                    raise TransferError(f"{self.growth.path.name} was completed but does not exist")
            self.growth.wait(POLL)
        return None

    def run(self, socks: Sequence[socket.socket]) -> int:
        """Send until the file is complete and sent; closes ``socks``. TransferError if the file failed."""
        self._socks = list(socks)
        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._stream, args=(s, i, len(socks), errors),
                                    name=f"gridftp-follow-{i}", daemon=True) for i, s in enumerate(socks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        close_all(socks)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if errors:
            err = errors[0]
            raise err if isinstance(err, TransferError) else TransferError(f"data connection failed: {err}")
        if self._cancel.is_set():
            raise TransferError("transfer aborted")
        return self.counter.total

    @property
    def source(self) -> int | None:
        """The followed file's descriptor (opened by :meth:`_next_block` once the file exists)."""
        return self.fd

    def _stream(self, sock: socket.socket, index: int, count: int, errors: list) -> None:
        send_blocks(self, sock, index, count, errors)


class _Sink:
    """The file being followed: blocks written at their offsets (``splice``d from plain sockets: ``fd`` and
    ``record`` are what :class:`ModeEReceiver` looks for); ``end`` is the furthest byte held."""

    def __init__(self, fd: int):
        self.fd = fd
        self.end = 0
        self._lock = threading.Lock()

    def record(self, start: int, end: int) -> None:
        with self._lock:
            self.end = max(self.end, end)

    def write(self, offset: int, data: memoryview) -> None:
        os.pwrite(self.fd, data, offset)
        self.record(offset, offset + len(data))


class Following:
    """Fetch ``url`` into ``dest`` as the file grows at the source (a server that serves it as a growing
    file holds the RETR until there is something to send). Starts at once in a thread; :meth:`result` waits
    for the end (the file's size) or raises the failure (``dest`` is then removed); :meth:`cancel` stops it.
    ``received`` counts the bytes so far. Unverified: the caller checks the digest. ``limit``: no byte may land at or
    past this offset (the source is untrusted: a follower never holds more than the caller expects the file to be).
    ``server_dn``, ``identify``: as :func:`gridftp.transfer.download` takes them (a URL naming the address a caller
    checked, the server's certificate checked for the name by ``identify``)."""

    def __init__(self, url: str, dest: str | os.PathLike, parallel: int = 1, *, credential=None, trust=None,
                 gsi: bool = False, timeout: float = 60.0, prot: str = "P", limit: int | None = None,
                 refuse_server=None, server_dn: str | None = None, identify=None):
        from .client import GridFTPURL
        self.url = GridFTPURL.parse(url)
        self.dest = Path(dest)
        self.parallel = max(1, parallel)
        self.timeout = timeout
        self.limit = limit
        self.counter = Counter()
        self._opts = (credential, trust, gsi, prot, refuse_server)
        self._server = (server_dn, identify)
        self._cancelled = threading.Event()
        self._session = None
        self._receiver: ModeEReceiver | None = None
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.finished: float | None = None
        self._ready = threading.Event()
        self._worker = Worker(self._run, "gridftp-following")

    def wait_ready(self, timeout: float) -> bool:
        """True once the session is up and the server has opened its data connections (or the follower ended):
        from then on nothing is left to set up before the first byte."""
        return self._ready.wait(timeout)

    @property
    def received(self) -> int:
        return self.counter.total

    def done(self) -> bool:
        return not self._worker.alive

    def wait(self, timeout: float | None = None) -> bool:
        """True once it ended (either way) within ``timeout`` seconds."""
        return self._worker.join(timeout)

    def result(self, timeout: float | None = None) -> int:
        if not self._worker.join(timeout):
            raise TransferError(f"{self.url}: still following after {timeout} s")
        if self._worker.error is not None:
            raise self._worker.error
        return self._worker.value

    def cancel(self) -> None:
        """Stop now (the session and the data connections are cut) and wait for the thread."""
        self._cancelled.set()
        with self._lock:
            receiver, session = self._receiver, self._session
        if receiver is not None:
            receiver.fail(TransferError("cancelled"))
        if session is not None:
            try:
                session.control.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._worker.join(30)

    def _when_connected(self, receiver: ModeEReceiver) -> None:
        deadline = time.monotonic() + self.timeout
        while receiver.connections < self.parallel and not receiver.done and time.monotonic() < deadline:
            time.sleep(POLL)
        self._ready.set()

    def _run(self) -> int:
        try:
            return self._follow()
        finally:
            self.finished = time.monotonic()
            self._ready.set()

    def _follow(self) -> int:
        from .transfer import PREPARE, _Options, _activity, _await_final, _prepare, _start_transfer
        credential, trust, gsi, prot, refuse_server = self._opts
        server_dn, identify = self._server
        opts = _Options(credential, trust, self.timeout, identify, gsi, prot, refuse_server)
        fd = None
        try:
            with opts.client(self.url, server_dn, PREPARE) as session:
                with self._lock:
                    self._session = session
                if self._cancelled.is_set():
                    raise TransferError("cancelled")
                if not _prepare(session):
                    raise ProtocolError(f"{self.url.host}: no MODE E: a growing file cannot be followed")
                self.dest.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
                sink = _Sink(fd)
                listener = session.data_listener()
                receiver = ModeEReceiver(sink, counter=self.counter, limit=self.limit)
                with self._lock:
                    self._receiver = receiver
                acceptor = accept_connections(listener, receiver, protection=session.data_protection(),
                                              timeout=self.timeout)
                try:
                    p = self.parallel
                    _start_transfer(session, [f"OPTS RETR Parallelism={p},{p},{p};",
                                              session.port_command(*listener.getsockname()[:2])],
                                    f"RETR {self.url.path}")
                    ready = Worker(lambda: self._when_connected(receiver), "gridftp-following-ready")
                    final = _await_final(session, alive=_activity(self.counter))
                    ready.join(0)
                    if not final.ok:
                        raise TransferError(f"{self.url}: the server ended the transfer: {final.code} {final.text}")
                    if not receiver.wait(self.timeout):
                        raise TransferError(f"{self.url}: the server finished but the data did not all arrive")
                    if receiver.error is not None:
                        raise receiver.error
                finally:
                    if not receiver.done:
                        receiver.fail(TransferError("transfer abandoned"))
                    shutdown_listener(listener)
                    acceptor.join(timeout=5)
                    receiver.close()
                if self._cancelled.is_set():
                    raise TransferError("cancelled")
                os.ftruncate(fd, sink.end)
                return sink.end
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
                fd = None
            self.dest.unlink(missing_ok=True)
            if self._cancelled.is_set() and not isinstance(exc, TransferError):
                raise TransferError(f"{self.url}: cancelled") from None
            if isinstance(exc, (TransferError, ProtocolError)):
                raise
            raise TransferError(f"{self.url}: {exc}") from None
        finally:
            if fd is not None:
                os.close(fd)
