"""The guestd channel protocol: encoding, validation, line splitting, and guestd's port end over a real
socket pair standing in for the virtio-serial device (a real device exists only in a guest: tests/vm)."""
from __future__ import annotations

import socket
import time

import pytest

from guestd import protocol
from guestd.port import GuestPort, find_port

from guestd_fakes import fake_roots


def test_encode_decode_round_trip():
    line = protocol.encode({"op": "set-time", "id": 3, "time": 12.5})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line, protocol.HOST_OPS) == {"op": "set-time", "id": 3, "time": 12.5, "v": 1}


@pytest.mark.parametrize("line, words", [
    (b"not json", "JSON"),
    (b"[1]", "object"),
    (b'{"op": "ping"}', "version"),
    (b'{"v": 1, "op": "reboot"}', "op"),
    (b'{"v": 1, "op": "ready", "token": "x"}', "op"),            # a guest op sent to the guest
    (b'{"v": 1, "op": "ping", "id": "1"}', "id"),
    (b'{"v": 1, "op": "set-time", "time": "noon"}', "set-time"),
    (b'{"v": 1, "op": "context", "context": 5}', "context"),
])
def test_host_messages_are_checked(line, words):
    with pytest.raises(protocol.ProtocolError, match=words):
        protocol.decode(line, protocol.HOST_OPS)


def test_guest_messages_need_the_token():
    with pytest.raises(protocol.ProtocolError, match="token"):
        protocol.decode(b'{"v": 1, "op": "report", "step": "clock"}', protocol.GUEST_OPS)


@pytest.mark.parametrize("line", [b"[" * 60000, b"[" * 30000 + b"]" * 30000, b'{"v": 1, "op": "ping", "n": ' + b"9" * 5000 + b"}",
                                  b'{"v": 1, "op": "reply", "id": true, "token": "t"}'])
def test_lines_that_break_the_json_reader_are_protocol_errors(line):
    """Within the 64 KiB line bound: nesting past the interpreter's recursion limit (RecursionError), an integer of
    more than 4,300 digits (ValueError), a boolean id: each a ProtocolError like any bad line, nothing else."""
    assert len(line) < protocol.MAX_LINE
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(line, protocol.GUEST_OPS | protocol.HOST_OPS)


def test_oversized_messages_are_refused_and_overlong_lines_dropped():
    with pytest.raises(protocol.ProtocolError):
        protocol.encode({"op": "ping", "pad": "x" * protocol.MAX_LINE})
    buf = protocol.LineBuffer()
    assert buf.feed(b"x" * (protocol.MAX_LINE + 10)) == []
    assert buf.feed(b"still the long line\n{\"a\":1}\n") == [b'{"a":1}']


def test_line_buffer_cost_is_linear_in_what_it_is_fed():
    """65,536 newlines in one read: one split, not 65,536 copies of the rest of the buffer (which made a guest's
    blank lines cost the host 0.15 s of CPU per 64 KiB). Counted, not timed: the buffer's bytes copied."""
    copied = []

    class Counting(bytes):
        def __getitem__(self, key):
            out = bytes.__getitem__(self, key)
            copied.append(len(out))
            return Counting(out)

        def __add__(self, other):
            return Counting(bytes.__add__(self, other))

    buf = protocol.LineBuffer()
    buf._buf = Counting(b"")
    assert buf.feed(b"\n" * 65536 + b'{"a":1}\n' + b"x" * 10) == [b'{"a":1}']
    assert sum(copied) <= 2 * 65536 + 100, sum(copied)
    assert buf.feed(b"y\n") == [b"x" * 10 + b"y"]


def test_line_buffer_joins_split_lines():
    buf = protocol.LineBuffer()
    assert buf.feed(b'{"a"') == []
    assert buf.feed(b':1}\n\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']


def test_find_port_by_name_in_sysfs(tmp_path):
    roots = fake_roots(tmp_path)
    for dev, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport0p2", "org.vmgrid.guestd.0")):
        (roots.sys / "class" / "virtio-ports" / dev).mkdir(parents=True)
        (roots.sys / "class" / "virtio-ports" / dev / "name").write_text(name + "\n")
    assert find_port(roots, "org.vmgrid.guestd.0") == roots.dev / "vport0p2"
    assert find_port(roots, "nothing") is None


def _recv_messages(sock, count, timeout=5.0):
    sock.settimeout(timeout)
    buf, out = protocol.LineBuffer(), []
    while len(out) < count:
        out += [protocol.decode(l, protocol.GUEST_OPS) for l in buf.feed(sock.recv(65536))]
    return out


@pytest.fixture
def port_pair():
    host, guest = socket.socketpair()
    port = GuestPort(fd=guest.detach())
    port.set_token("secret-token-0123456789")
    port.handle("ping", lambda m: {"pong": True})
    yield host, port
    port.stop()
    host.close()


def test_port_answers_requests_with_the_token(port_pair):
    host, port = port_pair
    port.start()
    host.sendall(protocol.encode({"op": "ping", "id": 41}))
    (reply,) = _recv_messages(host, 1)
    assert reply == {"op": "reply", "id": 41, "ok": True, "result": {"pong": True},
                     "token": "secret-token-0123456789", "v": 1}


def test_port_answers_bad_and_unknown_requests_with_errors(port_pair):
    host, port = port_pair
    port.start()
    host.sendall(b"garbage\n" + protocol.encode({"op": "status", "id": 2}))
    first, second = _recv_messages(host, 2)
    assert first["ok"] is False and "JSON" in first["error"]
    assert second["id"] == 2 and second["ok"] is False and "not available" in second["error"]


def test_port_keeps_messages_while_the_host_is_away_and_survives_eof(port_pair):
    """A virtio port reads EOF while the host end is closed: guestd must neither stop nor lose messages."""
    host, port = port_pair
    port.send({"op": "report", "step": "clock", "ok": True})
    host.shutdown(socket.SHUT_WR)          # the guest now reads end-of-file...
    port.start()
    time.sleep(0.5)
    port.send({"op": "ready", "instance": "i"})
    got = _recv_messages(host, 2)          # ...and still delivers what it queued
    assert [m["op"] for m in got] == ["report", "ready"]
    assert port._thread.is_alive()
