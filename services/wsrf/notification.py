"""WS-BaseNotification: a producer's side. Subscribe read and answered, subscription records in SQLite
(:class:`Subscriptions`), Notify messages (:func:`notify_envelope`), which consumer addresses a producer
may send to (:class:`ConsumerPolicy`), and :class:`Notifier`, which signs each Notify with the host
credential and delivers it from background threads within a deadline (a slow or dead consumer never
holds up a resource, nor the other consumers for longer than that deadline).
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from lxml import etree

from security.tls import grid_session
from security.wssec import sign_envelope
from services.common.xsdtime import format_datetime, parse_datetime
from services.container.soap import envelope
from services.faults import InvalidArgument
from services.sqlite import Database
from services.wsrf.epr import EndpointReference
from services.wsrf.namespaces import NOTIFY_ACTION, TOPIC_SIMPLE, WSA, WSNT

log = logging.getLogger("vmgrid.wsrf.notification")


# -- which consumers a producer may call ----------------------------------------------------------------
NAT64 = ipaddress.ip_network("64:ff9b::/96")     # RFC 6052: a NAT64 gateway reaches the IPv4 address in the low bits


def reached(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address a connection to an IPv6 form of it reaches: IPv4-mapped (``::ffff:127.0.0.1``, which
    Linux connects as 127.0.0.1), IPv4-compatible (``::127.0.0.1``), 6to4 (``2002:7f00:1::``) and NAT64
    (``64:ff9b::7f00:1``); any other address as it is. Python 3.11's ``is_loopback`` and friends are False for
    all of these forms, so a check must look at the address they reach."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.sixtofour is not None:
            return addr.sixtofour
        if addr in NAT64 or (int(addr) >> 32 == 0 and int(addr) > 1):     # NAT64, or ::a.b.c.d (not :: or ::1)
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr


@dataclass(frozen=True)
class ConsumerPolicy:
    """Which consumer addresses a Subscribe may name (issue 9.8: a subscriber must not make a node send
    signed requests anywhere it likes). An http(s) URL whose host resolves only to addresses outside the
    refused ranges is allowed; by default the refused ranges are loopback, link-local, unspecified and
    multicast addresses (the node's own). ``allow`` lists networks (CIDR) allowed even so, e.g.
    ``127.0.0.0/8`` for a grid whose clients run on the nodes' machine (the local grid, tests)."""

    allow: tuple[str, ...] = ()

    def _allowed_networks(self):
        return [ipaddress.ip_network(a, strict=False) for a in self.allow]

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be a consumer, or None when it may."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "the consumer reference needs an http(s) address"
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError, UnicodeError) as exc:
            return f"the consumer host {parts.hostname!r} does not resolve: {exc}"
        allowed = self._allowed_networks()
        for info in infos:
            addr = reached(ipaddress.ip_address(info[4][0].split("%")[0]))
            if any(addr in net for net in allowed):
                continue
            if addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr.is_multicast:
                return (f"consumer address {addr} is this node's own (loopback or link-local); the site allows "
                        f"such consumers only when they are listed in its configuration")
        return None

    def check(self, url: str) -> None:
        """InvalidArgument (argument ConsumerReference) when ``url`` may not be a consumer."""
        reason = self.refusal(url)
        if reason:
            raise InvalidArgument(reason, argument="ConsumerReference")


# -- Subscribe ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubscribeRequest:
    consumer: str                      # the ConsumerReference's address
    initial_termination: float | None  # InitialTerminationTime (UNIX seconds), if asked


def parse_subscribe(request: etree._Element) -> SubscribeRequest:
    """A wsnt:Subscribe element; InvalidArgument when the consumer is not http(s) or the time is not one."""
    consumer = (request.findtext(f"{{{WSNT}}}ConsumerReference/{{{WSA}}}Address") or "").strip()
    if not consumer.startswith(("https://", "http://")):
        raise InvalidArgument("the consumer reference needs an http(s) address", argument="ConsumerReference")
    initial = request.findtext(f"{{{WSNT}}}InitialTerminationTime")
    when = None
    if initial:
        try:
            when = parse_datetime(initial)
        except ValueError as exc:
            raise InvalidArgument(str(exc), argument="InitialTerminationTime") from None
    return SubscribeRequest(consumer, when)


def subscribe_response(subscription: EndpointReference, expires: float, now: float | None = None,
                       nsmap: dict | None = None) -> etree._Element:
    """wsnt:SubscribeResponse: the subscription's EPR, the current time and when it ends."""
    resp = etree.Element(f"{{{WSNT}}}SubscribeResponse", nsmap={"wsnt": WSNT, "wsa": WSA, **(nsmap or {})})
    subscription.fill(etree.SubElement(resp, f"{{{WSNT}}}SubscriptionReference"))
    etree.SubElement(resp, f"{{{WSNT}}}CurrentTime").text = format_datetime(time.time() if now is None else now)
    etree.SubElement(resp, f"{{{WSNT}}}TerminationTime").text = format_datetime(expires)
    return resp


def new_subscription_key() -> str:
    return "sub-" + uuid.uuid4().hex


# -- subscription records ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Subscription:
    key: str
    resource: str
    consumer: str
    subscriber: str
    expires: float


