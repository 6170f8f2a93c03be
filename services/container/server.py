"""The grid container process: a threaded cheroot WSGI server hosting services on one port, with
WS-Security in front of the SOAP application and (by default) TLS from the host certificate."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from cheroot import wsgi

from security.tls import MAX_REQUEST_BODY
from services.container.app import SoapApplication
from services.container.service import SoapService

log = logging.getLogger("vmgrid.container")

Middleware = Callable[[Callable], Callable]


class Container:
    """Serves ``services`` on ``host:port`` (0 = a free port). ``middleware`` wraps the SOAP
    application (WS-Security verification and response signing); ``ssl_adapter`` turns on TLS."""

    def __init__(self, services: Iterable[SoapService], *, host: str = "127.0.0.1", port: int = 0,
                 middleware: Middleware, ssl_adapter=None, public_url: str | None = None,
                 threads: int = 16, validate_responses: bool = False, public_host: str | None = None):
        self.services = list(services)
        self.public_host = public_host   # the host name in the default public URL (the host certificate's)
        self.app = SoapApplication(self.services, public_url=public_url, validate_responses=validate_responses)
        self.wsgi_app = middleware(self.app)
        self.server = wsgi.Server((host, port), self.wsgi_app, numthreads=threads,
                                  server_name="vmgrid", shutdown_timeout=2)
        # cheroot would otherwise read any body whole; WS-Security refuses far smaller messages itself.
        self.server.max_request_body_size = MAX_REQUEST_BODY
        if ssl_adapter is not None:
            self.server.ssl_adapter = ssl_adapter
        self.tls = ssl_adapter is not None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.server.bind_addr[0]

    @property
    def port(self) -> int:
        return self.server.bind_addr[1]

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

    def start(self) -> "Container":
        """Bind and serve in a background thread; returns once the port is bound."""
        self.server.prepare()
        self.app.bind(self.public_base_url, self.base_url)
        self._thread = threading.Thread(target=self.server.serve, name="vmgrid-container", daemon=True)
        self._thread.start()
        for s in self.services:
            s.start()
        log.info("serving %s at %s", ", ".join(s.name for s in self.services), self.base_url)
        return self

    def serve_forever(self) -> None:
        """Serve (starting first if needed) until interrupted (KeyboardInterrupt), then stop."""
        if self._thread is None:
            self.start()
        try:
            self._thread.join()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        try:
            self.server.stop()
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
