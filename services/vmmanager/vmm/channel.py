"""The host end of the guest channel: JSON lines to and from guestd over the virtio-serial Unix socket.

One GuestChannelClient per instance. It reconnects on demand (a restore or migration starts a new QEMU
behind the same or another socket), routes replies to requests by id, keeps guestd's step reports
and checks that every guest message carries the instance's token.

A guest is untrusted input, so every operation here is bounded: connecting and writing have deadlines
(a write that cannot finish drops the connection instead of blocking), no lock is held across socket
I/O, what is read from a guest is rate-limited (a flood slows the guest down, it never pins a host
thread) and everything kept from it is capped (lines, reports, refusals). Waits can be cancelled by the
caller (``cancel=`` an Event) and end at once when the channel is retired (the instance stopped).
"""
from __future__ import annotations

import hmac
import itertools
import json
import logging
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from guestd import protocol
from guestd.context import InstanceContext
from services.common.errors import printable

from .errors import GuestChannelError, GuestUnavailable, GuestWaitCancelled

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]

CONNECT_TIMEOUT = 2.0      # seconds to connect to the channel socket
SEND_TIMEOUT = 2.0         # seconds a request line may take to leave; after that the connection is dropped
READ_RATE = 128 * 1024     # bytes per second read from one guest; a faster guest is slowed down
READ_BURST = 256 * 1024    # bytes a guest may send at once before the rate applies
LINE_COST = 512            # every line costs at least this much of the rate (a flood of tiny lines too)
MAX_STEPS = 16             # distinct step reports kept (guestd has six)
MAX_REJECTED = 50          # refusal reasons kept (the count goes on: ``rejected_total``)
GUEST_TEXT = 500           # characters of a guest's own words (a refusal's reason) put in an error, escaped
CANCEL_SLICE = 0.1         # seconds between looks at a caller's cancel event while waiting


class _Bucket:
    """A token bucket: ``take(n)`` returns how long to pause so the long-run rate stays under ``rate``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()

    def take(self, n: float) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - n
        self.at = now
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class _Connection:
    """One connected socket and what belongs to it: its reader thread's stop flag and its read budget."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stop = threading.Event()
        self.bytes_read = 0
        self._guard = threading.Lock()
        self._writers = 0
        self._reader_done = False

    def hang_up(self) -> None:
        """Wake the reader and any writer; the socket is closed once neither uses it any more."""
        self.stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def enter_writer(self) -> bool:
        with self._guard:
            if self.stop.is_set() or self._reader_done:
                return False
            self._writers += 1
            return True

    def leave_writer(self) -> None:
        with self._guard:
            self._writers -= 1
            last = self._writers == 0 and self._reader_done
        if last:
            self.sock.close()

    def reader_done(self) -> None:
        """The reader ends: close the descriptor now unless a writer still holds it (then it does),
        so a descriptor number is never reused under a writer's feet."""
        self.stop.set()
        with self._guard:
            self._reader_done = True
            last = self._writers == 0
        if last:
            self.sock.close()


