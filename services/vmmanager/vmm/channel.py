"""The host end of the guest channel: JSON lines to and from guestd over the virtio-serial Unix socket.

One GuestChannelClient per instance. It reconnects on demand (a restore or migration starts a new QEMU
behind the same or another socket), routes replies to requests by id, keeps guestd's step reports
and checks that every guest message carries the instance's token.
"""
from __future__ import annotations

import hmac
import itertools
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from guestd import protocol
from guestd.context import InstanceContext

from .errors import GuestChannelError, GuestUnavailable

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]


class GuestChannelClient:
    """Requests to guestd (ping, status, set-time, context) and the reports guestd sends."""

    def __init__(self, instance: str, path: Path, token: str) -> None:
        self.instance, self.path, self._token = instance, Path(path), token
        self._lock = threading.Lock()          # guards the socket and the waiters
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, list] = {}    # id -> [event, reply]
        self._ready = threading.Event()
        self._listeners: list[Listener] = []
        self.reports: dict[str, dict[str, Any]] = {}   # step -> its latest report
        self.ready_message: dict[str, Any] | None = None
        self.rejected: list[str] = []          # why messages were refused (bad token, malformed)

    # -- connection -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _connect_locked(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(str(self.path))
        except OSError as exc:
            s.close()
            raise GuestUnavailable(f"guest channel of {self.instance} at {self.path}: {exc.strerror or exc}") from None
        s.settimeout(None)
        self._sock = s
        threading.Thread(target=self._read_loop, args=(s,), name=f"guest-channel-{self.instance}",
                         daemon=True).start()
        return s

    def connect(self) -> None:
        """Connect now (requests connect by themselves); GuestUnavailable if nothing listens."""
        with self._lock:
            self._connect_locked()

    def close(self) -> None:
        """Disconnect; pending requests fail with GuestUnavailable. A later request reconnects."""
        with self._lock:
            s, self._sock = self._sock, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._fail_waiters("the guest channel was closed")

    def _fail_waiters(self, why: str) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for w in waiters.values():
            w[1] = GuestUnavailable(f"{self.instance}: {why}")
            w[0].set()

    def _read_loop(self, s: socket.socket) -> None:
        buf = protocol.LineBuffer()
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            for line in buf.feed(data):
                self._handle(line)
        with self._lock:
            current = self._sock is s
            if current:
                self._sock = None
        if current:       # a connection closed by close() has already failed its waiters
            s.close()
            self._fail_waiters("the guest channel closed (instance stopped, saved or moved)")

    def _handle(self, line: bytes) -> None:
        try:
            message = protocol.decode(line, protocol.GUEST_OPS)
        except protocol.ProtocolError as exc:
            self.rejected.append(str(exc))
            log.warning("guest %s: refused a message: %s", self.instance, exc)
            return
        if not message["token"] and message["op"] == "reply":
            return   # an answer from before guestd had its context (a stale request): nothing to say
        if not hmac.compare_digest(message["token"].encode(), self._token.encode()):
            self.rejected.append(f"bad token in a {message['op']} message")
            log.warning("guest %s: refused a %s message with a bad token", self.instance, message["op"])
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
            self.reports[message["step"]] = message
        elif op == "ready":
            self.ready_message = message
            for step, report in (message.get("steps") or {}).items():
                if isinstance(report, dict):
                    self.reports.setdefault(step, report)
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
    def request(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for guestd's reply; return its ``result`` object."""
        if op not in protocol.HOST_OPS:
            raise GuestChannelError(f"{op!r} is not a host-to-guest operation")
        event = threading.Event()
        waiter: list = [event, None]
        with self._lock:
            s = self._connect_locked()
            rid = next(self._ids)
            self._waiters[rid] = waiter
            line = protocol.encode({"op": op, "id": rid, **fields})
            try:
                s.sendall(line)
            except OSError as exc:
                self._waiters.pop(rid, None)
                raise GuestUnavailable(f"{self.instance}: sending {op}: {exc}") from None
        if not event.wait(timeout):
            with self._lock:
                self._waiters.pop(rid, None)
            raise GuestUnavailable(f"guestd in {self.instance} did not answer {op} within {timeout:g} s")
        reply = waiter[1]
        if isinstance(reply, Exception):
            raise reply
        if not reply.get("ok"):
            raise GuestChannelError(f"guestd in {self.instance} refused {op}: {reply.get('error', 'no reason')}")
        result = reply.get("result", {})
        return result if isinstance(result, dict) else {"value": result}

    def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time to guestd in seconds."""
        t0 = time.monotonic()
        self.request("ping", timeout)
        return time.monotonic() - t0

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """guestd's status: ready, each step's report, the guest clock, the addresses it set."""
        return self.request("status", timeout)

    def set_time(self, when: float | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """Set the guest clock to ``when`` (default: the host's clock as the request leaves)."""
        return self.request("set-time", timeout, time=time.time() if when is None else when)

    def send_context(self, context: InstanceContext, timeout: float = 5.0) -> dict[str, Any]:
        """Give guestd its context over the channel (the virtio-serial context source)."""
        import json
        return self.request("context", timeout, context=json.loads(context.to_json()))

    def wait_ready(self, timeout: float = 120.0, poll: float = 2.0) -> dict[str, Any]:
        """Wait until guestd reports ready (it finished its boot steps); return its status.

        Asks for status every ``poll`` seconds as well, so a ready sent before this client connected
        is not missed. GuestUnavailable after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestUnavailable(f"guestd in {self.instance} not ready within {timeout:g} s")
            try:
                status = self.status(timeout=min(poll, remaining))
                if status.get("ready"):
                    return status
            except GuestUnavailable:
                if not self.connected:  # nothing listens yet (domain starting): back off a little
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            self._ready.wait(min(0.2, max(0.0, deadline - time.monotonic())))
