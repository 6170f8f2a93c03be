"""TLS over one accepted TCP connection, with the handshake's computation off the event loop (issue 9.3).

asyncio's own TLS transport computes every handshake step inside the event loop: with hundreds of
clients connecting at once, the loop spends whole turns signing ServerHellos while the established
connections' requests and answers wait (measured: half of the loop's time under the bench's attack).
Here the TLS state is the standard library's :class:`ssl.SSLObject` over two memory BIOs, fed from and
drained into the plain TCP stream by the event loop; each handshake step (``do_handshake``, where OpenSSL
does the public-key work with the GIL released) up to the server's first flight runs on the container's
TLS threads, in turns per client address (turns.py); the rest (checking the client's Finished) is cheap
and done in the loop at once, so a handshake under way never waits behind new ones. After the handshake,
reading and writing encrypt and decrypt in the loop as asyncio's transport does.

:class:`TLSStream` offers what the container's connection code uses of asyncio's StreamReader and
StreamWriter: ``read``, ``write``, ``drain``, ``close``, ``wait_closed``, ``transport``,
``get_extra_info``."""
from __future__ import annotations

import asyncio
import ssl
from concurrent.futures import Executor

from services.container.turns import TurnGate

READ_CHUNK = 64 * 1024


class TLSStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext):
        self._reader = reader
        self._writer = writer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._eof = False

    @property
    def transport(self) -> asyncio.Transport:
        return self._writer.transport

    def get_extra_info(self, name: str, default=None):
        if name == "ssl_object":
            return self._tls
        return self._writer.get_extra_info(name, default)

    async def handshake(self, pool: Executor, gate: TurnGate, key: str) -> None:
        """The TLS handshake: each step computed on ``pool`` in its turn at ``gate``; the client's flights
        read by the loop in between. Raises ConnectionError (closed, or a TLS error) or ssl.SSLError."""
        loop = asyncio.get_running_loop()
        answered = False
        while True:
            try:
                if not answered:     # up to the server's first flight: the signature and key exchange, on a TLS thread
                    async with gate.turn(key):
                        done = await loop.run_in_executor(pool, self._step)
                else:                # the client's Finished (and certificate): a check, cheap, done here at once so
                    done = self._step()  # that a handshake under way is never queued behind new ones
            except ssl.SSLError:
                self._flush()        # the alert that tells the client why
                raise
            answered = answered or self._outgoing.pending > 0
            self._flush()
            if done:
                return
            if not await self._fill():
                raise ConnectionError("the client closed the connection during the TLS handshake")

    def _step(self) -> bool:
        """One handshake step (on a handshake thread): True once the handshake is complete."""
        try:
            self._tls.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False

    async def _fill(self) -> bool:
        """Feed what the client sent into TLS; False at the end of the TCP stream."""
        if self._eof:
            return False
        data = await self._reader.read(READ_CHUNK)
        if not data:
            self._eof = True
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending and not self._writer.is_closing():
            self._writer.write(pending)

    async def read(self, n: int = READ_CHUNK) -> bytes:
        """Up to ``n`` bytes of application data; b"" when the client closed (close_notify or TCP)."""
        if not self._tls.pending() and not self._incoming.pending:   # nothing buffered (between requests): wait for
            if not await self._fill():                               # the client first, not an SSLWantReadError
                return b""
        while True:
            try:
                data = self._tls.read(n)
                self._flush()
                return data
            except ssl.SSLWantReadError:
                self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLEOFError:
                return b""

    def write(self, data: bytes) -> None:
        if data:
            self._tls.write(data)
        self._flush()

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        """Send close_notify, then close the TCP connection once what is written has gone out."""
        try:
            self._tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass                       # SSLWantReadError: our close_notify is out, the client's not awaited
        self._flush()
        self._writer.close()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()