class GuestChannelClient:
    """Requests to guestd (ping, status, set-time, context) and the reports guestd sends."""

    connect_timeout = CONNECT_TIMEOUT
    send_timeout = SEND_TIMEOUT
    read_rate = READ_RATE
    read_burst = READ_BURST

    def __init__(self, instance: str, path: Path, token: str) -> None:
        self.instance, self.path, self._token = instance, Path(path), token
        self._previous = ""                    # a token guestd may still hold (a migrated instance), until it changes
        self._lock = threading.Lock()          # guards the connection and the waiters; never held over I/O
        self._send_lock = threading.Lock()     # one writer at a time (lines must not interleave)
        self._connect_lock = threading.Lock()  # one connect at a time
        self._conn: _Connection | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, list] = {}    # id -> [event, reply]
        self._ready = threading.Event()
        self._retired = threading.Event()
        self._retired_why = ""
        self._listeners: list[Listener] = []
        self.reports: dict[str, dict[str, Any]] = {}   # step -> its latest report (at most MAX_STEPS)
        self.ready_message: dict[str, Any] | None = None
        self.rejected: list[str] = []          # why messages were refused (the latest MAX_REJECTED)
        self.rejected_total = 0
        self.bytes_read = 0                    # over every connection (for the flood bound)

    def accept_previous(self, token: str) -> None:
        """Also take guestd's messages signed with ``token`` until the first one with this channel's token: a
        migrated guest holds the source node's token until the target's ``migrated`` request gives it this one."""
        self._previous = token

    # -- connection -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def retired(self) -> bool:
        return self._retired.is_set()

    def _check_retired(self) -> None:
        if self._retired.is_set():
            raise GuestWaitCancelled(f"the guest channel of {self.instance} was retired: {self._retired_why}")

    def _connection(self) -> _Connection:
        """The current connection, connecting first (with a deadline) when there is none."""
        self._check_retired()
        with self._lock:
            if self._conn is not None:
                return self._conn
        if not self._connect_lock.acquire(timeout=self.connect_timeout):
            raise GuestUnavailable(f"guest channel of {self.instance}: another connect is stuck")
        try:
            with self._lock:
                if self._conn is not None:
                    return self._conn
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.connect_timeout)
            try:
                s.connect(str(self.path))
            except OSError as exc:
                s.close()
                raise GuestUnavailable(f"guest channel of {self.instance} at {self.path}: "
                                       f"{getattr(exc, 'strerror', None) or exc}") from None
            s.settimeout(None)    # the reader blocks in recv (woken by hang_up); writes use MSG_DONTWAIT
            conn = _Connection(s)
            with self._lock:
                if self._retired.is_set():
                    s.close()
                    self._check_retired()
                self._conn = conn
            threading.Thread(target=self._read_loop, args=(conn,), name=f"guest-channel-{self.instance}",
                             daemon=True).start()
            return conn
        finally:
            self._connect_lock.release()

    def connect(self) -> None:
        """Connect now (requests connect by themselves); GuestUnavailable if nothing listens."""
        self._connection()

    def _drop(self, conn: _Connection, why: str) -> None:
        with self._lock:
            current = self._conn is conn
            if current:
                self._conn = None
        conn.hang_up()
        if current:
            self._fail_waiters(why)

    def close(self) -> None:
        """Disconnect; pending requests fail with GuestUnavailable. A later request reconnects.

        Never blocks on the guest: a writer stalled on a full socket is woken and fails.
        """
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.hang_up()
        self._fail_waiters("the guest channel was closed")

    def retire(self, why: str = "the instance stopped") -> None:
        """Close for good: every wait and request, now and later, ends with GuestWaitCancelled.

        The VMM retires an instance's channel when the instance is destroyed, saved, shut down or
        undefined, or the node closes; the next guest_channel() call gives a fresh client.
        """
        self._retired_why = why
        self._retired.set()
        self.close()

    def _fail_waiters(self, why: str) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for w in waiters.values():
            w[1] = GuestUnavailable(f"{self.instance}: {why}")
            w[0].set()

    def _read_loop(self, conn: _Connection) -> None:
        buf = protocol.LineBuffer()
        budget = _Bucket(self.read_rate, self.read_burst)
        s = conn.sock
        try:
            while not conn.stop.is_set():
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                conn.bytes_read += len(data)
                self.bytes_read += len(data)
                lines = buf.feed(data)
                pause = budget.take(len(data) + LINE_COST * len(lines))
                for line in lines:
                    try:
                        self._handle(line)
                    except Exception as exc:  # noqa: BLE001 - a guest's message of a shape not foreseen: refused,
                        self._refuse(f"a message the host could not handle ({type(exc).__name__})")  # reader lives
                if pause and conn.stop.wait(pause):   # a flood: leave it in the socket, the guest waits
                    break
        finally:
            with self._lock:
                current = self._conn is conn
                if current:
                    self._conn = None
            conn.reader_done()
            if current:  # a connection closed by close() has already failed its waiters
                self._fail_waiters("the guest channel closed (instance stopped, saved or moved)")

    def _refuse(self, why: str) -> None:
        why = printable(why, GUEST_TEXT)   # it quotes the guest's line (an op of 60 KB): one escaped, cut line
        self.rejected_total += 1
        self.rejected.append(why)
        if len(self.rejected) > MAX_REJECTED:
            del self.rejected[0]
        if self.rejected_total <= 10 or self.rejected_total % 1000 == 0:   # a flood does not flood the log
            log.warning("guest %s: refused a message (%d so far): %s", self.instance, self.rejected_total, why)

    def _handle(self, line: bytes) -> None:
        try:
            message = protocol.decode(line, protocol.GUEST_OPS)
        except protocol.ProtocolError as exc:
            self._refuse(str(exc))
            return
        if not message["token"] and message["op"] == "reply":
            return   # an answer from before guestd had its context (a stale request): nothing to say
        if hmac.compare_digest(message["token"].encode(), self._token.encode()):
            self._previous = ""                # guestd has this channel's token: the previous one is done
        elif not (self._previous and hmac.compare_digest(message["token"].encode(), self._previous.encode())):
            self._refuse(f"bad token in a {message['op']} message")
            return
        op = message["op"]
        if op == "reply":
            with self._lock:
                waiter = self._waiters.pop(message.get("id", -1), None)
            if waiter is not None:
                waiter[1] = message
                waiter[0].set()
            return
        if op == "report":
            if message["step"] not in self.reports and len(self.reports) >= MAX_STEPS:
                self._refuse(f"more than {MAX_STEPS} distinct steps reported")
                return
            self.reports[message["step"]] = message
        elif op == "ready":
            self.ready_message = message
            steps = message.get("steps")
            for step, report in (steps.items() if isinstance(steps, dict) else ()):   # any shape may come
                if isinstance(report, dict) and len(self.reports) < MAX_STEPS:
                    self.reports.setdefault(str(step), report)
            self._ready.set()
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:  # a listener's failure must not stop the channel
                log.exception("guest channel listener failed")

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every ready and report message (on the channel's reader thread)."""
        self._listeners.append(listener)

    # -- requests ---------------------------------------------------------------------------------
    def _send(self, conn: _Connection, line: bytes, budget: float) -> None:
        """Write one whole line by ``deadline`` or drop the connection (a half-written line would
        corrupt the stream): a guest that does not read cannot block the host."""
        deadline = time.monotonic() + budget
        if not self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise GuestUnavailable(f"guest channel of {self.instance}: an earlier request is still stuck sending")
        if not conn.enter_writer():
            self._send_lock.release()
            raise GuestUnavailable(f"the guest channel of {self.instance} closed")
        try:
            view = memoryview(line)
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or conn.stop.is_set():
                    self._drop(conn, "a request could not be written (guestd is not reading)")
                    raise GuestUnavailable(f"guestd in {self.instance} does not read its channel: "
                                           f"a request could not be sent within {budget:g} s")
                try:
                    poller = select.poll()
                    poller.register(conn.sock, select.POLLOUT)
                    if not poller.poll(min(remaining, CANCEL_SLICE) * 1000):
                        continue
                    view = view[conn.sock.send(view, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    continue
                except (OSError, ValueError) as exc:   # ValueError: the socket was closed meanwhile
                    self._drop(conn, f"sending failed: {exc}")
                    raise GuestUnavailable(f"{self.instance}: sending a request: {exc}") from None
        finally:
            conn.leave_writer()
            self._send_lock.release()

    def request(self, op: str, timeout: float = 5.0, cancel: threading.Event | None = None,
                **fields: Any) -> dict[str, Any]:
        """Send one request and wait for guestd's reply; return its ``result`` object.

        Bounded by ``timeout`` in every part (connect, send, answer). GuestUnavailable when guestd does
        not answer in time; GuestWaitCancelled when ``cancel`` is set or the channel is retired.
        """
        if op not in protocol.HOST_OPS:
            raise GuestChannelError(f"{op!r} is not a host-to-guest operation")
        deadline = time.monotonic() + timeout
        event = threading.Event()
        waiter: list = [event, None]
        rid = next(self._ids)
        try:
            line = protocol.encode({"op": op, "id": rid, **fields})
        except (protocol.ProtocolError, TypeError, ValueError) as exc:
            raise GuestChannelError(f"cannot send {op} to {self.instance}: {exc}") from None
        conn = self._connection()
        with self._lock:
            self._waiters[rid] = waiter
        try:
            try:
                self._send(conn, line, max(0.0, min(deadline - time.monotonic(), self.send_timeout)))
            except GuestUnavailable:
                self._check_retired()
                raise
            while not event.wait(max(0.0, min(CANCEL_SLICE, deadline - time.monotonic()))):
                if cancel is not None and cancel.is_set():
                    raise GuestWaitCancelled(f"waiting for guestd in {self.instance} to answer {op} was cancelled")
                self._check_retired()
                if time.monotonic() >= deadline:
                    raise GuestUnavailable(f"guestd in {self.instance} did not answer {op} within {timeout:g} s")
        finally:
            with self._lock:
                self._waiters.pop(rid, None)
        reply = waiter[1]
        if isinstance(reply, Exception):
            self._check_retired()
            raise reply
        if not reply.get("ok"):
            # the guest's words, escaped and cut: they end up in the node log, GuestStatus and Failure
            raise GuestChannelError(f"guestd in {self.instance} refused {op}: "
                                    f"{printable(reply.get('error', 'no reason'), GUEST_TEXT)}")
        result = reply.get("result", {})
        return result if isinstance(result, dict) else {"value": result}

    def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time to guestd in seconds."""
        t0 = time.monotonic()
        self.request("ping", timeout)
        return time.monotonic() - t0

    def status(self, timeout: float = 5.0, cancel: threading.Event | None = None) -> dict[str, Any]:
        """guestd's status: ready, each step's report, the guest clock, the addresses it set."""
        return self.request("status", timeout, cancel)

    def set_time(self, when: float | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """Set the guest clock to ``when`` (default: the host's clock as the request leaves)."""
        return self.request("set-time", timeout, time=time.time() if when is None else when)

    def send_context(self, context: InstanceContext, timeout: float = 5.0) -> dict[str, Any]:
        """Give guestd its context over the channel (the virtio-serial context source)."""
        return self.request("context", timeout, context=json.loads(context.to_json()))

    def wait_ready(self, timeout: float = 120.0, poll: float = 2.0,
                   cancel: threading.Event | None = None) -> dict[str, Any]:
        """Wait until guestd reports ready (it finished its boot steps); return its status.

        Asks for status every ``poll`` seconds as well, so a ready sent before this client connected
        is not missed. GuestUnavailable after ``timeout`` (whatever the guest does meanwhile: silent,
        not reading, flooding); GuestWaitCancelled as soon as ``cancel`` is set or the channel is
        retired (within about a tenth of a second).
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        answered = False

        def stop_requested() -> None:
            if cancel is not None and cancel.is_set():
                raise GuestWaitCancelled(f"waiting for guestd in {self.instance} to get ready was cancelled")
            self._check_retired()

        while True:
            stop_requested()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not answered:     # the last status request's own timeout would say nothing useful
                    last = "it never answered on the guest channel: the guest did not boot as far as guestd, " \
                           "or its image has no guestd" + ("" if " did not answer " in last or last == "no answer"
                                                            else f"; last: {last}")
                raise GuestUnavailable(f"guestd in {self.instance} not ready within {timeout:g} s ({last})")
            try:
                status = self.status(timeout=min(poll, remaining), cancel=cancel)
                answered = True
                if status.get("ready"):
                    return status
                last = f"guestd says: {printable(status.get('error') or 'not ready yet', GUEST_TEXT)}"
            except GuestWaitCancelled:
                stop_requested()
                raise
            except (GuestUnavailable, GuestChannelError) as exc:
                last = str(exc)
            # back off a little (a domain still starting has no socket yet); a ready report wakes us
            pause_until = min(deadline, time.monotonic() + 0.2)
            while time.monotonic() < pause_until and not self._ready.is_set():
                stop_requested()
                self._ready.wait(max(0.0, min(CANCEL_SLICE, pause_until - time.monotonic())))
            if self._ready.is_set():
                self._ready.clear()     # a fresh ready report: ask for the status at once