class Subscriptions:
    """Subscription records in a service's SQLite database, table ``table`` (created if missing) whose
    resource column is ``resource_column``."""

    def __init__(self, db: Database, table: str = "subscriptions", resource_column: str = "resource_key"):
        if not (table.isidentifier() and resource_column.isidentifier()):
            raise ValueError("table and column names are identifiers")
        self.db, self.table, self.col = db, table, resource_column
        with db.write("subscriptions-schema") as c:
            c.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, {resource_column} TEXT NOT NULL, "
                      f"consumer TEXT NOT NULL, subscriber TEXT NOT NULL, expires REAL NOT NULL)")
            c.execute(f"CREATE INDEX IF NOT EXISTS {table}_resource ON {table} ({resource_column})")

    def add(self, s: Subscription) -> None:
        with self.db.write("subscribe") as c:
            c.execute(f"INSERT INTO {self.table} (key, {self.col}, consumer, subscriber, expires) VALUES (?, ?, ?, ?, ?)",
                      (s.key, s.resource, s.consumer, s.subscriber, s.expires))

    def of(self, resource: str, now: float) -> list[Subscription]:
        """The subscriptions to ``resource`` that have not expired at ``now`` (0: all of them)."""
        rows = self.db.conn().execute(f"SELECT key, {self.col}, consumer, subscriber, expires FROM {self.table} "
                                      f"WHERE {self.col} = ? AND expires > ?", (resource, now))
        return [Subscription(*r) for r in rows]

    def drop(self, resource: str) -> None:
        with self.db.write("unsubscribe") as c:
            c.execute(f"DELETE FROM {self.table} WHERE {self.col} = ?", (resource,))


# -- Notify -----------------------------------------------------------------------------------------------
def notify_envelope(consumer: str, producer: EndpointReference, topic: str, message: etree._Element,
                    nsmap: dict[str, str]) -> etree._Element:
    """A wsnt:Notify envelope to ``consumer``: one NotificationMessage on ``topic`` (a Simple topic
    ``prefix:local`` whose prefix ``nsmap`` declares) from ``producer``, carrying ``message``; with the
    wsa:To and wsa:Action headers the consumer checks."""
    notify = etree.Element(f"{{{WSNT}}}Notify", nsmap={"wsnt": WSNT, "wsa": WSA, **nsmap})
    holder = etree.SubElement(notify, f"{{{WSNT}}}NotificationMessage")
    etree.SubElement(holder, f"{{{WSNT}}}Topic", Dialect=TOPIC_SIMPLE).text = topic
    producer.fill(etree.SubElement(holder, f"{{{WSNT}}}ProducerReference"))
    etree.SubElement(holder, f"{{{WSNT}}}Message").append(message)
    headers = []
    for name, value in (("To", consumer), ("Action", NOTIFY_ACTION)):
        h = etree.Element(f"{{{WSA}}}{name}", nsmap={"wsa": WSA})
        h.text = value
        headers.append(h)
    return envelope(notify, headers)


@dataclass
class DeliveryLimits:
    connect_timeout: float = 5.0   # seconds to connect to a consumer
    deadline: float = 10.0         # seconds for a whole delivery (connect, send, answer)
    max_queue: int = 10_000        # notifications waiting; beyond it the oldest are dropped (and counted)
    workers: int = 4               # deliveries at once


class Notifier:
    """Queues Notify envelopes and delivers them signed with the host credential, each within
    ``limits.deadline`` seconds, to consumers ``policy`` allows (checked again at delivery: a name may
    resolve elsewhere by then)."""

    def __init__(self, credential, trust, *, policy: ConsumerPolicy | None = None,
                 limits: DeliveryLimits | None = None, timeout: float | None = None):
        self.credential = credential
        self.trust = trust
        self.policy = policy or ConsumerPolicy()
        self.limits = limits or DeliveryLimits()
        if timeout is not None:
            self.limits.deadline = timeout
        self.queue: queue.Queue = queue.Queue(self.limits.max_queue)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._count = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"vmgrid-notifier-{n}", daemon=True)
                         for n in range(self.limits.workers)]
        for t in self._threads:
            t.start()

    def send(self, consumer: str, env: etree._Element) -> None:
        try:
            self.queue.put_nowait((consumer, env))
        except queue.Full:
            with self._count:
                self.dropped += 1
            log.warning("notification queue full: a notification to %s is dropped", consumer)

    def _run(self) -> None:
        https = grid_session(self.trust.cert_dir)
        plain = requests.Session()
        plain.trust_env = False
        try:
            while True:
                consumer, env = self.queue.get()
                if consumer is None:
                    return
                try:
                    self._deliver(https if consumer.startswith("https:") else plain, consumer, env)
                    with self._count:
                        self.sent += 1
                except Exception as exc:  # noqa: BLE001 - a consumer that is gone must not stop the others
                    with self._count:
                        self.failed += 1
                    log.warning("notification to %s failed: %s", consumer, exc)
        finally:
            https.close()
            plain.close()

    def _deliver(self, session: requests.Session, consumer: str, env: etree._Element) -> None:
        reason = self.policy.refusal(consumer)
        if reason:
            raise PermissionError(reason)
        started = time.monotonic()
        deadline = self.limits.deadline
        data = sign_envelope(env, self.credential)
        resp = session.post(consumer, data=data, stream=True, allow_redirects=False,
                            timeout=(self.limits.connect_timeout, deadline),
                            headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{NOTIFY_ACTION}"'})
        try:
            read = 0
            for chunk in resp.iter_content(8192):
                read += len(chunk)
                if time.monotonic() - started > deadline or read > 1 << 20:
                    raise TimeoutError(f"the consumer did not answer within {deadline:.0f} s")
            if resp.status_code >= 300:
                raise RuntimeError(f"HTTP {resp.status_code}")
        finally:
            resp.close()

    def close(self) -> None:
        for _ in self._threads:
            try:
                self.queue.put((None, None), timeout=1)
            except queue.Full:
                break
