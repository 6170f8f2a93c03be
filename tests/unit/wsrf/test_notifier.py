"""The Notifier against real consumers on loopback: the address it connects to is the one its policy checked
(attack12 G9), a delivery ends at its deadline whatever part of the answer a consumer trickles, one owner's slow
consumers do not hold up another's notifications, and the subscription caps (attack12 G11)."""
from __future__ import annotations

import select
import socket
import ssl
import threading
import time

import pytest
from lxml import etree

from services.faults import LimitExceeded
from services.sqlite import Database
from services.wsrf import notification
from services.wsrf.epr import EndpointReference
from services.wsrf.notification import (ConsumerPolicy, DeliveryLimits, Notifier, Subscription, Subscriptions,
                                        notify_envelope)
from tests.fixtures.resolver import counting, rebinding

pytestmark = pytest.mark.timeout(120)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
# as cheroot answers: the head, then the body in a write of its own
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n")
# what a trickling consumer sends at once, then the rest a byte at a time (each stage: where it starts to trickle)
STAGES = {"status": (b"", b"HTTP/1.1 200 OK\r\nX-slow: " + b"a" * 100_000),
          "headers": (b"HTTP/1.1 200 OK\r\n", b"X-slow: " + b"a" * 100_000),
          "body": (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"a" * 100_000)}


class Consumer:
    """A real TCP listener on ``host``:``port`` (0: any). It reads each request and answers 200 at once, or, with
    ``stage``, sends STAGES[stage]: the first part at once, then one byte every ``step`` seconds until the client
    closes the connection (counted in ``cut``). ``tls``: an ssl server context to wrap connections in."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, stage: str | None = None, step: float = 0.2,
                 tls: ssl.SSLContext | None = None, answer: bytes | tuple[bytes, ...] = OK):
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.stage, self.step, self.tls, self.answer = stage, step, tls, answer
        self.requests: list[bytes] = []        # each request's head
        self.bodies: list[bytes] = []
        self.accepted = 0
        self.open = 0                          # connections not yet closed
        self.cut = 0                           # trickles the client ended by closing
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, body = head.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
            with self.lock:
                self.requests.append(head)
                self.bodies.append(body)
            if self.stage is None:
                for n, part in enumerate((self.answer,) if isinstance(self.answer, bytes) else self.answer):
                    if n:
                        time.sleep(0.2)         # the parts in reads of their own
                    conn.sendall(part)
                return
            first, rest = STAGES[self.stage]
            conn.sendall(first)
            for i in range(len(rest)):
                readable, _, _ = select.select([conn], [], [], self.step)
                if readable and not conn.recv(1):           # the client closed the connection
                    with self.lock:
                        self.cut += 1
                    return
                conn.sendall(rest[i:i + 1])
        except (OSError, ssl.SSLError):
            with self.lock:
                self.cut += 1 if self.stage else 0
        finally:
            conn.close()
            with self.lock:
                self.open -= 1

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def until(check, timeout: float = 60.0, what: str = "") -> None:
    """Wait for ``check()`` (not a timing assertion: the bound only keeps a failing test from hanging)."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


def message(consumer: str) -> etree._Element:
    body = etree.Element("{urn:test}Changed")
    body.text = "x"
    return notify_envelope(consumer, EndpointReference("https://node.example.org/x"), "t:Changed", body,
                           {"t": "urn:test"})


LOOPBACK = ConsumerPolicy(allow=("127.0.0.0/8",))      # a test grid's policy: consumers on this machine


