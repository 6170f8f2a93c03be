"""The guest end of the virtio-serial channel: /dev/vportNpM found by its name, JSON lines both ways.

While the host side is not connected, reads return end-of-file (and poll says POLLHUP) and writes
would block: the port then waits, keeps outgoing messages queued, and carries on when the host
connects again (after a restore or a migration the host end is a new QEMU and a new VMManager).
"""
from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from . import protocol
from .context import ContextError, InstanceContext, validate
from .system import Roots

log = logging.getLogger("guestd.port")
Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_OUTBOX = 1000
HUP_BACKOFF = 0.2          # seconds between looks at a port whose host side is gone, at most
HUP_FIRST = 0.01           # ... and at first: a restored or migrated guest's new host connects within moments


def find_port(roots: Roots, name: str) -> Path | None:
    """The device of the virtio-serial port called ``name`` (/sys/class/virtio-ports/*/name)."""
    ports = roots.sys / "class" / "virtio-ports"
    if not ports.is_dir():
        return None
    for entry in sorted(ports.iterdir()):
        try:
            if (entry / "name").read_text().strip() == name:
                return roots.dev / entry.name
        except OSError:
            continue
    return None


class GuestPort:
    """Serves host requests with registered handlers and sends guestd's messages, with the token."""

    def __init__(self, device: Path | None = None, fd: int | None = None) -> None:
        self.device, self._fd = device, fd
        self._outbox: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._handlers: dict[str, Handler] = {}
        self._token = ""
        self._context: InstanceContext | None = None
        self._context_event = threading.Event()
        self._settled = False          # guestd has its context (from any source): no pushes accepted
        self._stop = threading.Event()
        self.host_connected = False
        self.received_at: float | None = None   # time.monotonic() when the last host message was read
        self._hup_wait = HUP_FIRST
        self.hups = 0                  # looks at a host-less port since the last host message (recontext_seconds)
        self.wait_began: float | None = None   # time.monotonic() when the loop last began to wait
        self._flushed: list[Callable[[], None]] = []   # run once the outbox is empty (after_flush)
        self._thread = threading.Thread(target=self._loop, name="guestd-port", daemon=True)

    def start(self) -> "GuestPort":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def native_id(self) -> int | None:
        """The port thread's kernel thread id (None before it starts)."""
        return self._thread.native_id

    def set_token(self, token: str) -> None:
        """Sign every later message with ``token``; guestd has its context from now on."""
        self._token = token
        self._settled = True

    def handle(self, op: str, handler: Handler) -> None:
        self._handlers[op] = handler

    def send(self, message: dict[str, Any]) -> None:
        """Queue one guest-to-host message (sent when the host is connected)."""
        line = protocol.encode({**message, "token": self._token})
        with self._lock:
            if len(self._outbox) >= MAX_OUTBOX:
                self._outbox.popleft()
            self._outbox.append(line)

    def after_flush(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once (on the port's thread) when every message queued so far has been written to
        the host: a recontext's raised priority lasts until its answer is out (guestd/rewake.py)."""
        with self._lock:
            self._flushed.append(fn)

    def wait_context(self, timeout: float) -> InstanceContext | None:
        """The context the host pushes with a ``context`` message (the channel context source)."""
        self._context_event.wait(timeout)
        return self._context

    def pending(self) -> int:
        with self._lock:
            return len(self._outbox)

    # -- the loop ---------------------------------------------------------------------------------
    def _open(self) -> int | None:
        if self._fd is None and self.device is not None:
            try:
                self._fd = os.open(self.device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("cannot open %s: %s", self.device, exc)
                return None
        return self._fd

    def _loop(self) -> None:
        buf = protocol.LineBuffer()
        while not self._stop.is_set():
            fd = self._open()
            if fd is None:
                self._stop.wait(1.0)
                continue
            with self._lock:
                want_out = bool(self._outbox)
            poller = select.poll()
            poller.register(fd, select.POLLIN | (select.POLLOUT if want_out else 0))
            self.wait_began = time.monotonic()
            events = poller.poll(200)
            if not events:
                continue
            ev = events[0][1]
            if ev & select.POLLIN:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data:
                    self.host_connected = True
                    self._hup_wait = HUP_FIRST
                    self.received_at = time.monotonic()
                    self.last_wait, self.last_hups = self.received_at - self.wait_began, self.hups
                    self.hups = 0
                    for line in buf.feed(data):
                        self._dispatch(line)
                    self._flush(fd)                # replies leave at once
                elif data == b"":                  # host side not connected: EOF until it is
                    self._disconnected(buf)
            if ev & select.POLLOUT:
                self.host_connected = True
                self._hup_wait = HUP_FIRST
                self._flush(fd)
            elif ev & (select.POLLHUP | select.POLLERR) and not ev & select.POLLIN:
                self._disconnected(buf)

    def _disconnected(self, buf: protocol.LineBuffer) -> None:
        """The host side is gone: poll cannot wait for it to come back (it says POLLHUP at once), so look
        again after a pause that starts short and doubles up to HUP_BACKOFF (a restored clone's node sends
        its recontext the moment it connects; a long-gone host costs a few wake-ups a second)."""
        self.host_connected = False
        buf.feed(b"\n")                            # drop a half-received line
        self.hups += 1
        self.wait_began = time.monotonic()
        self._stop.wait(self._hup_wait)
        self._hup_wait = min(self._hup_wait * 2, HUP_BACKOFF)

    def _flush(self, fd: int) -> None:
        with self._lock:
            while self._outbox:
                line = self._outbox[0]
                try:
                    n = os.write(fd, line)
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                        return
                    raise
                if n < len(line):
                    self._outbox[0] = line[n:]
                    return
                self._outbox.popleft()
            done, self._flushed = self._flushed, []
        for fn in done:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a hook never stops the port
                log.exception("an after-flush hook failed")

    def _dispatch(self, line: bytes) -> None:
        try:
            message = protocol.decode(line, protocol.HOST_OPS)
        except protocol.ProtocolError as exc:
            log.warning("refused a host message: %s", exc)
            self.send({"op": "reply", "id": -1, "ok": False, "error": str(exc)})
            return
        rid = message.get("id", 0)
        try:
            if message["op"] == "context":
                result = self._accept_context(message)
            else:
                handler = self._handlers.get(message["op"])
                if handler is None:
                    raise RuntimeError(f"{message['op']} is not available yet (guestd is starting)")
                result = handler(message)
            self.send({"op": "reply", "id": rid, "ok": True, "result": result})
        except Exception as exc:  # every failure is answered, never fatal to the port
            self.send({"op": "reply", "id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _accept_context(self, message: dict[str, Any]) -> dict[str, Any]:
        if self._context is not None or self._settled:
            raise ContextError("guestd already has its context (or takes it from another source)")
        ctx = validate(message["context"])
        self._token = ctx.token
        self._context = ctx
        self._context_event.set()
        return {"instance": ctx.instance}
