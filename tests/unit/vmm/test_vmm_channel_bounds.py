"""A guest is untrusted input: the host end of the guest channel stays bounded whatever guestd does.

The misbehaving guests here are fake guestds on the host side: a Unix socket server standing where
QEMU's virtio-serial chardev listens (`<channel type='unix'>`, mode bind), behaving as a guest that
never reads its port (stall), never answers (silent), or floods the channel. A real guest that boots
without guestd runs in tests/vm/test_guest_untrusted_qemu.py. No test here asserts a duration: each
either proves an upper bound that a slower machine only makes easier, or that a call returns at all.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from guestd import protocol
from services.vmmanager.vmm import GuestChannelClient, GuestUnavailable, GuestWaitCancelled
from services.vmmanager.vmm import channel as channel_mod

TOKEN = "tok-" + "u" * 24


class FakeGuestd:
    """A Unix socket server in QEMU's place; ``behave(conn)`` plays the guest on each connection."""

    def __init__(self, behave) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vg-ch-", dir="/tmp"))
        self.path = self.dir / "g.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(4)
        self.behave = behave
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.sent = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.behave(self, conn)
        except OSError:
            pass

    def send_forever(self, conn: socket.socket, chunk: bytes) -> None:
        while not self.stop.is_set():
            conn.sendall(chunk)
            self.sent += len(chunk)

    def close(self) -> None:
        self.stop.set()
        self.server.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.path.unlink(missing_ok=True)
        os.rmdir(self.dir)


def stall(guest: FakeGuestd, conn: socket.socket) -> None:
    """A guest that never reads its port: the host's writes fill the socket and then cannot go on."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    guest.stop.wait()


def silent(guest: FakeGuestd, conn: socket.socket) -> None:
    """A guest that reads everything and never answers (a kernel without guestd reading the port)."""
    while conn.recv(65536):
        pass


@pytest.fixture
def fake():
    made = []

    def make(behave) -> FakeGuestd:
        made.append(FakeGuestd(behave))
        return made[-1]
    yield make
    for g in made:
        g.close()


def fill_until_stalled(client: GuestChannelClient) -> GuestUnavailable:
    """Send big requests until one cannot be written; return that error (bounded: 400 x 60 KB)."""
    for _ in range(400):
        try:
            client.request("status", timeout=0.01, pad="x" * 60000)
        except GuestUnavailable as exc:
            if "does not read" in str(exc):
                return exc
    pytest.fail("400 requests of 60 KB were written to a guest that never reads")


def test_a_guest_that_never_reads_makes_the_request_fail_not_hang(fake):
    guest = fake(stall)
    client = GuestChannelClient("i-stall", guest.path, TOKEN)
    client.send_timeout = 0.3
    exc = fill_until_stalled(client)
    assert "does not read its channel" in str(exc)
    assert not client.connected, "a half-written line is never continued: the connection was dropped"
    client.close()


def fill_socket(client: GuestChannelClient) -> None:
    """Fill the connection's socket buffers the way a guest that stopped reading leaves them."""
    client.connect()
    sock = client._conn.sock
    for _ in range(10000):
        try:
            sock.send(b"\n" * 65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
    pytest.fail("640 MB went into the socket of a guest that never reads")


@pytest.mark.parametrize("end", ["close", "retire"])
def test_close_and_other_callers_are_not_blocked_by_a_stalled_write(fake, end):
    """Today's bug: sendall without a timeout under the channel lock, so close() (and so Destroy
    and SIGTERM) waited forever behind a guest that does not read."""
    guest = fake(stall)
    client = GuestChannelClient("i-stall2", guest.path, TOKEN)
    client.send_timeout = 3600.0           # a writer that may wait an hour on a full socket
    fill_socket(client)
    outcome: list = []

    def writer() -> None:
        try:
            client.request("status", timeout=3600)
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            outcome.append(exc)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not client._send_lock.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    # a second caller gives up after its own timeout instead of queueing behind the stuck writer
    with pytest.raises(GuestUnavailable, match="still stuck sending"):
        client.request("ping", timeout=0.5)
    closer = threading.Thread(target=getattr(client, end), daemon=True)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), f"{end}() returned while a write was stalled"
    t.join(30)
    assert not t.is_alive(), "the stalled writer was woken"
    assert isinstance(outcome[0], GuestUnavailable if end == "close" else GuestWaitCancelled), outcome