# -- G9: the connection goes to the address that was checked (tests/fixtures/resolver.py: a rebinding DNS) --------
def test_a_name_that_resolves_elsewhere_after_the_check_is_not_followed(grid_pki, monkeypatch):
    """The policy allows 127.0.0.2 only; the consumer's name answers 127.0.0.2 at the check and 127.0.0.1 (the
    node's own loopback) afterwards. The Notify goes to 127.0.0.2 (with the name as its Host); the listener on
    127.0.0.1 sees nothing. Before: the check resolved the name and requests resolved it again, to 127.0.0.1."""
    honest = Consumer("127.0.0.2")
    forbidden = Consumer("127.0.0.1", honest.port)
    answers = rebinding(monkeypatch, "rebind.test", "127.0.0.2", "127.0.0.1")
    notifier = Notifier(grid_pki.host, grid_pki.trust(), policy=ConsumerPolicy(allow=("127.0.0.2/32",)),
                        limits=DeliveryLimits(workers=1))
    try:
        url = f"http://rebind.test:{honest.port}/notify"
        notifier.send(url, message(url))
        until(lambda: notifier.sent + notifier.failed == 1, what="the delivery")
        assert answers[0] == "127.0.0.2"
        assert (notifier.sent, notifier.failed) == (1, 0)
        assert len(honest.requests) == 1 and f"Host: rebind.test:{honest.port}".encode() in honest.requests[0]
        assert b"Notify" in honest.bodies[0] and b"SignatureValue" in honest.bodies[0]   # the signed Notify
        assert forbidden.accepted == 0
        # a later delivery resolves again, and refuses: the name now answers the node's own loopback
        notifier.send(url, message(url))
        until(lambda: notifier.sent + notifier.failed == 2, what="the second delivery")
        assert (notifier.sent, notifier.failed) == (1, 1) and forbidden.accepted == 0
    finally:
        notifier.close()
        honest.close()
        forbidden.close()


def test_tls_to_the_checked_address_checks_the_certificate_for_the_name(grid_pki, monkeypatch):
    """HTTPS consumers: the connection goes to the checked address, SNI and the certificate check use the
    consumer's name: a server with a certificate for that name is delivered to, one with another name's is not."""
    named = grid_pki.issue_host("consumer.test")
    right = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    right.load_cert_chain(named.cert_path, named.key_path)
    wrong = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    wrong.load_cert_chain(grid_pki.host_cert_path, grid_pki.host_key_path)      # localhost's
    good, bad = Consumer("127.0.0.2", tls=right), Consumer("127.0.0.3", tls=wrong)
    names = {"consumer.test": "127.0.0.2", "other.test": "127.0.0.3"}     # a monkeypatched resolver
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: real(names.get(host, host), port, *a, **k))
    notifier = Notifier(grid_pki.host, grid_pki.trust(), policy=LOOPBACK, limits=DeliveryLimits(workers=1))
    try:
        for url in (f"https://consumer.test:{good.port}/notify", f"https://other.test:{bad.port}/notify"):
            notifier.send(url, message(url))
        until(lambda: notifier.sent + notifier.failed == 2, what="both deliveries")
        assert (notifier.sent, notifier.failed) == (1, 1)
        assert len(good.requests) == 1 and not bad.requests
    finally:
        notifier.close()
        good.close()
        bad.close()


def test_an_answer_with_a_body_and_connection_close_is_a_delivery(grid_pki):
    """A consumer (cheroot, as client.notifications') answering 200 with a chunked body and ``Connection: close``:
    the delivery reads the body and counts as sent (http.client lets go of the connection before the body)."""
    consumer = Consumer(answer=CHUNKED)
    notifier = Notifier(grid_pki.host, grid_pki.trust(), policy=LOOPBACK, limits=DeliveryLimits(workers=1))
    try:
        url = f"http://127.0.0.1:{consumer.port}/notify"
        notifier.send(url, message(url))
        until(lambda: notifier.sent + notifier.failed == 1, what="the delivery")
        assert (notifier.sent, notifier.failed) == (1, 0) and len(consumer.requests) == 1
    finally:
        notifier.close()
        consumer.close()


# -- G11: a deadline for the whole delivery; one owner's slow consumers delay only that owner -----------------
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_consumer_that_trickles_its_answer_is_cut_off_at_the_deadline(grid_pki, stage):
    """A consumer sends its status line, its headers or its body a byte every 0.2 s (each read well within any
    per-read timeout). The delivery fails and the notifier closes the connection at its 1 s deadline; the trickle
    would last hours. Before: the deadline was checked only while reading the body, and a read timeout was per
    read, so the status line and headers held the worker for as long as the consumer liked."""
    tarpit = Consumer(stage=stage)
    notifier = Notifier(grid_pki.host, grid_pki.trust(), policy=LOOPBACK,
                        limits=DeliveryLimits(deadline=1.0, workers=1))
    try:
        url = f"http://127.0.0.1:{tarpit.port}/notify"
        notifier.send(url, message(url))
        until(lambda: notifier.failed == 1, what="the trickled delivery to fail")
        until(lambda: tarpit.cut == 1, what="the tarpit's connection to be closed")
        assert notifier.sent == 0 and len(tarpit.requests) == 1
    finally:
        notifier.close()
        tarpit.close()


