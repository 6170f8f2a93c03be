"""WS-BaseNotification: a producer's side. Subscribe read and answered, subscription records in SQLite
(:class:`Subscriptions`), Notify messages (:func:`notify_envelope`), which consumer addresses a producer
may send to (:class:`ConsumerPolicy`), and :class:`Notifier`, which signs each Notify with the host
credential and delivers it from background threads within a deadline (a slow or dead consumer never
holds up a resource, nor the other consumers for longer than that deadline).
"""
from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import math
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from lxml import etree

from security.tls import client_ssl_context
from security.wssec import sign_envelope
from services.common.xsdtime import format_datetime, parse_datetime
from services.container.soap import envelope
from services.faults import InvalidArgument, LimitExceeded
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


class Refused(PermissionError):
    """An address a :class:`ConsumerPolicy` does not let this node call."""


class Unresolved(Refused):
    """A host name the resolver did not answer for within the deadline (a slow or dead name server): not called,
    and nothing said about the name itself (a later try may resolve it)."""


RESOLVE_TIMEOUT = 5.0       # seconds a lookup of a consumer's or a migration target's name may take
RESOLVERS = 8               # lookups under way at once in a process (a stalled name server holds at most these)
RESOLVERS_PER_CALLER = 2    # ... of them for one caller (a DN) while fewer than half of RESOLVERS are under way;
                            # beyond that one each, so a caller with none under way finds one free (Lookups.take)
STALLED_TTL = 10.0          # seconds a name whose lookup timed out is refused at once, for the caller who gave it
STALLED_PER_CALLER = 16     # such names remembered for one caller (its own oldest forgotten first)
STALLED_TOTAL = 1024        # ... for all callers (beyond, a new one is not remembered: nobody else's is forgotten)
WARN_EVERY = 60.0           # seconds between two warnings of refused or timed-out lookups (each with a count)


class _Throttled:
    """A warning any user can cause at will, logged at most once per ``every`` seconds with the count of such events
    since the last one logged (the GridFTP server's full data port range is warned of so: gridftp/server.py)."""

    def __init__(self, every: float = WARN_EVERY):
        self.every = every
        self._lock = threading.Lock()
        self._logged: float | None = None     # time.monotonic() of the last warning logged
        self._since = 0                       # events since then (the one logged included)

    def warn(self, msg: str, *args) -> bool:
        """Count one event; log ``msg % args`` with the count when the last warning is ``every`` seconds old."""
        now = time.monotonic()
        with self._lock:
            self._since += 1
            if self._logged is not None and now - self._logged < self.every:
                return False
            count, self._since, self._logged = self._since, 0, now
        log.warning(msg + " (%d such since the last warning of them; at most one a minute)", *args, count)
        return True


