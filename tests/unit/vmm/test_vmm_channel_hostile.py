"""A hostile guest on the channel socket: what it writes must not forge node log lines, corrupt what the node
stores and shows about the instance (GuestStatus, Failure), disturb another instance, or be taken as an answer
it was never asked for.

The guest is this test's own code on a Unix socket in QEMU's place (as tests/unit/vmm/test_vmm_channel_bounds.py):
real attack bytes through the real GuestChannelClient.
"""
from __future__ import annotations

import json
import logging
import socket
import threading

import pytest

from guestd import protocol
from services.vmmanager.vmm import GuestChannelClient, GuestChannelError, GuestUnavailable
from tests.unit.vmm.test_vmm_channel_bounds import FakeGuestd

TOKEN = "tok-" + "h" * 24
# what a guest puts in its words to fake a node line, clear the operator's screen, reverse what follows, cut a C string
HOSTILE = ("boom\n2026-11-29 01:00:00 ERROR services.vmmanager.node: instance i-other destroyed\r"
           "\x1b[2J\x1b]0;owned\x07\u202eevil\u2028\x00end")
UNSAFE = ["\n", "\r", "\x1b", "\x07", "\u202e", "\u2028", "\x00"]


class HostileGuest(FakeGuestd):
    """A Unix socket server in QEMU's place; ``answer(message)`` gives the lines to send for each request line."""

    def __init__(self, answer) -> None:
        self.answer = answer
        super().__init__(HostileGuest._serve)

    @staticmethod
    def _serve(guest: "HostileGuest", conn: socket.socket) -> None:
        buf = protocol.LineBuffer()
        while not guest.stop.is_set():
            data = conn.recv(65536)
            if not data:
                return
            for line in buf.feed(data):
                for out in guest.answer(json.loads(line)):
                    conn.sendall(out if isinstance(out, bytes) else protocol.encode(out))

    def send(self, line: bytes) -> None:
        """Send ``line`` on every connection, once the host's connect was accepted here (at most 5 s)."""
        for _ in range(500):
            if self.conns:
                break
            self.stop.wait(0.01)
        for c in list(self.conns):
            c.sendall(line)


@pytest.fixture
def hostile():
    made = []

    def make(answer) -> HostileGuest:
        made.append(HostileGuest(answer))
        return made[-1]
    yield make
    for g in made:
        g.close()


def reply(message: dict, **fields) -> dict:
    return {"op": "reply", "id": message["id"], "token": TOKEN, **fields}


def assert_one_safe_line(text: str, limit: int = 4000) -> None:
    for c in UNSAFE:
        assert c not in text, f"guest text reached the node unescaped: {c!r} in {text[:300]!r}"
    assert len(text) <= limit, f"{len(text)} characters of guest text kept"


# -- 1. guest text reaching the node's log, GuestStatus and Failure ---------------------------------------------------
def test_a_refusal_from_the_guest_is_escaped_and_bounded_in_the_error(hostile):
    guest = hostile(lambda m: [reply(m, ok=False, error=HOSTILE + "x" * 60000)])
    client = GuestChannelClient("i-hostile", guest.path, TOKEN)
    try:
        with pytest.raises(GuestChannelError) as info:
            client.request("status", timeout=5)
        assert_one_safe_line(str(info.value))
        assert "\\x1b[2J" in str(info.value), "the guest's words are shown, escaped"
    finally:
        client.retire()


def hostile_status(m: dict) -> list:
    return [reply(m, ok=True, result={
        "ready": True, "error": HOSTILE,
        "steps": {HOSTILE + "x" * 30000: {"ok": False},
                  "network": {"ok": True, "detail": {"address": HOSTILE, "netmask": HOSTILE, "interface": HOSTILE}}},
        "container": {"running": True, "pid": HOSTILE}})]