def test_one_owners_trickling_consumers_do_not_hold_up_anothers_notification(grid_pki):
    """alice's four consumers trickle their status lines (as many as the notifier has workers); bob's honest
    consumer gets his notification while hers are still held (the deadline is long here: what lets bob through is
    that an owner has one delivery under way at a time, not the deadline). Before: alice's four held all four
    workers and bob's notification waited until they let go."""
    tarpits = [Consumer(stage="status", step=0.5) for _ in range(4)]
    honest = Consumer()
    notifier = Notifier(grid_pki.host, grid_pki.trust(), policy=LOOPBACK,
                        limits=DeliveryLimits(deadline=300.0, workers=4))
    try:
        for t in tarpits:
            url = f"http://127.0.0.1:{t.port}/notify"
            notifier.send(url, message(url), owner="/O=Grid/OU=mysite/CN=alice")
        until(lambda: sum(t.accepted for t in tarpits) >= 1, what="alice's first delivery to start")
        url = f"http://127.0.0.1:{honest.port}/notify"
        notifier.send(url, message(url), owner="/O=Grid/OU=mysite/CN=bob")
        until(lambda: notifier.sent == 1, what="bob's notification")
        assert len(honest.requests) == 1
        # alice's are still held: none of them ended, one under way, the others wait their turn
        assert notifier.failed == 0 and sum(t.open for t in tarpits) == 1
        assert sum(t.accepted for t in tarpits) == 1 and notifier.pending == 3
    finally:
        notifier.close()
        for t in tarpits + [honest]:
            t.close()


def test_a_full_owner_queue_drops_only_that_owners_notifications(grid_pki):
    """An owner may have ``owner_queue`` notifications waiting; beyond them that owner's are dropped (counted),
    another owner's are still taken."""
    tarpit = Consumer(stage="status", step=0.5)
    honest = Consumer()
    notifier = Notifier(grid_pki.host, grid_pki.trust(), policy=LOOPBACK,
                        limits=DeliveryLimits(deadline=300.0, workers=2, owner_queue=3))
    try:
        url = f"http://127.0.0.1:{tarpit.port}/notify"
        for _ in range(6):
            notifier.send(url, message(url), owner="alice")
        until(lambda: tarpit.accepted == 1, what="alice's first delivery to start")
        assert notifier.dropped >= 2
        dropped = notifier.dropped
        good = f"http://127.0.0.1:{honest.port}/notify"
        notifier.send(good, message(good), owner="bob")
        until(lambda: notifier.sent == 1, what="bob's notification")
        assert notifier.dropped == dropped
    finally:
        notifier.close()
        tarpit.close()
        honest.close()


