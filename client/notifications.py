"""A WS-BaseNotification consumer for the client side: a small HTTPS-less endpoint on the client's
machine that accepts Notify messages only when they are signed by a trusted grid host."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from cheroot import wsgi

from security.client import host_authorizer
from security.pki import host_of
from security.replay import MemoryReplayCache
from security.trust import TrustStore
from security.wssec import WSSecurityError, verify_envelope
from services.container.addressing import AddressingFault, check_request
from services.wsrf.namespaces import NOTIFY_ACTION

WSNT = "http://docs.oasis-open.org/wsn/b-2"
VMM = "http://vmgrid.org/ns/vmmanager/1"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
MAX_NOTIFY = 256 * 1024


@dataclass(frozen=True)
class StateChange:
    key: str
    identifier: str
    old: str
    new: str
    time: str
    producer: str      # the VMManager's address
    signer: str        # the verified host DN that signed the Notify


class NotificationConsumer:
    """Listens on ``host:port`` (0 = any free port) for Notify; ``changes`` is a queue of StateChange."""

    def __init__(self, trust: TrustStore, host: str = "127.0.0.1", port: int = 0):
        self.trust = trust
        self.changes: queue.Queue[StateChange] = queue.Queue()
        self.refused = 0
        self.replay = MemoryReplayCache()     # a Notify captured on the way (plain HTTP) is not taken twice
        self.server = wsgi.Server((host, port), self._app, numthreads=4, server_name="vmgrid-consumer")
        self.server.max_request_body_size = MAX_NOTIFY
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.bind_addr[:2]
        return f"http://{host}:{port}/notify"

    def start(self) -> "NotificationConsumer":
        self.server.prepare()
        self._thread = threading.Thread(target=self.server.serve, daemon=True, name="vmgrid-consumer")
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> "NotificationConsumer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _app(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST":
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain")])
            return [b"POST Notify\n"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(min(length, MAX_NOTIFY))
        try:
            caller, root = verify_envelope(body, self.trust, replay=self.replay,
                                           expected_signer=lambda c: host_of(c.dn) is not None)
            # the signed wsa:To must be this consumer and the Action Notify (a Notify signed for another
            # consumer is refused here)
            header = root.find(f"{{{SOAP}}}Header")
            check_request(list(header) if header is not None else [], [self.url], NOTIFY_ACTION,
                          environ.get("HTTP_SOAPACTION"))
        except (WSSecurityError, AddressingFault) as exc:
            self.refused += 1
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [f"refused: {exc}\n".encode()]
        changes = []
        for holder in root.iterfind(f"{{{SOAP}}}Body/{{{WSNT}}}Notify/{{{WSNT}}}NotificationMessage"):
            change = holder.find(f"{{{WSNT}}}Message/{{{VMM}}}StateChangeNotification")
            if change is None:
                continue
            text = lambda n: change.findtext(f"{{{VMM}}}{n}") or ""  # noqa: E731
            producer = holder.findtext(f"{{{WSNT}}}ProducerReference/{{http://www.w3.org/2005/08/addressing}}Address") or ""
            # the producer (the node whose instance changed) must be the host that signed: any other host (another
            # node, or a guest container, whose certificates are host DNs too) cannot speak for its instances
            if not host_authorizer(producer)(caller):
                self.refused += 1
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
                return [f"refused: a change of {producer or 'no producer'} signed by {caller.dn}\n".encode()]
            changes.append(StateChange(text("InstanceKey"), text("Identifier"), text("oldState"), text("newState"),
                                       text("time"), producer, caller.dn))
        for change in changes:
            self.changes.put(change)
        start_response("200 OK", [("Content-Type", "text/xml")])
        return [b""]

    def wait(self, predicate, timeout: float = 10.0) -> StateChange:
        """The first received change for which ``predicate`` holds (others are dropped), or TimeoutError."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching notification")
            try:
                change = self.changes.get(timeout=left)
            except queue.Empty:
                raise TimeoutError("no matching notification") from None
            if predicate(change):
                return change
