"""The control connection: CRLF lines over a socket that may switch to TLS (RFC 4217 AUTH TLS) or carry
RFC 2228 protected commands and replies (ENC and 632 with a GSSAPI context)."""
from __future__ import annotations

import base64
import binascii
import select
import socket
import sys
import time
from collections.abc import Callable

from .errors import ProtocolError, ReplyTimeout
from .protocol import MAX_LINE, Reply, format_reply, parse_reply_first_line

TYPE_CHECKING = False   # what typing.TYPE_CHECKING is at run time, without importing typing (the command's start)
if TYPE_CHECKING:
    import ssl

MAX_REPLY_LINES = 10_000
MAX_REPLY_BYTES = 1 << 20      # a reply (a client reads them) longer than this is the peer's fault: refused
_TELNET_STRIP = (b"\xff\xf4", b"\xff\xf2", b"\xff\xfd", b"\xff\xfb")   # IP, Synch, DO, WILL (RFC 959 ABOR)


def is_tls(sock: socket.socket) -> bool:
    """Is ``sock`` a TLS socket (AUTH TLS, PROT P, GSI)? Only the TLS paths load ``ssl`` (0.01 s of a start that
    ``vmgrid transfer ftp://`` pays before its first byte), so while it is not loaded no socket can be one."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(sock, ssl.SSLSocket)


class LineTooLong(ProtocolError):
    """A control line longer than :data:`~gridftp.protocol.MAX_LINE`."""


class ControlChannel:
    """Reads CRLF-terminated lines and writes replies or commands on one control connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()
        self.closed = False
        # a time.monotonic() by which the next line must be complete (None: only the socket's timeout)
        self.deadline: float | None = None
        # RFC 2228 protection once a GSSAPI context is established: wrap/unwrap of that context
        self.wrap: Callable[[bytes], bytes] | None = None
        self.unwrap: Callable[[bytes], bytes] | None = None
        # a client's bound on one reply: once its first byte is here, the whole of it within this many seconds
        # (a server trickling a reply a byte at a time, each within the socket's timeout, is cut off there)
        self.reply_time: float | None = None
        self._reply_started: float | None = None

    # -- reading ------------------------------------------------------------------------------
    def readline(self) -> str | None:
        """The next line without its CRLF, or None at end of stream."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                raw = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if len(raw) > MAX_LINE:
                    raise LineTooLong(f"control line of {len(raw)} bytes")
                for seq in _TELNET_STRIP:
                    raw = raw.replace(seq, b"")
                return raw.rstrip(b"\r").decode("utf-8", "surrogateescape")
            if len(self._buf) > MAX_LINE:
                self._buf.clear()
                self._drain_line()
                raise LineTooLong("control line too long")
            chunk = self._recv()
            if not chunk:
                self.closed = True
                return None
            self._buf += chunk

    def _recv(self) -> bytes:
        """Up to 64 KiB; with a :attr:`deadline`, a line trickled in a byte at a time still ends there
        (TimeoutError)."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the control line did not arrive in time")
            timeout = self.sock.gettimeout()
            if timeout is None or timeout > left:
                self.sock.settimeout(left)
        return self.sock.recv(65536)

    def _drain_line(self) -> None:
        while True:
            chunk = self._recv()
            if not chunk:
                self.closed = True
                return
            nl = chunk.find(b"\n")
            if nl >= 0:
                self._buf += chunk[nl + 1:]
                return

    def line_waiting(self, timeout: float = 0.0) -> bool:
        """True if a complete line (or end of stream) can be read without blocking long."""
        if b"\n" in self._buf:
            return True
        if is_tls(self.sock) and self.sock.pending():
            return True
        try:
            poller = select.poll()      # not select(): descriptors above FD_SETSIZE are fine
            poller.register(self.sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(max(0, int(timeout * 1000))))
        except (OSError, ValueError):
            return True

    def read_reply(self) -> Reply:
        """One complete (possibly multi-line) reply; raises ProtocolError or EOFError.

        Nothing is consumed until the whole reply has arrived, so a socket timeout can be
        caught and the call repeated (the client polls this way during long transfers).
        """
        while True:
            reply = self._buffered_reply()
            if reply is not None:
                self._reply_started = time.monotonic() if self._buf else None    # the next one's start, if here
                return reply
            if len(self._buf) > MAX_REPLY_BYTES:
                raise ProtocolError(f"reply longer than {MAX_REPLY_BYTES} bytes")
            chunk = self._recv_reply()
            if not chunk:
                self.closed = True
                raise EOFError("control connection closed")
            self._buf += chunk

    def _recv_reply(self) -> bytes:
        if self.reply_time is None or not self._buf:
            return self.sock.recv(65536)
        if self._reply_started is None:
            self._reply_started = time.monotonic()
        left = self._reply_started + self.reply_time - time.monotonic()
        if left <= 0:
            raise ReplyTimeout(f"a reply still incomplete {self.reply_time:g} s after it began")
        timeout = self.sock.gettimeout()
        if timeout is not None and timeout <= left:
            return self.sock.recv(65536)
        self.sock.settimeout(left)
        try:
            return self.sock.recv(65536)
        finally:
            self.sock.settimeout(timeout)

    def _protected_reply(self, reply: Reply) -> Reply:
        """The reply inside a 631/632/633 reply (RFC 2228): every line is one wrapped token."""
        if self.unwrap is None:
            raise ProtocolError(f"protected reply {reply.code} without a security context")
        try:
            data = b"".join(self.unwrap(base64.b64decode(line[4:].strip(), validate=True))
                            for line in reply.lines if len(line) > 4)
        except (ValueError, binascii.Error) as exc:
            raise ProtocolError(f"protected reply does not decode: {exc}") from None
        data = data.rstrip(b"\0")
        if not data.endswith(b"\n"):
            data += b"\r\n"
        inner = ControlChannel.__new__(ControlChannel)
        inner._buf = bytearray(data)
        inner.unwrap = None
        decoded = inner._buffered_reply()
        if decoded is None or inner._buf:
            raise ProtocolError("protected reply holds no single reply")
        return decoded

    def _buffered_reply(self) -> Reply | None:
        pos = 0
        code: int | None = None
        lines: list[str] = []
        while True:
            nl = self._buf.find(b"\n", pos)
            if nl < 0:
                if len(self._buf) - pos > MAX_LINE:
                    raise LineTooLong("reply line too long")
                return None
            line = bytes(self._buf[pos:nl]).rstrip(b"\r").decode("utf-8", "replace")
            pos = nl + 1
            if code is None:
                code, continued = parse_reply_first_line(line)
                lines.append(line)
                if not continued:
                    break
                continue
            lines.append(line)
            if len(lines) > MAX_REPLY_LINES:
                raise ProtocolError("reply too long")
            if line.startswith(f"{code} ") or line == str(code):
                break
        del self._buf[:pos]
        reply = Reply(code, tuple(lines))
        if code in (631, 632, 633) and self.unwrap is not None:
            return self._protected_reply(reply)
        return reply

    @property
    def buffered(self) -> bool:
        return bool(self._buf)

    # -- writing -----------------------------------------------------------------------------
    def send_reply(self, code: int, text: str | list[str]) -> None:
        data = format_reply(code, text)
        if self.wrap is not None:      # a GSI session: the reply travels inside a 632 (RFC 2228)
            data = b"632 " + base64.b64encode(self.wrap(data)) + b"\r\n"
        self.sock.sendall(data)

    def _encode(self, line: str) -> bytes:
        if "\r" in line or "\n" in line:
            raise ProtocolError("line break inside a command")
        data = line.encode("utf-8", "surrogateescape") + b"\r\n"
        if self.wrap is not None:      # RFC 2228 ENC: the command as a token of the security context
            data = b"ENC " + base64.b64encode(self.wrap(data)) + b"\r\n"
        return data

    def send_line(self, line: str) -> None:
        self.sock.sendall(self._encode(line))

    def send_lines(self, lines: list[str]) -> None:
        """Several commands in one write (pipelining saves round trips on a long path)."""
        self.sock.sendall(b"".join(self._encode(ln) for ln in lines))

    # -- TLS --------------------------------------------------------------------------------------
    def start_tls(self, context: ssl.SSLContext, *, server_side: bool,
                  server_hostname: str | None = None) -> ssl.SSLSocket:
        """Wrap the connection in TLS; refuses if plaintext was pipelined after AUTH."""
        if self._buf:
            raise ProtocolError("data pipelined after AUTH TLS")
        self.sock = context.wrap_socket(self.sock, server_side=server_side,
                                        server_hostname=server_hostname)
        return self.sock

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