def test_subscriptions_are_capped_per_resource_and_per_subscriber(tmp_path, monkeypatch):
    """The job service's subscription records (the same class): a resource takes MAX_PER_RESOURCE live
    subscriptions and a subscriber holds MAX_PER_SUBSCRIBER on the service; one more is LimitExceeded and recorded
    nowhere. Expired ones do not count."""
    monkeypatch.setattr(notification, "MAX_PER_RESOURCE", 3)
    monkeypatch.setattr(notification, "MAX_PER_SUBSCRIBER", 5)
    subs = Subscriptions(Database(tmp_path / "s.sqlite"), "subscriptions", "job")
    now = time.time()
    subs.add(Subscription("sub-old", "job-1", "http://c/1", "alice", now - 10), now=now)     # expired
    for n in range(3):
        subs.add(Subscription(f"sub-a{n}", "job-1", "http://c/1", "alice", now + 60), now=now)
    with pytest.raises(LimitExceeded) as exc:
        subs.add(Subscription("sub-a3", "job-1", "http://c/1", "bob", now + 60), now=now)
    assert exc.value.limit == "subscriptions-per-resource" and exc.value.allowed == "3"
    subs.add(Subscription("sub-b0", "job-2", "http://c/1", "alice", now + 60), now=now)
    subs.add(Subscription("sub-b1", "job-3", "http://c/1", "alice", now + 60), now=now)
    with pytest.raises(LimitExceeded) as exc:
        subs.add(Subscription("sub-b2", "job-4", "http://c/1", "alice", now + 60), now=now)
    assert exc.value.limit == "subscriptions-per-subscriber"
    subs.add(Subscription("sub-c0", "job-4", "http://c/1", "bob", now + 60), now=now)          # another subscriber
    assert [s.key for s in subs.of("job-4", now)] == ["sub-c0"]
    assert len(subs.of("job-1", now)) == 3


# -- lookups: bounded per caller as well as in all (a stalled name server; tests/fixtures/resolver.py) --------------
@pytest.fixture
def lookups(monkeypatch):
    """The process's lookups afresh for one test (what others left under way, remembered or warned of is not its)."""
    fresh = notification.Lookups()
    monkeypatch.setattr(notification, "_LOOKUPS", fresh)
    return fresh


def settled(lookups: notification.Lookups) -> None:
    """Wait until every lookup thread answered (not a timing assertion: the bound keeps a failure from hanging)."""
    until(lambda: lookups.held == 0 and not lookups.callers, timeout=30, what="the lookup threads to answer")


def test_a_callers_stalled_lookups_hold_only_its_own_share_of_the_processs_lookups(monkeypatch, lookups):
    """bob's names stall the name server: two of his lookups wait out their deadline, his third is refused at once
    (RESOLVERS_PER_CALLER), and alice's lookup of a name that answers runs meanwhile; the node's own (no caller)
    too. Other callers' stalled lookups then take one slot each (half the slots are under way: a second is refused
    naming the share), and once RESOLVERS are under way a fresh caller is refused naming the node's bound. Each
    thread answered, every slot is back. Before: the RESOLVERS lookups were shared, bob alone held them all, and
    alice's was refused while his stalled."""
    from services.wsrf.notification import Unresolved, lookup
    from tests.fixtures.resolver import stalling

    per, total = notification.RESOLVERS_PER_CALLER, notification.RESOLVERS
    names = [f"stalled-{n}.test" for n in range(total + 1)]
    release = stalling(monkeypatch, *names)
    try:
        said = []
        for name in names[:total]:              # bob: as many stalling names as the process has lookups
            with pytest.raises(Unresolved) as exc:
                lookup(name, 80, 0.05, caller="/O=Grid/CN=bob")
            said.append(str(exc.value))
        assert {info[4][0] for info in lookup("localhost", 80, 5, caller="/O=Grid/CN=alice")} & {"127.0.0.1", "::1"}
        assert lookup("localhost", 80, 5)
        assert all("did not resolve within" in m for m in said[:per]), said
        assert all(f"has not answered {per} lookups of names you gave this node" in m for m in said[per:]), said
        for n in range(total - per):            # others' stalled lookups fill the total with bob's: one each
            with pytest.raises(Unresolved, match="did not resolve within"):
                lookup(names[0], 80, 0.05, caller=f"/O=Grid/CN=user{n}")
            if total // 2 <= lookups.held < total:
                with pytest.raises(Unresolved, match="has not answered 1 lookup of names you gave this node yet "
                                                     r"\(with half of the node's 8 lookups under way"):
                    lookup(names[1], 80, 0.05, caller=f"/O=Grid/CN=user{n}")
        assert lookups.held == total
        with pytest.raises(Unresolved, match=f"has not answered {total} lookups of this node"):
            lookup("localhost", 80, 5, caller="/O=Grid/CN=alice")
    finally:
        release.set()
    settled(lookups)
    assert lookups.callers == {} and lookups.held == 0


