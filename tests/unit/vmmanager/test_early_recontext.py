"""The warm restore's recontext sent while libvirt restores (phases._EarlyRecontext).

A real guest channel client (services/vmmanager/vmm/channel.py) on a real Unix socket; the test plays
libvirt (it starts listening on the clone's channel socket part-way through "the restore") and guestd
(it answers the request line). No QEMU: the QEMU tier (tests/vm/test_warm_qemu.py) runs it for real.
"""
from __future__ import annotations

import json
import socket
import threading
from types import SimpleNamespace

import pytest

from guestd import protocol
from services.vmmanager import phases
from services.vmmanager.vmm.channel import GuestChannelClient
from services.vmmanager.vmm.errors import GuestUnavailable, GuestWaitCancelled

TOKEN = "T" * 24


def parts_for(channel: GuestChannelClient) -> SimpleNamespace:
    return SimpleNamespace(vmm=SimpleNamespace(guest_channel=lambda key: channel),
                           config=SimpleNamespace(warm_restore_timeout=30.0))


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "g.sock"


def listen(path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(30)
    return srv


def read_line(conn: socket.socket) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        assert chunk, "the node closed the channel before its request was whole"
        buf += chunk
    return json.loads(buf)


def test_the_recontext_waits_in_the_socket_before_the_restore_ends(sock_path):
    channel = GuestChannelClient("clone-1", sock_path, TOKEN)
    early = phases._EarlyRecontext(parts_for(channel), "clone-1", sock_path, {"instance": "clone-1"},
                                   threading.Event())
    with listen(sock_path) as srv:          # libvirt listens on the clone's socket before QEMU runs
        conn, _ = srv.accept()              # the node connected while "the restore" still runs
        with conn:
            request = read_line(conn)
            assert request["op"] == "recontext" and request["context"]["instance"] == "clone-1"
            assert len(bytes.fromhex(request["seed"])) >= 32 and request["context"]["time"] > 0
            conn.sendall(protocol.encode({"op": "reply", "id": request["id"], "ok": True,
                                          "result": {"ready": True, "instance": "clone-1"}, "token": TOKEN}))
            assert early.result(30) == {"ready": True, "instance": "clone-1"} and early.sent
    channel.close()


def test_nothing_is_sent_when_the_socket_never_listened(sock_path):
    channel = GuestChannelClient("clone-2", sock_path, TOKEN)
    early = phases._EarlyRecontext(parts_for(channel), "clone-2", sock_path, {"instance": "clone-2"},
                                   threading.Event())
    assert early.result(30) is None and not early.sent     # the restore sends it afterwards, as before


def test_a_silent_guest_fails_the_restore_after_the_timeout_counted_from_its_end(sock_path):
    channel = GuestChannelClient("clone-3", sock_path, TOKEN)
    cancel = threading.Event()
    early = phases._EarlyRecontext(parts_for(channel), "clone-3", sock_path, {"instance": "clone-3"}, cancel)
    with listen(sock_path) as srv:
        conn, _ = srv.accept()
        with conn:
            assert read_line(conn)["op"] == "recontext"
            with pytest.raises(GuestUnavailable, match="did not answer recontext"):
                early.result(0.2)
    channel.close()


def test_a_cancelled_deploy_stops_waiting_for_the_recontext(sock_path):
    channel = GuestChannelClient("clone-4", sock_path, TOKEN)
    cancel = threading.Event()
    early = phases._EarlyRecontext(parts_for(channel), "clone-4", sock_path, {"instance": "clone-4"}, cancel)
    with listen(sock_path) as srv:
        conn, _ = srv.accept()
        with conn:
            assert read_line(conn)["op"] == "recontext"
            cancel.set()
            with pytest.raises(GuestWaitCancelled):
                early.result(30)
    channel.close()