def test_a_silent_guest_times_out_the_ready_wait(fake):
    guest = fake(silent)
    client = GuestChannelClient("i-silent", guest.path, TOKEN)
    with pytest.raises(GuestUnavailable, match="not ready within 1 s") as exc:
        client.wait_ready(timeout=1, poll=0.2)
    # what the wait saw, not the last status request's own cut-off ("did not answer status within 0.19 s")
    assert "it never answered on the guest channel" in str(exc.value) and "did not answer" not in str(exc.value)
    client.close()


def test_the_caller_can_cancel_a_ready_wait(fake):
    guest = fake(silent)
    client = GuestChannelClient("i-cancel", guest.path, TOKEN)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(GuestWaitCancelled, match="cancelled"):
        client.wait_ready(timeout=3600, poll=30, cancel=cancel)   # would wait an hour otherwise
    client.close()


def test_retiring_the_channel_ends_every_wait_and_later_requests(fake):
    """What the VMM does on destroy, save, shutdown and close: a deploy waiting for guestd ends."""
    guest = fake(silent)
    client = GuestChannelClient("i-retire", guest.path, TOKEN)
    threading.Timer(0.5, client.retire, args=("the instance was destroyed",)).start()
    with pytest.raises(GuestWaitCancelled, match="destroyed"):
        client.wait_ready(timeout=3600, poll=30)
    with pytest.raises(GuestWaitCancelled):
        client.ping(timeout=5)


def test_a_wait_on_a_socket_nobody_listens_on_can_be_cancelled(tmp_path):
    client = GuestChannelClient("i-none", tmp_path / "absent.sock", TOKEN)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(GuestWaitCancelled):
        client.wait_ready(timeout=3600, cancel=cancel)


def test_a_flood_without_newlines_is_read_at_a_bounded_rate_and_kept_bounded(fake):
    guest = fake(lambda g, conn: g.send_forever(conn, b"A" * 65536))
    client = GuestChannelClient("i-flood", guest.path, TOKEN)
    client.read_rate, client.read_burst = 64 * 1024, 64 * 1024
    t0 = time.monotonic()
    with pytest.raises(GuestUnavailable):
        client.wait_ready(timeout=2, poll=0.5)
    read = client.bytes_read
    elapsed = time.monotonic() - t0          # measured after: the bound only grows with it
    # the reader takes at most the burst plus the rate: the rest stays in the guest's socket
    assert read <= client.read_burst + client.read_rate * elapsed + 2 * 65536
    assert guest.sent > read, "the guest was slowed down, not drained"
    assert client.reports == {} and client.ready_message is None
    client.close()


def test_a_flood_of_messages_keeps_reports_and_refusals_capped(fake):
    """Valid lines (the guest has its token) with ever new step names, and lines with a bad token."""
    def flood(g: FakeGuestd, conn: socket.socket) -> None:
        n = 0
        while not g.stop.is_set() and n < 20000:
            lines = b"".join(protocol.encode({"op": "report", "step": f"s{n + i}", "ok": True,
                                              "token": TOKEN if i % 2 else "forged-token-xxxxxxxx"})
                             for i in range(100))
            conn.sendall(lines)
            g.sent += len(lines)
            n += 100
    guest = fake(flood)
    client = GuestChannelClient("i-flood2", guest.path, TOKEN)
    client.connect()
    deadline = time.monotonic() + 60
    while client.rejected_total < 2 * channel_mod.MAX_REJECTED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(client.reports) <= channel_mod.MAX_STEPS
    assert len(client.rejected) <= channel_mod.MAX_REJECTED < client.rejected_total
    assert any("bad token" in r for r in client.rejected)
    client.close()