class Lookups:
    """A process's name lookups under way and the names that stalled lately (:func:`lookup` uses the process's
    one, ``_LOOKUPS``). ``slots`` lookups at once in all; a caller (a DN) may have ``per_caller`` of them under
    way while fewer than half of ``slots`` are, one beyond that: a caller with none under way finds a slot as long
    as fewer than ``slots`` callers stall, and the callers with stalled names keep about one slot each, not
    ``per_caller``. A name whose lookup for a caller timed out is refused at once for that caller during
    ``stalled_ttl`` seconds (remembered per caller, at most ``stalled_per_caller`` each, oldest forgotten first,
    and ``stalled_total`` in all, beyond which nothing new is remembered: no caller's names push out another's)."""

    def __init__(self, slots: int = RESOLVERS, per_caller: int = RESOLVERS_PER_CALLER,
                 stalled_ttl: float = STALLED_TTL, stalled_per_caller: int = STALLED_PER_CALLER,
                 stalled_total: int = STALLED_TOTAL, warn_every: float = WARN_EVERY):
        self.slots, self.per_caller = slots, per_caller
        self.stalled_ttl, self.stalled_per_caller, self.stalled_total = stalled_ttl, stalled_per_caller, stalled_total
        self._lock = threading.Lock()
        self.held = 0                                            # lookups under way (threads not yet answered)
        self.callers: dict[str | None, int] = {}                 # caller -> its lookups under way
        self.stalled: dict[str | None, OrderedDict[str, tuple[float, float]]] = {}  # caller -> name -> (until, timeout)
        self._remembered = 0                                     # entries in ``stalled``
        self.refusals = _Throttled(warn_every)
        self.timeouts = _Throttled(warn_every)

    # -- slots ------------------------------------------------------------------------------------------------
    def take(self, caller: str | None) -> str | None:
        """One more lookup under way for ``caller`` (None: the process's own, bounded by the total only); else why
        not, the end of a sentence "the name server has not answered ..."."""
        with self._lock:
            if self.held >= self.slots:
                return f"{self.slots} lookups of this node yet"
            mine = self.callers.get(caller, 0)
            if caller is not None and mine:
                share = self.per_caller if self.held < self.slots // 2 else 1
                if mine >= share:
                    why = f"{mine} lookup{'s' if mine != 1 else ''} of names you gave this node yet"
                    if share < self.per_caller:
                        why += (f" (with half of the node's {self.slots} lookups under way, each user has "
                                f"{share} at a time)")
                    return why
            self.held += 1
            self.callers[caller] = mine + 1
            return None

    def give(self, caller: str | None) -> None:
        with self._lock:
            self.held -= 1
            mine = self.callers.pop(caller, 1) - 1
            if mine > 0:
                self.callers[caller] = mine

    # -- names that stalled -------------------------------------------------------------------------------------
    def remembered(self, caller: str | None, host: str, now: float) -> tuple[float, float] | None:
        """(seconds left, the lookup's timeout) when ``host``'s lookup for ``caller`` timed out within ``stalled_ttl``."""
        with self._lock:
            names = self.stalled.get(caller)
            entry = names.get(host.lower()) if names else None
            if entry is None:
                return None
            if entry[0] <= now:
                del names[host.lower()]
                self._remembered -= 1
                self._forget_empty(caller)
                return None
            return entry[0] - now, entry[1]

    def remember(self, caller: str | None, host: str, timeout: float, now: float) -> None:
        """``host``'s lookup for ``caller`` timed out (``timeout`` seconds): refuse it at once for ``stalled_ttl``."""
        if self.stalled_ttl <= 0:
            return
        with self._lock:
            names = self.stalled.get(caller)
            if names is None or host.lower() not in names:
                if self._remembered >= self.stalled_total:
                    self._expire(now)
                if self._remembered >= self.stalled_total and not (names and len(names) >= self.stalled_per_caller):
                    return          # full: the name is looked up again next time (still bounded by the slots)
            names = self.stalled.setdefault(caller, OrderedDict())
            if names.pop(host.lower(), None) is None:
                self._remembered += 1
            names[host.lower()] = (now + self.stalled_ttl, timeout)
            while len(names) > self.stalled_per_caller:         # the caller's own oldest
                names.popitem(last=False)
                self._remembered -= 1

    def _expire(self, now: float) -> None:
        """(under the lock) Forget every entry past its time."""
        for caller in list(self.stalled):
            names = self.stalled[caller]
            for host in [h for h, (until, _) in names.items() if until <= now]:
                del names[host]
                self._remembered -= 1
            self._forget_empty(caller)

    def _forget_empty(self, caller: str | None) -> None:
        if caller in self.stalled and not self.stalled[caller]:
            del self.stalled[caller]

    # -- a lookup -----------------------------------------------------------------------------------------------
    def lookup(self, host: str, port: int | None, timeout: float = RESOLVE_TIMEOUT, what: str = "host",
               caller: str | None = None) -> list[tuple]:
        """See :func:`lookup`."""
        if _is_address(host):           # an IP address: getaddrinfo only parses it, no name server is asked
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        stalled = self.remembered(caller, host, time.monotonic())
        if stalled is not None:
            left, waited = stalled
            self.refusals.warn("lookup of %s %r for %s refused: it did not resolve within %g s a moment ago", what,
                               host, caller, waited)
            raise Unresolved(f"the {what} {host!r} did not resolve within {waited:g} s a moment ago (the name server "
                             f"did not answer); it is not looked up again for {math.ceil(left)} s: try again later")
        why = self.take(caller)
        if why is not None:
            self.refusals.warn("lookup of %s %r for %s refused: the name server has not answered %s", what, host,
                               caller, why)
            raise Unresolved(f"the {what} {host!r} cannot be looked up now: the name server has not answered {why}")
        done = threading.Event()
        result: list = []

        def run() -> None:
            try:
                result.append(("ok", socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result.append(("error", exc))
            finally:
                self.give(caller)
                done.set()
        try:
            threading.Thread(target=run, name="vmgrid-resolve", daemon=True).start()
        except BaseException:
            self.give(caller)
            raise
        if not done.wait(timeout):
            self.remember(caller, host, timeout, time.monotonic())
            self.timeouts.warn("lookup of %s %r: no answer from the name server within %g s (for %s)", what, host,
                               timeout, caller)
            raise Unresolved(f"the {what} {host!r} did not resolve within {timeout:g} s (the name server did not "
                             f"answer); try again later")
        kind, value = result[0]
        if kind == "error":
            raise value
        return value


def _is_address(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address as written in a URL's host (``127.0.0.1``, ``::1``, ``fe80::1%eth0``)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_LOOKUPS = Lookups()


def lookup(host: str, port: int | None, timeout: float = RESOLVE_TIMEOUT, what: str = "host",
           caller: str | None = None) -> list[tuple]:
    """``socket.getaddrinfo(host, port, type=SOCK_STREAM)`` within ``timeout`` seconds: the lookup runs in a thread
    of its own (getaddrinfo cannot be interrupted) and the caller waits for it at most that long, then gets
    :class:`Unresolved` (the thread ends when the resolver answers). An IP address is no lookup: it is parsed at once,
    whatever is under way. Bounded by the process's :class:`Lookups`: at most :data:`RESOLVERS` such threads at once,
    at most :data:`RESOLVERS_PER_CALLER` of them for one ``caller`` (whom the lookup is for: a DN, the user whose
    request or subscription names the host; None: the process's own, bounded by the total only) and one each while
    half of them are under way; beyond, a lookup is :class:`Unresolved` at once, so one user's names that stall the
    name server hold a few of the process's lookups, never all of them: another user's lookups still run. A name
    whose lookup for ``caller`` timed out is :class:`Unresolved` at once for :data:`STALLED_TTL` seconds. Refusals
    and timeouts are logged at most once a minute, with their count. Errors of the lookup itself (an unknown name)
    as getaddrinfo raises them."""
    return _LOOKUPS.lookup(host, port, timeout, what, caller)


@dataclass(frozen=True)
class Destination:
    """An http(s) URL resolved once: the host name (the Host header, TLS SNI and the certificate's name) and
    the socket addresses that were checked (the only ones connected to)."""
    scheme: str
    host: str
    port: int
    netloc: str                        # host[:port] as the URL gives it: the Host header
    path: str                          # path and query
    addresses: tuple[tuple[int, tuple], ...]   # (family, sockaddr) as getaddrinfo gave them
    url: str = ""                      # the URL as it was given


@dataclass(frozen=True)
class ConsumerPolicy:
    """Which consumer addresses a Subscribe may name (issue 9.8: a subscriber must not make a node send
    signed requests anywhere it likes). An http(s) URL whose host resolves only to addresses outside the
    refused ranges is allowed; by default the refused ranges are loopback, link-local, unspecified and
    multicast addresses (the node's own). ``allow`` lists networks (CIDR) allowed even so, e.g.
    ``127.0.0.0/8`` for a grid whose clients run on the nodes' machine (the local grid, tests)."""

    allow: tuple[str, ...] = ()
    resolve_timeout: float = RESOLVE_TIMEOUT     # seconds the name's lookup may take (Unresolved beyond)

    def _allowed_networks(self):
        return [ipaddress.ip_network(a, strict=False) for a in self.allow]

    def resolve(self, url: str, what: str = "consumer", caller: str | None = None) -> "Destination":
        """``url`` resolved once, with the addresses this policy allows (every address the name has must be
        allowed): a connection goes to one of these, never to what the name resolves to later (DNS rebinding).
        :class:`Refused` saying why when ``url`` may not be called (:class:`Unresolved` when the name server did
        not answer within ``resolve_timeout``, or when ``caller``'s lookups, :func:`lookup`, are all waiting)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused(f"the {what} reference needs an http(s) address")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            infos = lookup(parts.hostname, port, self.resolve_timeout, what=f"{what} host", caller=caller)
        except Refused:
            raise
        except (OSError, ValueError, UnicodeError) as exc:
            raise Refused(f"the {what} host {parts.hostname!r} does not resolve: {exc}") from None
        allowed = self._allowed_networks()
        addresses = []
        for family, _, _, _, sockaddr in infos:
            addr = reached(ipaddress.ip_address(sockaddr[0].split("%")[0]))
            if not any(addr in net for net in allowed) and (addr.is_loopback or addr.is_link_local or
                                                            addr.is_unspecified or addr.is_multicast):
                raise Refused(f"{what} address {addr} is this node's own (loopback or link-local); the site allows "
                              f"such {what}s only when they are listed in its configuration")
            if (family, sockaddr) not in addresses:
                addresses.append((family, sockaddr))
        if not addresses:
            raise Refused(f"the {what} host {parts.hostname!r} does not resolve")
        netloc = parts.netloc.rpartition("@")[2]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Destination(parts.scheme, parts.hostname, port, netloc, path, tuple(addresses), url)

    def refusal(self, url: str, caller: str | None = None) -> str | None:
        """Why ``url`` may not be a consumer, or None when it may (``caller``: whom it is looked up for)."""
        try:
            self.resolve(url, caller=caller)
        except Refused as exc:
            return str(exc)
        return None

    def check(self, url: str, caller: str | None = None) -> None:
        """InvalidArgument (argument ConsumerReference) when ``url`` may not be a consumer, or when its name did
        not resolve within ``resolve_timeout`` (the description says so: a later Subscribe may succeed; every
        Subscribe declares InvalidArgumentFault). ``caller``: the subscriber's DN (its own bound on lookups)."""
        reason = self.refusal(url, caller)
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
MAX_PER_RESOURCE = 16       # live subscriptions to one resource (an instance, a job)
MAX_PER_SUBSCRIBER = 256    # live subscriptions of one subscriber (DN) on one service


def check_subscription_caps(on_resource: int, of_subscriber: int) -> None:
    """LimitExceeded when one more subscription would pass a cap, given the live ones counted now: to the
    resource, and of the subscriber on this service (each one makes a delivery for every state change)."""
    if on_resource >= MAX_PER_RESOURCE:
        raise LimitExceeded(f"the resource has {on_resource} subscriptions; the limit is {MAX_PER_RESOURCE}",
                            limit="subscriptions-per-resource", allowed=str(MAX_PER_RESOURCE),
                            requested=str(on_resource + 1))
    if of_subscriber >= MAX_PER_SUBSCRIBER:
        raise LimitExceeded(f"you have {of_subscriber} subscriptions on this service; the limit is "
                            f"{MAX_PER_SUBSCRIBER}", limit="subscriptions-per-subscriber",
                            allowed=str(MAX_PER_SUBSCRIBER), requested=str(of_subscriber + 1))


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

    def _check_caps(self, c, resource: str, subscriber: str, now: float) -> None:
        check_subscription_caps(
            c.execute(f"SELECT COUNT(*) FROM {self.table} WHERE {self.col} = ? AND expires > ?",
                      (resource, now)).fetchone()[0],
            c.execute(f"SELECT COUNT(*) FROM {self.table} WHERE subscriber = ? AND expires > ?",
                      (subscriber, now)).fetchone()[0])

    def check_caps(self, resource: str, subscriber: str, now: float | None = None) -> None:
        """LimitExceeded when one more subscription of ``subscriber`` to ``resource`` would pass a cap now: a
        Subscribe asks before it looks the consumer's name up (:meth:`add` counts again with its insert)."""
        self._check_caps(self.db.conn(), resource, subscriber, time.time() if now is None else now)

    def add(self, s: Subscription, now: float | None = None) -> None:
        """Record ``s``; LimitExceeded beyond the caps (:func:`check_subscription_caps`), counted with the insert."""
        now = time.time() if now is None else now
        with self.db.write("subscribe") as c:
            self._check_caps(c, s.resource, s.subscriber, now)
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
    deadline: float = 10.0         # seconds for a whole delivery (connect, TLS, send, status line, headers, body)
    max_queue: int = 10_000        # notifications waiting; beyond it a new one is dropped (and counted)
    workers: int = 4               # deliveries at once
    per_owner: int = 1             # deliveries at once for one owner (the subscriber): the others' go first
    owner_queue: int = 1_000       # notifications waiting for one owner; beyond it the owner's new ones are dropped
    max_answer: int = 1 << 20      # bytes of a consumer's answer read at most


class _Deadline:
    """A connected socket whose every send and receive waits at most until ``deadline`` (time.monotonic())
    in all: http.client reads the status line, the headers and the body through it, so a consumer that
    trickles any of them a byte at a time is cut off at the deadline, not per read."""

    def __init__(self, sock: socket.socket, deadline: float, what: str):
        self.sock, self.deadline, self.what = sock, deadline, what

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(self.what)
        self.sock.settimeout(left)
        return left

    def sendall(self, data) -> None:
        view = memoryview(data)
        while view:
            self._left()
            try:
                sent = self.sock.send(view[:65536])
            except socket.timeout:
                raise TimeoutError(self.what) from None
            view = view[sent:]

    def recv_into(self, buffer) -> int:
        self._left()
        try:
            return self.sock.recv_into(buffer)
        except socket.timeout:
            raise TimeoutError(self.what) from None

    def makefile(self, mode: str = "rb", *args, **kwargs):
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        """Nothing: http.client closes its connection when the answer says ``Connection: close``, before the body is
        read; the delivery closes the socket when it is done with it."""


class _DeadlineReader(io.RawIOBase):
    def __init__(self, conn: _Deadline):
        self.conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.conn.recv_into(buffer)


class _Connection(http.client.HTTPConnection):
    """An HTTP connection over a socket already connected (and checked): http.client writes the request and
    reads the answer, nothing of it opens another connection."""

    def __init__(self, sock: _Deadline, host: str, port: int):
        super().__init__(host, port)
        self.sock = sock

    def connect(self) -> None:          # never: the socket is given
        raise ConnectionError("the connection to the consumer is closed")


class Notifier:
    """Queues Notify envelopes and delivers them signed with the host credential, each within
    ``limits.deadline`` seconds in all, to consumers ``policy`` allows. The consumer's name is resolved and
    checked at each delivery and the connection goes to the address checked (a name that resolves elsewhere
    later is never followed); TLS checks the consumer's certificate for that name. Notifications wait in one
    queue per owner (the subscriber) and an owner has at most ``limits.per_owner`` deliveries under way: one
    user's slow or dead consumers delay only their own notifications."""

    def __init__(self, credential, trust, *, policy: ConsumerPolicy | None = None,
                 limits: DeliveryLimits | None = None, timeout: float | None = None):
        self.credential = credential
        self.trust = trust
        self.policy = policy or ConsumerPolicy()
        self.limits = limits or DeliveryLimits()
        if timeout is not None:
            self.limits.deadline = timeout
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._tls: ssl.SSLContext | None = None
        self._cond = threading.Condition()
        self._waiting: dict[str, deque] = {}      # owner -> its notifications not yet under way
        self._busy: dict[str, int] = {}           # owner -> its deliveries under way
        self._ready: deque[str] = deque()         # owners with a notification that may start now, in turn
        self._queued = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"vmgrid-notifier-{n}", daemon=True)
                         for n in range(self.limits.workers)]
        for t in self._threads:
            t.start()

    def send(self, consumer: str, env: etree._Element, owner: str | None = None) -> None:
        """Queue ``env`` for ``consumer`` on behalf of ``owner`` (the subscriber's DN; by default the consumer's
        host): dropped, counted and logged when the queue or the owner's share of it is full."""
        owner = owner or (urlsplit(consumer).hostname or "")
        with self._cond:
            waiting = self._waiting.setdefault(owner, deque())
            if self._closed or self._queued >= self.limits.max_queue or len(waiting) >= self.limits.owner_queue:
                if not waiting and not self._busy.get(owner):
                    del self._waiting[owner]
                self.dropped += 1
                log.warning("notification queue %s: a notification to %s is dropped",
                            "closed" if self._closed else "full", consumer)
                return
            waiting.append((consumer, env))
            self._queued += 1
            self._schedule(owner)

    def _schedule(self, owner: str) -> None:
        """(under the lock) Put ``owner`` in turn when it has work and a delivery to spare."""
        if self._waiting.get(owner) and self._busy.get(owner, 0) < self.limits.per_owner and owner not in self._ready:
            self._ready.append(owner)
            self._cond.notify()

    def _next(self) -> tuple[str, str, etree._Element] | None:
        with self._cond:
            while not self._ready:
                if self._closed:
                    return None
                self._cond.wait()
            owner = self._ready.popleft()
            consumer, env = self._waiting[owner].popleft()
            self._queued -= 1
            self._busy[owner] = self._busy.get(owner, 0) + 1
            self._schedule(owner)                 # another of its deliveries may start, after the others' turn
            return owner, consumer, env

    def _done(self, owner: str) -> None:
        with self._cond:
            self._busy[owner] -= 1
            if not self._busy[owner]:
                del self._busy[owner]
            if self._waiting.get(owner):
                self._schedule(owner)
            elif owner in self._waiting and owner not in self._busy:
                del self._waiting[owner]

    @property
    def pending(self) -> int:
        """Notifications waiting (not yet under way)."""
        with self._cond:
            return self._queued

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            owner, consumer, env = item
            try:
                self._deliver(consumer, env, owner)
                with self._cond:
                    self.sent += 1
            except Exception as exc:  # noqa: BLE001 - a consumer that is gone must not stop the others
                with self._cond:
                    self.failed += 1
                log.warning("notification to %s failed: %s", consumer, exc)
            finally:
                self._done(owner)

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = client_ssl_context(self.trust.cert_dir)
        return self._tls

    def _deliver(self, consumer: str, env: etree._Element, owner: str | None = None) -> None:
        dest = self.policy.resolve(consumer, caller=owner)
        deadline = time.monotonic() + self.limits.deadline
        late = f"the consumer did not answer within {self.limits.deadline:.0f} s"
        data = sign_envelope(env, self.credential)
        sock = self._connect(dest, deadline, late)
        try:
            if dest.scheme == "https":
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                try:        # SNI and the certificate's check for the name; the handshake as a whole within the time
                    sock = self._context().wrap_socket(sock, server_hostname=dest.host)
                except socket.timeout:
                    raise TimeoutError(late) from None
            conn = _Connection(_Deadline(sock, deadline, late), dest.host, dest.port)
            conn.request("POST", dest.path, body=data,
                         headers={"Host": dest.netloc, "Content-Type": "text/xml; charset=utf-8",
                                  "SOAPAction": f'"{NOTIFY_ACTION}"', "Connection": "close"})
            resp = conn.getresponse()
            resp.read(self.limits.max_answer)
            if resp.status >= 300:
                raise RuntimeError(f"HTTP {resp.status}")
        finally:
            sock.close()

    def _connect(self, dest: Destination, deadline: float, late: str) -> socket.socket:
        """A TCP connection to one of the addresses ``dest`` was checked with, in their order."""
        error: Exception = TimeoutError(late)
        for family, sockaddr in dest.addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(late)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(min(self.limits.connect_timeout, left))
            try:
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error

    def close(self) -> None:
        """Take no more notifications; the workers deliver the waiting ones (each within the deadline), then end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