def test_four_users_stalling_at_once_leave_lookups_for_a_fifth(monkeypatch, lookups):
    """Four users each send two names that stall the name server, one after the other: while fewer than half of the
    process's lookups are under way a user's second runs, past half it is refused (each keeps one), so the four hold
    RESOLVERS // 2 + 2 at most and alice's lookup of a name that answers runs. Before: a fixed share of
    RESOLVERS_PER_CALLER each, the four held all RESOLVERS and alice's was refused "not answered 8 lookups"."""
    from services.wsrf.notification import Unresolved, lookup
    from tests.fixtures.resolver import stalling

    release = stalling(monkeypatch, "stalled-a.test", "stalled-b.test")
    try:
        for n in range(4):
            for name in ("stalled-a.test", "stalled-b.test"):
                with pytest.raises(Unresolved):
                    lookup(name, 80, 0.05, caller=f"/O=Grid/CN=staller{n}")
        assert lookups.held == notification.RESOLVERS // 2 + 2 < notification.RESOLVERS
        assert lookup("localhost", 80, 5, caller="/O=Grid/CN=alice")
        with pytest.raises(Unresolved, match="did not resolve within"):    # a fifth staller still gets one
            lookup("stalled-a.test", 80, 0.05, caller="/O=Grid/CN=staller4")
    finally:
        release.set()
    settled(lookups)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_an_ip_address_is_no_lookup_and_takes_no_slot(monkeypatch, lookups, address):
    """Every slot of the process held by stalled names (eight callers): a lookup of an IP address answers at once,
    for a caller with none under way and for one at its share, and the slots stay as they were; getaddrinfo is
    asked only to parse it (AI_NUMERICHOST). Before: an address took a slot like a name and was refused "not
    answered 8 lookups" while the name server stalled."""
    from services.wsrf.notification import Unresolved, lookup
    from tests.fixtures.resolver import stalling

    release = stalling(monkeypatch, "stalled.test")
    try:
        for n in range(notification.RESOLVERS):
            with pytest.raises(Unresolved):
                lookup("stalled.test", 80, 0.05, caller=f"/O=Grid/CN=staller{n}")
        assert lookups.held == notification.RESOLVERS
        for caller in ("/O=Grid/CN=alice", "/O=Grid/CN=staller0", None):
            infos = lookup(address, 8443, 5, caller=caller)
            assert {info[4][:2] for info in infos} == {(address, 8443)}
        assert lookups.held == notification.RESOLVERS
    finally:
        release.set()
    settled(lookups)



def test_a_name_that_timed_out_is_refused_at_once_for_its_caller_only(monkeypatch, lookups):
    """bob's name stalls and his lookup waits out its deadline; the name server then answers (the thread ends, the
    slot is back). bob's next lookups of it, in other letters too, are refused at once saying when it stalled and
    for how long it is not looked up, and the resolver is not asked; alice's lookup of the same name is hers and runs.
    After STALLED_TTL the name is looked up again. Before: nothing was remembered and each lookup of a stalling
    name took a slot and its deadline again."""
    from services.wsrf.notification import Unresolved, lookup
    from tests.fixtures.resolver import stalling

    release = stalling(monkeypatch, "stalled.test")
    asked = counting(monkeypatch)
    with pytest.raises(Unresolved, match="did not resolve within 0.05 s"):
        lookup("stalled.test", 80, 0.05, what="consumer host", caller="/O=Grid/CN=bob")
    release.set()
    settled(lookups)
    for spelt in ("stalled.test", "Stalled.TEST"):
        with pytest.raises(Unresolved) as exc:
            lookup(spelt, 80, 5, what="consumer host", caller="/O=Grid/CN=bob")
        assert (f"the consumer host {spelt!r} did not resolve within 0.05 s a moment ago (the name server did not "
                f"answer); it is not looked up again for") in str(exc.value)
    assert asked == ["stalled.test"]
    with pytest.raises(OSError):                # alice's own lookup: the (now failing) resolver is asked
        lookup("stalled.test", 80, 5, caller="/O=Grid/CN=alice")
    assert asked == ["stalled.test"] * 2
    lookups.remember("/O=Grid/CN=bob", "stalled.test", 0.05, time.monotonic() - notification.STALLED_TTL)
    with pytest.raises(OSError):                # remembered STALLED_TTL ago: asked again
        lookup("stalled.test", 80, 5, caller="/O=Grid/CN=bob")
    assert asked == ["stalled.test"] * 3