def test_lines_that_break_the_json_reader_are_refused_and_the_channel_reads_on(fake):
    """A guest's line nested 60,000 deep (RecursionError in json) or with a 5,000-digit number (ValueError): each
    is refused like any bad line, and the channel's reader goes on to the guest's next, valid, message."""
    def hostile(g: FakeGuestd, conn: socket.socket) -> None:
        conn.sendall(b"[" * 60000 + b"\n" + b'{"v": 1, "op": "report", "step": "x", "n": ' + b"9" * 5000 + b"}\n")
        conn.sendall(protocol.encode({"op": "report", "step": "clock", "ok": True, "token": TOKEN}))
        g.stop.wait(60)

    guest = fake(hostile)
    client = GuestChannelClient("i-deep", guest.path, TOKEN)
    client.connect()
    deadline = time.monotonic() + 60
    while "clock" not in client.reports:            # the valid report after the two bad lines arrives
        assert time.monotonic() < deadline, client.rejected
        time.sleep(0.05)
    assert client.rejected_total == 2 and all("not a JSON line" in r for r in client.rejected), client.rejected
    client.close()


def test_an_answering_guest_still_works_after_the_bounds(fake):
    """The bounds cost a well-behaved guestd nothing: status and ready come back as before."""
    guest = fake(_answering("i-good"))
    client = GuestChannelClient("i-good", guest.path, TOKEN)
    assert client.wait_ready(timeout=30)["instance"] == "i-good"
    assert client.ping() < 30
    client.close()


def _answering(instance: str):
    """A well-behaved guestd for ``instance``: every request gets its reply."""
    def guestd(g: FakeGuestd, conn: socket.socket) -> None:
        buf = protocol.LineBuffer()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for line in buf.feed(data):
                m = json.loads(line)
                conn.sendall(protocol.encode({"op": "reply", "id": m["id"], "ok": True, "token": TOKEN,
                                              "result": {"ready": True, "instance": instance}}))
    return guestd


@pytest.mark.parametrize("flood", [b"A" * 65536, protocol.encode({"op": "report", "step": "s", "ok": True,
                                                                   "token": TOKEN}) * 500])
def test_one_guest_flooding_its_channel_delays_no_other_instance(fake, flood):
    """Two instances on one node: one guest floods its channel (one endless line, or valid reports as fast as it
    can), the other is asked for its status a hundred times meanwhile and answers every time."""
    bad = fake(lambda g, conn: g.send_forever(conn, flood))
    good = fake(_answering("i-neighbour"))
    flooded = GuestChannelClient("i-flooder", bad.path, TOKEN)
    neighbour = GuestChannelClient("i-neighbour", good.path, TOKEN)
    try:
        flooded.connect()
        deadline = time.monotonic() + 60
        while flooded.bytes_read < 256 * 1024 and time.monotonic() < deadline:    # the flood is on
            time.sleep(0.01)
        assert flooded.bytes_read >= 256 * 1024
        for _ in range(100):
            assert neighbour.status(timeout=60)["instance"] == "i-neighbour"
        assert bad.sent > 0 and flooded.ready_message is None
    finally:
        flooded.close()
        neighbour.close()


def test_what_a_guest_sends_after_its_instance_ended_counts_for_nothing(fake):
    """Once the channel is retired (the instance destroyed, saved or moved), a ready or an answer the guest still
    sends makes no wait succeed and no request answered; a reply to an id never asked, or with a boolean id, is
    dropped."""
    sent = threading.Event()

    def late(g: FakeGuestd, conn: socket.socket) -> None:
        conn.sendall(protocol.encode({"op": "reply", "id": 424242, "ok": True, "token": TOKEN, "result": {}}))
        conn.sendall(b'{"v": 1, "op": "reply", "id": true, "ok": true, "token": "' + TOKEN.encode() + b'"}\n')
        sent.set()
        g.stop.wait(5)
        try:
            conn.sendall(protocol.encode({"op": "ready", "token": TOKEN, "steps": {}}))
        except OSError:
            pass

    guest = fake(late)
    client = GuestChannelClient("i-ended", guest.path, TOKEN)
    client.connect()
    assert sent.wait(30)
    client.retire("the instance was destroyed")
    with pytest.raises(GuestWaitCancelled):
        client.wait_ready(timeout=5, poll=0.1)
    with pytest.raises(GuestWaitCancelled):
        client.status(timeout=5)
    assert client.ready_message is None