def test_guest_status_built_from_a_hostile_status_is_one_escaped_bounded_line(hostile):
    from services.vmmanager.phases import guest_summary
    guest = hostile(hostile_status)
    client = GuestChannelClient("i-hostile", guest.path, TOKEN)
    try:
        summary = guest_summary(client.status(timeout=5))
        assert_one_safe_line(summary)
        assert summary.startswith("ready, failed steps: boom\\x0a2026"), summary[:80]
        not_ready = guest_summary({"ready": False, "error": HOSTILE + "y" * 100000})
        assert_one_safe_line(not_ready)
    finally:
        client.retire()


def test_a_refused_message_logs_one_escaped_bounded_line(hostile, caplog):
    guest = hostile(lambda m: [])
    client = GuestChannelClient("i-hostile", guest.path, TOKEN)
    try:
        client.connect()
        caplog.set_level(logging.WARNING, logger="services.vmmanager.vmm.channel")
        guest.send(json.dumps({"v": 1, "op": HOSTILE + "z" * 60000, "token": TOKEN}).encode() + b"\n"
                   + json.dumps({"v": HOSTILE, "op": "ready", "token": TOKEN}).encode() + b"\n")
        with pytest.raises(GuestUnavailable):
            client.request("ping", timeout=0.5)     # the reader has handled both lines by then
        assert client.rejected_total == 2
        lines = [r.getMessage() for r in caplog.records if "refused a message" in r.getMessage()]
        assert len(lines) == 2
        for text in lines + client.rejected:
            assert_one_safe_line(text)
    finally:
        client.retire()


@pytest.mark.parametrize("answer", ["container", "refusal", "port"])
def test_the_job_service_note_and_its_log_line_escape_the_guests_words(hostile, tmp_path, caplog, answer):
    """guestcred.deliver: the certificate request's answer and refusal reach GuestStatus and the node log."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    from security.pki import GridCA
    from services.vmmanager import guestcred
    from services.vmmanager.config import VMManagerConfig
    ca = GridCA.create(tmp_path / "ca", "/O=Grid/OU=vmgrid/CN=Site CA")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "guest")])).sign(key, hashes.SHA256())
    detail = {"configured": True, "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
              "port": HOSTILE if answer == "port" else 8443}
    guest = hostile(lambda m: [reply(m, ok=True, result={"container": HOSTILE + "c" * 50000}) if answer == "container"
                               else reply(m, ok=False, error=HOSTILE + "r" * 50000)])
    client = GuestChannelClient("i-hostile", guest.path, TOKEN)
    caplog.set_level(logging.WARNING, logger="services.vmmanager.guestcred")
    try:
        note = guestcred.deliver(VMManagerConfig(guest_ca=str(ca.directory)), client,
                                 {"steps": {"grid": {"ok": True, "detail": detail}}}, "10.77.0.10", "g", tmp_path)
        assert_one_safe_line(note)
        for record in caplog.records:
            assert_one_safe_line(record.getMessage())
        assert ("job service https://" if answer == "container" else "job service not started") in note
    finally:
        client.retire()


# -- 2. messages out of turn -------------------------------------------------------------------------------------------
def test_forged_reply_ids_are_never_taken_as_the_answer(hostile):
    """A bool (True == 1), a float (1.0 == 1), a string, a huge and a never-sent id, an id of 5,000 digits, no id:
    none answers request 1; the guest's real reply still does."""
    def answer(m):
        forged = [{"op": "reply", "id": i, "token": TOKEN, "ok": True, "result": {"forged": True}}
                  for i in (True, 1.0, "1", 10 ** 30, m["id"] + 1000)]
        raw = (b'{"v":1,"op":"reply","token":"' + TOKEN.encode() + b'","ok":true,"id":' + b"9" * 5000 + b"}\n")
        return [*forged, raw, {"op": "reply", "token": TOKEN, "ok": True, "result": {"forged": True}},
                reply(m, ok=True, result={"real": True})]
    guest = hostile(answer)
    client = GuestChannelClient("i-hostile", guest.path, TOKEN)
    try:
        assert client.request("ping", timeout=5) == {"real": True}
        assert client.rejected_total == 4      # bool, float, string, 5,000 digits: refused; the others matched nothing
        assert client.request("ping", timeout=5) == {"real": True}, "nothing forged is left waiting for the next id"
    finally:
        client.retire()


