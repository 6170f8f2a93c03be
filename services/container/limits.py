"""[container.limits]: what one connection may take of the grid container (docs/security.md). A light
module (no I/O, no parsing) so that reading the configuration loads nothing of the server."""
from __future__ import annotations

from dataclasses import dataclass

MAX_MESSAGE_BYTES = 16 * 1024 * 1024   # security.safexml.DEFAULT_MAX_BYTES: WS-Security refuses larger messages
FREE_BODY_BYTES = 256 * 1024           # a body up to this long is never refused for max_body_bytes_held (the
                                       # bodies of all connections this long are bounded by max_connections)


@dataclass
class ConnectionLimits:
    """[container.limits]: what one connection may take of the container (docs/security.md)."""

    handshake_timeout: float = 10.0      # seconds for a TLS handshake, its wait for a turn included
    handshake_threads: int = 1           # threads computing TLS handshake steps (off the event loop); waiting
                                         # connections take turns per client address
    header_timeout: float = 10.0         # seconds from a request's first byte (new connection: its handshake) to its end
    body_min_rate: int = 4096            # bytes/s a request body must keep up, after body_grace
    body_grace: float = 5.0              # seconds before body_min_rate applies
    idle_timeout: float = 15.0           # seconds a keep-alive connection may wait for its next request
    send_min_rate: int = 4096            # bytes/s a client must read the response at, after body_grace
    max_connections: int = 4096          # open connections in all (more are closed at once)
    max_connections_per_address: int = 64  # open connections from one client address
    max_header_bytes: int = 64 * 1024    # request line and headers
    max_body_bytes: int = MAX_MESSAGE_BYTES  # a request body (WS-Security refuses larger messages anyway)
    max_body_bytes_held: int = 1 << 30   # request body bytes held at once over all connections (read, waiting or
                                         # being answered); past it a body longer than FREE_BODY_BYTES gets 503
    max_markup_held: int = 4_000_000     # markup items ('<', '=') of the requests over 64 KiB a worker process verifies
                                         # and answers at once (their parse trees); past it such a request is refused
                                         # with a Server fault (security/middleware.py MarkupBudget)