def test_stalled_names_are_bounded_per_caller_and_none_pushes_out_anothers():
    """The remembered names: a caller's beyond STALLED_PER_CALLER push out only its own oldest; when the total is
    reached, a new caller's name is not remembered (looked up again next time) and nobody's is forgotten, except
    those past their time."""
    now = time.monotonic()
    lookups = notification.Lookups(stalled_per_caller=3, stalled_total=5)
    lookups.remember("bob", "b0.test", 1.0, now)
    lookups.remember("bob", "b1.test", 1.0, now)
    for n in range(10):
        lookups.remember("mallory", f"m{n}.test", 1.0, now)
    assert list(lookups.stalled["mallory"]) == ["m7.test", "m8.test", "m9.test"]
    assert lookups.remembered("bob", "b0.test", now) and lookups.remembered("bob", "b1.test", now)
    lookups.remember("carol", "c0.test", 1.0, now)                   # the total (5) is reached: not remembered
    assert lookups.remembered("carol", "c0.test", now) is None and "carol" not in lookups.stalled
    assert lookups.remembered("bob", "b0.test", now) and len(lookups.stalled["mallory"]) == 3
    later = now + notification.STALLED_TTL + 1                        # all past their time: room again
    lookups.remember("carol", "c0.test", 1.0, later)
    assert lookups.remembered("carol", "c0.test", later)
    assert lookups.remembered("bob", "b0.test", later) is None and "mallory" not in lookups.stalled
    lookups = notification.Lookups(stalled_per_caller=3, stalled_total=2)     # an entry asked for past its time
    lookups.remember("bob", "b0.test", 1.0, now)
    lookups.remember("bob", "b1.test", 1.0, now)
    assert lookups.remembered("bob", "b0.test", later) is None            # forgotten: room for carol's at once
    lookups.remember("carol", "c0.test", 1.0, now)
    assert lookups.remembered("carol", "c0.test", now)


def test_refused_and_timed_out_lookups_are_logged_at_most_once_a_minute_with_a_count(monkeypatch, lookups, caplog):
    """bob's two stalled names time out and his next 20 lookups are refused (his share): the log has one warning of
    a timeout and one of a refusal; when the minute has passed (moved back here) the next refusal is logged with
    the count of those held back. Before: one WARNING line per refused lookup (attack14 H2: 2,286 of them)."""
    from services.wsrf.notification import Unresolved, lookup
    from tests.fixtures.resolver import stalling

    release = stalling(monkeypatch, "stalled-0.test", "stalled-1.test", "stalled-2.test")
    try:
        with caplog.at_level("WARNING", logger="vmgrid.wsrf.notification"):
            for name in ("stalled-0.test", "stalled-1.test"):
                with pytest.raises(Unresolved, match="did not resolve within"):
                    lookup(name, 80, 0.05, caller="/O=Grid/CN=bob")
            for _ in range(20):
                with pytest.raises(Unresolved, match="cannot be looked up now"):
                    lookup("stalled-2.test", 80, 0.05, caller="/O=Grid/CN=bob")
            lines = [r.getMessage() for r in caplog.records if r.name == "vmgrid.wsrf.notification"]
            assert len(lines) == 2, lines
            assert "no answer from the name server within 0.05 s" in lines[0] and "(1 such since" in lines[0]
            assert "refused: the name server has not answered 2 lookups" in lines[1] and "(1 such since" in lines[1]
            lookups.refusals._logged -= notification.WARN_EVERY
            with pytest.raises(Unresolved):
                lookup("stalled-2.test", 80, 0.05, caller="/O=Grid/CN=bob")
            lines = [r.getMessage() for r in caplog.records if r.name == "vmgrid.wsrf.notification"]
            assert len(lines) == 3 and "(20 such since the last warning of them" in lines[2], lines
    finally:
        release.set()
    settled(lookups)