def test_a_retired_channel_hears_nothing_more_from_the_guest(hostile):
    guest = hostile(lambda m: [reply(m, ok=True, result={})])
    client = GuestChannelClient("i-hostile", guest.path, TOKEN)
    client.ping()
    client.retire("the instance was destroyed")
    try:
        guest.send(protocol.encode({"op": "ready", "token": TOKEN, "steps": {"x": {"ok": True}}})
                   + protocol.encode({"op": "report", "token": TOKEN, "step": "network", "ok": True}))
    except OSError:
        pass                                    # the host end hung up: what the guest sends goes nowhere
    with pytest.raises(Exception) as info:
        client.request("status", timeout=1)
    assert type(info.value).__name__ == "GuestWaitCancelled" and "destroyed" in str(info.value)
    assert client.ready_message is None and client.reports == {} and not client.connected


def test_a_ready_before_any_request_keeps_at_most_max_steps_and_a_tokenless_one_is_refused(hostile):
    from services.vmmanager.vmm import channel as channel_mod
    guest = hostile(lambda m: [reply(m, ok=True, result={})])
    client = GuestChannelClient("i-hostile", guest.path, TOKEN)
    try:
        client.connect()
        guest.send(protocol.encode({"op": "ready", "token": "", "steps": {"a": {"ok": True}}})
                   + protocol.encode({"op": "ready", "token": TOKEN,
                                      "steps": {f"s{i}": {"ok": True} for i in range(2000)} | {"bad": "x"}}))
        client.ping()                           # both lines handled by then
        assert client.rejected_total == 1 and "bad token in a ready" in client.rejected[0]
        assert len(client.reports) == channel_mod.MAX_STEPS and "bad" not in client.reports
    finally:
        client.retire()


# -- 3. one guest flooding while another instance's channel is used ---------------------------------------------------
class Flooder(HostileGuest):
    """A guest that sends ``chunk`` forever from its first connection on (and answers nothing)."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk, self.sent = chunk, 0
        super().__init__(lambda m: [])

    def _run(self, conn: socket.socket) -> None:
        try:
            while not self.stop.is_set():
                conn.sendall(self.chunk)
                self.sent += len(self.chunk)
        except OSError:
            pass


@pytest.mark.parametrize("chunk", [b"x" * 65536,                                          # one endless line
                                   b'{"v":1,"op":"report","token":"bad","step":"s"}\n' * 1400,   # refused lines
                                   b"\n" * 65536])                                        # empty lines
def test_a_flooding_guest_does_not_stop_another_instances_channel(hostile, chunk):
    flood = Flooder(chunk)
    quiet = hostile(lambda m: [reply(m, ok=True, result={"n": m["id"]})])
    flooded = GuestChannelClient("i-flood", flood.path, TOKEN)
    other = GuestChannelClient("i-other", quiet.path, TOKEN)
    try:
        flooded.connect()
        while flooded.bytes_read < 65536:     # the flood is being read (and slowed down from its burst on)
            threading.Event().wait(0.01)
        for i in range(20):
            assert other.request("status", timeout=5) == {"n": i + 1}
        assert flooded.connected, "the flooding guest is slowed down, not cut off"
        assert len(flooded.rejected) <= 50
    finally:
        flooded.retire()
        other.retire()
        flood.close()


def test_a_100_mb_line_is_dropped_whole_and_the_next_line_is_answered(hostile):
    """Read at full speed here (the rate limit lifted), a 100 MB line without a newline is dropped as it comes,
    never held, and the guest's next line is handled."""
    def answer(m):
        return [b"y" * (100 * 1024 * 1024) + b"\n", reply(m, ok=True, result={"after": True})]
    guest = hostile(answer)
    client = GuestChannelClient("i-bigline", guest.path, TOKEN)
    client.read_rate = client.read_burst = 10 ** 12
    try:
        assert client.request("ping", timeout=60) == {"after": True}
        assert client.bytes_read > 100 * 1024 * 1024
        assert client.rejected_total == 0, "a line over the limit is dropped silently, not parsed"
    finally:
        client.retire()


