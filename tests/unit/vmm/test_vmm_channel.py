"""The host's GuestChannelClient against the real guestd (Guestd with its GuestPort), joined by a Unix
socket relay standing in for QEMU's virtio-serial chardev (the real device path runs in tests/vm).
guestd's privileged operations use the FakeSystem of tests/unit/guestd (the test machine's clock must
not change)."""
from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guestd"))

from guestd.daemon import Guestd  # noqa: E402
from guestd.port import GuestPort  # noqa: E402
from guestd.sources.directory import DirectorySource  # noqa: E402
from guestd.steps import Environment  # noqa: E402
from guestd_fakes import FakeSystem, fake_roots  # noqa: E402
from services.vmmanager.context import build_context  # noqa: E402
from services.vmmanager.vmm import GuestChannelClient, GuestChannelError, GuestUnavailable  # noqa: E402

MAC = "52:54:00:0c:0d:0e"


class ChardevRelay:
    """Like QEMU's `-chardev socket,server=on`: one host client at a time, bytes relayed to the guest port."""

    def __init__(self, path: Path, guest_end: socket.socket) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.guest_end = guest_end
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                try:
                    self._pump(conn)
                except OSError:     # the host end went away mid-send: wait for the next client
                    pass

    def _pump(self, conn: socket.socket) -> None:
        sel = selectors.DefaultSelector()   # poll/epoll: no FD_SETSIZE limit, unlike select()
        sel.register(conn, selectors.EVENT_READ)
        sel.register(self.guest_end, selectors.EVENT_READ)
        try:
            self._pump_with(conn, sel)
        finally:
            sel.close()

    def _pump_with(self, conn: socket.socket, sel: selectors.BaseSelector) -> None:
        while not self.stop:
            r = [key.fileobj for key, _ in sel.select(0.2)]
            if conn in r:
                data = conn.recv(65536)
                if not data:
                    return
                self.guest_end.sendall(data)
            if self.guest_end in r:
                conn.sendall(self.guest_end.recv(65536))

    def close(self) -> None:
        self.stop = True
        self.server.close()


@pytest.fixture
def guest(tmp_path):
    ctxdir = tmp_path / "ctx"
    ctxdir.mkdir()
    context = build_context(instance="i-chan", hostname="chan", mac=MAC, address="10.3.0.3",
                            netmask="255.255.255.0", token="tok-" + "x" * 20)
    (ctxdir / "context.json").write_bytes(context.to_json())
    roots = fake_roots(tmp_path / "root", nics={"eth0": MAC})
    system = FakeSystem(roots)
    relay_end, guest_end = socket.socketpair()
    port = GuestPort(fd=guest_end.detach()).start()
    daemon = Guestd(Environment(system, roots), port, [DirectorySource(ctxdir)])
    sock_dir = Path(tempfile.mkdtemp(prefix="vmgrid-ch-", dir="/tmp"))
    relay = ChardevRelay(sock_dir / "g.sock", relay_end)
    yield {"daemon": daemon, "system": system, "path": sock_dir / "g.sock", "token": context.token, "port": port}
    relay.close()
    port.stop()
    relay_end.close()
    (sock_dir / "g.sock").unlink(missing_ok=True)
    os.rmdir(sock_dir)


def test_wait_ready_sees_guestd_boot_and_its_reports(guest):
    client = GuestChannelClient("i-chan", guest["path"], guest["token"])
    threading.Timer(0.3, guest["daemon"].boot).start()     # guestd boots after the host connected
    status = client.wait_ready(timeout=10, poll=0.5)
    assert status["ready"] and status["instance"] == "i-chan" and status["context_source"] == "directory"
    assert status["steps"]["network"]["detail"]["address"] == "10.3.0.3"
    deadline = time.monotonic() + 5
    while client.ready_message is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.ready_message["instance"] == "i-chan"
    assert {"clock", "hostname", "network", "container"} <= set(client.reports)
    assert client.rejected == []
    client.close()


def test_set_time_moves_the_guest_clock_to_the_host(guest):
    guest["daemon"].boot()
    guest["system"].offset = -3600.0
    client = GuestChannelClient("i-chan", guest["path"], guest["token"])
    result = client.set_time()
    assert result["offset_before"] < -3500
    assert abs(guest["system"].now() - time.time()) < 0.5
    assert client.ping() < 2
    client.close()


def test_messages_with_a_wrong_token_are_refused(guest):
    guest["daemon"].boot()
    client = GuestChannelClient("i-chan", guest["path"], "someone-elses-token-123")
    with pytest.raises(GuestUnavailable):
        client.ping(timeout=1)
    assert any("bad token" in r for r in client.rejected)
    client.close()


def test_guestd_errors_come_back_typed(guest):
    guest["daemon"].boot()
    client = GuestChannelClient("i-chan", guest["path"], guest["token"])
    with pytest.raises(GuestChannelError, match="already has its context"):
        import json
        client.request("context", context=json.loads(
            build_context(instance="i-other", hostname="o", mac=MAC, address="10.3.0.4",
                          netmask="255.255.255.0").to_json()))
    with pytest.raises(GuestChannelError, match="not a host-to-guest"):
        client.request("ready")
    client.close()


def test_the_client_reconnects_after_the_host_end_closed(guest):
    guest["daemon"].boot()
    client = GuestChannelClient("i-chan", guest["path"], guest["token"])
    client.ping()
    client.close()
    assert not client.connected
    assert client.status()["ready"]                       # the next request connects again
    client.close()


def test_nothing_listening_is_guest_unavailable(tmp_path):
    client = GuestChannelClient("i-none", tmp_path / "absent.sock", "t" * 20)
    with pytest.raises(GuestUnavailable):
        client.ping(timeout=1)
    with pytest.raises(GuestUnavailable):
        client.wait_ready(timeout=0.5)


def test_a_migrated_guest_answers_with_its_previous_token_until_migrated_gives_it_the_targets(guest):
    """The target's channel has the target's token; guestd still holds the source's: accept_previous lets the
    resume's set-time through, guestd's ``migrated`` answer comes with the new token, and the old one is then
    refused."""
    guest["daemon"].boot()
    new = "new-" + "y" * 20
    client = GuestChannelClient("i-chan", guest["path"], new)
    client.accept_previous(guest["token"])
    assert "offset_before" in client.set_time(timeout=5)
    moved = json.loads(build_context(instance="i-chan", hostname="chan", mac=MAC, address="10.3.0.4",
                                     netmask="255.255.255.0", token=new).to_json())
    status = client.request("migrated", timeout=10, token=guest["token"], context=moved, time=time.time())
    assert status["context_source"] == "migrated" and status["steps"]["network"]["detail"]["address"] == "10.3.0.4"
    assert client.ping() < 5
    assert client._previous == "", "the first message with the target's token ends the previous one"
    assert guest["port"]._token == new
    client.close()
    old = GuestChannelClient("i-chan", guest["path"], guest["token"])
    with pytest.raises(GuestUnavailable):
        old.ping(timeout=1)
    old.close()
