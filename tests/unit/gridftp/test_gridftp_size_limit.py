"""Data past a receiver's bound is a :class:`SizeLimitExceeded` (a ProtocolError), raised by both of the data
channel's receivers with their words kept, and the server tells a store's overrun from other protocol errors by that
type, not by the words "announced size" (contract15's leftover); the 552 it answers is tested with a real server in
test_gridftp_conformance.py (test_size_limits_without_and_with_allo) and with globus-url-copy in
tests/interop/test_gridftp_globus.py."""
from __future__ import annotations

import socket
import threading

import pytest

from gridftp.datachannel import ModeEReceiver, receive_stream
from gridftp.errors import ProtocolError, SizeLimitExceeded
from gridftp.protocol import BLOCK_HEADER
from gridftp.server import _past_bound


class _Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, offset: int, data) -> None:
        end = offset + len(data)
        self.data[len(self.data):end] = bytes(max(0, end - len(self.data)))
        self.data[offset:end] = data

    def record(self, start: int, end: int) -> None:
        pass


def _send(sock: socket.socket, payload: bytes) -> threading.Thread:
    def run():
        try:
            sock.sendall(payload)
        except OSError:
            pass
        finally:
            sock.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_mode_s_past_its_limit_is_a_size_limit_exceeded():
    ours, theirs = socket.socketpair()
    sender = _send(theirs, b"x" * 100)
    with pytest.raises(SizeLimitExceeded, match="^more data than the announced size 10$") as info:
        receive_stream(ours, _Sink(), 0, limit=10)
    assert isinstance(info.value, ProtocolError)
    sender.join()


def test_a_mode_e_block_past_its_limit_is_a_size_limit_exceeded():
    ours, theirs = socket.socketpair()
    sender = _send(theirs, BLOCK_HEADER.pack(0, 20, 0) + b"y" * 20)
    receiver = ModeEReceiver(_Sink(), limit=10)
    receiver.add_connection(ours)
    assert receiver.wait(30)
    assert isinstance(receiver.error, SizeLimitExceeded)
    assert str(receiver.error) == "block 0+20 beyond the announced size 10"
    receiver.close()
    sender.join()


def test_the_server_matches_the_overrun_by_its_type_not_its_words():
    assert _past_bound(SizeLimitExceeded("block 0+20 beyond the announced size 10"))
    assert _past_bound(SizeLimitExceeded("any words"))
    # another protocol error that happens to say the words is no overrun (the text match took it for one)
    assert not _past_bound(ProtocolError("EOF block beyond the announced size 10"))
    assert not _past_bound(ProtocolError("a data connection was closed before its end of data (EOD)"))