@pytest.mark.parametrize("status", [
    {"ready": True, "steps": ["network"]}, {"ready": True, "steps": {"network": "up"}},
    {"ready": True, "steps": {"network": {"ok": True, "detail": "10.0.0.1"}}}, {"ready": True, "container": "yes"},
    {"ready": True, "steps": {"grid": {"ok": True, "detail": ["csr"]}}}, {"ready": False, "error": {"a": [1]}}])
def test_a_status_of_the_wrong_shape_is_summarised_not_a_crash(status):
    """guestd's status is the guest's: a list where an object belongs raised AttributeError in the deploy."""
    from services.vmmanager import guestcred
    from services.vmmanager.phases import guest_summary
    assert_one_safe_line(guest_summary(status))
    assert guestcred.requested(status) is None


def test_a_lone_surrogate_is_refused_at_the_line_not_a_crash_later(hostile):
    r"""JSON's "\ud800" decodes to a str no UTF-8 can hold: in the token it killed the reader thread (encode), in a
    refusal's error it would fail the node log's write and SQLite's insert of GuestStatus or Failure."""
    guest = hostile(lambda m: [
        b'{"v":1,"op":"reply","id":%d,"token":"\\ud800","ok":true}\n' % m["id"],
        b'{"v":1,"op":"reply","id":%d,"token":"%s","ok":false,"error":"x\\udfff"}\n' % (m["id"], TOKEN.encode()),
        reply(m, ok=True, result={"fine": "\ud83d\ude00"})])
    client = GuestChannelClient("i-hostile", guest.path, TOKEN)
    try:
        assert client.request("status", timeout=5) == {"fine": "\U0001f600"}, "a proper pair still decodes"
        assert client.rejected_total == 2 and all("surrogate" in why for why in client.rejected)
        assert client.connected, "the reader lives on"
    finally:
        client.retire()


@pytest.mark.parametrize("steps", [[1, 2], "abc", 7, True])
def test_a_ready_whose_steps_are_not_an_object_leaves_the_reader_alive(hostile, steps):
    """A ready with ``steps`` a list or a string raised AttributeError on the channel's reader thread (the connection
    dropped, every waiter failed): now its steps are ignored and the channel answers on."""
    guest = hostile(lambda m: [reply(m, ok=True, result={"n": m["id"]})])
    client = GuestChannelClient("i-hostile", guest.path, TOKEN)
    try:
        client.connect()
        first = client._conn
        guest.send(protocol.encode({"op": "ready", "token": TOKEN, "steps": steps}))
        assert client.request("status", timeout=5) == {"n": 1}
        assert client.ready_message is not None and client.reports == {}
        assert client._conn is first, "the same connection answers: its reader did not end"
        assert client.rejected_total == 0
    finally:
        client.retire()


def test_guest_status_fits_in_xml_whatever_the_guest_said():
    """GuestStatus goes out in SOAP (Status, the node's listings): a character XML cannot hold (NUL, ESC, U+FFFE,
    U+FFFF) in it made lxml refuse the whole answer."""
    from lxml import etree

    from services.vmmanager.phases import guest_summary
    for said in ("\x00", "\x1b", "\ufffe", "\uffff", HOSTILE):
        for status in ({"ready": False, "error": said}, {"ready": True, "steps": {said: {"ok": False}}}):
            etree.Element("GuestStatus").text = guest_summary(status)
