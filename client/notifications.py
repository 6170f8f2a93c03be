"""A WS-BaseNotification consumer for the client side: a small HTTPS-less endpoint on the client's
machine that accepts Notify messages only when they are signed by the producers it subscribed to: the host
credential of the node that answered the Subscribe (its DN, by its own host certificate, never a proxy)."""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterable

from cheroot import wsgi

from security.client import host_authorizer
from security.pki import host_of
from security.replay import MemoryReplayCache
from security.trust import TrustStore
from security.wssec import WSSecurityError, verify_envelope
from services.container.addressing import AddressingFault, check_request
from services.wsrf.namespaces import NOTIFY_ACTION

log = logging.getLogger("vmgrid.client.notifications")

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


class Refused(Exception):
    """A Notify this consumer does not take; the message says why (one line)."""


def node_dn(vm) -> str:
    """The DN of the host credential the node ``vm`` calls (a client.vmmanager.VMManagerClient) signs its answers
    with: its answer to a ListInstances of one, verified as signed by the host of the node's URL, by that host's
    own certificate (never a proxy)."""
    vm.list_page(max_results=1)
    signer = vm.service.zeep.wsse.last_signer
    if signer is None or signer.is_proxy:
        raise RuntimeError(f"the answer of {vm.service.url} carried no verified host signer")
    return signer.dn


class NotificationConsumer:
    """Listens on ``host:port`` (0 = any free port) for Notify; ``changes`` is a queue of StateChange.

    Only the producers it subscribed to are heard: a Notify counts when the host credential of one of
    ``producers`` (DNs; :meth:`subscribe` adds the node's, :meth:`expect` any) signed it with its own certificate.
    Any other signer (another node of the site, a guest's container, whose certificates are grid host
    certificates too, a proxy of the producer's credential) is refused: answered with an error, logged, counted in
    ``refused``; the consumer goes on."""

    def __init__(self, trust: TrustStore, host: str = "127.0.0.1", port: int = 0, *, producers: Iterable[str] = ()):
        self.trust = trust
        self.changes: queue.Queue[StateChange] = queue.Queue()
        self.refused = 0
        self.replay = MemoryReplayCache()     # a Notify captured on the way (plain HTTP) is not taken twice
        self._producers: set[str] = set(producers)
        self._lock = threading.Lock()
        self.server = wsgi.Server((host, port), self._app, numthreads=4, server_name="vmgrid-consumer")
        self.server.max_request_body_size = MAX_NOTIFY
        self._thread: threading.Thread | None = None

    @property
    def producers(self) -> frozenset[str]:
        """The DNs whose Notify messages this consumer takes."""
        with self._lock:
            return frozenset(self._producers)

    def expect(self, dn: str) -> None:
        """Take the Notify messages the host credential ``dn`` signs from now on."""
        with self._lock:
            self._producers.add(dn)

    def forget(self, dn: str) -> None:
        """Take no more Notify messages of ``dn`` (a node an instance left)."""
        with self._lock:
            self._producers.discard(dn)

    def subscribe(self, vm, ref) -> str:
        """Subscribe this consumer to the changes of instance ``ref`` at its node (``vm``: a
        client.vmmanager.VMManagerClient) and take the ones that node signs; the subscription's key. The node's DN
        is the one that signed its answer before the Subscribe (so that a change right after it is not refused)."""
        self.expect(node_dn(vm))
        return vm.subscribe(ref, self.url)

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
        try:
            changes = self._take(environ)
        except Refused as exc:
            self.refused += 1
            log.warning("notification refused: %s", exc)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [f"refused: {exc}\n".encode()]
        except Exception as exc:   # noqa: BLE001 - whatever a sender makes of a message, the consumer goes on
            self.refused += 1
            log.warning("notification refused: it could not be read (%s: %s)", type(exc).__name__, exc)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"refused: the message could not be read\n"]
        for change in changes:
            self.changes.put(change)
        start_response("200 OK", [("Content-Type", "text/xml")])
        return [b""]

    def _take(self, environ) -> list[StateChange]:
        """The changes a Notify carries, once it is verified as a producer's; Refused otherwise."""
        try:
            length = max(0, int(environ.get("CONTENT_LENGTH") or 0))
        except ValueError:
            raise Refused("the request has no valid Content-Length") from None
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
            raise Refused(str(exc)) from None
        # a producer this consumer subscribed to, by its own host certificate: another host (another node, a
        # guest's container) cannot speak for the instances of the node it subscribed to, nor can a proxy of the
        # producer's credential (its DN is the host's, its key anyone's the host delegated to)
        producers = self.producers
        if caller.is_proxy or caller.dn not in producers:
            signer = f"a proxy {caller.subject}" if caller.is_proxy else caller.dn
            expected = ", ".join(sorted(producers)) or "none: it subscribed to no producer"
            raise Refused(f"a Notify signed by {signer}; this consumer takes those of the producers it subscribed "
                          f"to only ({expected})")
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
                raise Refused(f"a change of {producer or 'no producer'} signed by {caller.dn}")
            changes.append(StateChange(text("InstanceKey"), text("Identifier"), text("oldState"), text("newState"),
                                       text("time"), producer, caller.dn))
        return changes

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
