"""A guest is untrusted input: a real QEMU guest that boots without guestd never wedges its node.

The guest is vmgrid's own image booted with a kernel command line naming a root disk that does not
exist (``root=/dev/vdz``): the kernel and initramfs run, the root never mounts, guestd never starts,
nobody opens the guest's end of the channel, so QEMU stops reading the host's end and a write to it
would block. A second test-only guest floods the channel: vmgrid's image with guestd's daemon module
replaced (debugfs, on a raw copy of the root disk) by a flooder that never answers and writes forged
reports, a 1 MB line and garbage lines as fast as the port takes them. (Fake guestds on the channel's
socket that stall, stay silent or flood, host side: tests/unit/vmm/test_vmm_channel_bounds.py.)

Through the VMM contract: the guest-ready wait ends at its timeout, when the caller cancels it, and
when the instance is destroyed. Through a VMManager node process (`vmgrid serve vmmanager`): Destroy
answers while the deploy waits for guestd, the node keeps answering other calls, SIGTERM stops the
node, and a deploy whose guest never gets ready fails at guest_ready_timeout with everything released.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from client.localgrid import write_toml
from client.soap import GridServiceClient
from client.vmmanager import VMManagerClient
from services.descriptor import parse_descriptor
from services.vmmanager.vmm import Disk, GuestUnavailable, GuestWaitCancelled, InstanceState
from services.vmmanager.vmm import channel as channel_mod
from services.vmmanager.vmm.config import domain_name
from tests.fixtures.grid import free_port, start_grid

from scene import link_or_copy
from test_vmmanager_qemu import DESCRIPTOR, NodeProcess, node_settings, qemu_pids, qemu_processes

NO_GUESTD = "console=ttyS0 root=/dev/vdz rw quiet"      # no such disk: the guest never reaches guestd
IMAGE = "vmgrid-no-guestd"


# -- through the VMM contract -------------------------------------------------------------------------
@pytest.fixture
def silent_guest(qemu_node, guest_spec_factory):
    spec, _ = guest_spec_factory("q-noguestd", memory_mib=128, cmdline=NO_GUESTD)
    qemu_node.define(spec)
    qemu_node.start(spec.name)
    yield spec
    for verb in (qemu_node.destroy, qemu_node.undefine):
        try:
            verb(spec.name)
        except Exception:  # noqa: BLE001 - already gone
            pass


def test_the_ready_wait_on_a_guest_without_guestd_ends_at_its_timeout_or_when_cancelled(qemu_node, silent_guest):
    channel = qemu_node.guest_channel(silent_guest.name)
    with pytest.raises(GuestUnavailable, match="not ready within 3 s"):
        channel.wait_ready(timeout=3, poll=0.25)
    # many more requests than the socket holds: each one is bounded, none blocks the caller
    for _ in range(300):
        with pytest.raises(GuestUnavailable):
            channel.request("status", timeout=0.01, pad="z" * 4000)
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    with pytest.raises(GuestWaitCancelled):
        channel.wait_ready(timeout=3600, poll=0.25, cancel=cancel)
    assert qemu_node.state(silent_guest.name) == InstanceState.RUNNING


def test_a_power_off_wait_on_a_guest_that_ignores_the_button_can_be_cut_short(qemu_node, silent_guest):
    """The guest never handles the ACPI button; Shutdown's hour-long grace ends when the caller says so."""
    cancel = threading.Event()
    threading.Timer(2.0, cancel.set).start()
    assert qemu_node.shutdown(silent_guest.name, timeout=3600, cancel=cancel) is False, "forced off"
    assert qemu_node.state(silent_guest.name) == InstanceState.SHUTOFF


def test_destroying_the_instance_ends_a_ready_wait_on_it(qemu_node, silent_guest):
    channel = qemu_node.guest_channel(silent_guest.name)
    outcome: list = []

    def wait() -> None:
        try:
            channel.wait_ready(timeout=3600, poll=0.25)
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            outcome.append(exc)
    t = threading.Thread(target=wait, daemon=True)
    t.start()
    qemu_node.destroy(silent_guest.name)
    t.join(60)
    assert not t.is_alive(), "the wait ended with the instance"
    assert isinstance(outcome[0], GuestWaitCancelled) and "destroyed" in str(outcome[0])


FLOODER = '''"""Test-only guestd (tests/vm/test_guest_untrusted_qemu.py): floods the channel, never answers."""
import os
import time

from .port import find_port
from .system import Roots


def main(argv=None):
    device = None
    while device is None:
        device = find_port(Roots(), "org.vmgrid.guestd.0")
        time.sleep(0.1)
    fd = os.open(device, os.O_RDWR)
    forged = b"".join(b'{"v":1,"op":"report","step":"s%d","ok":true,"token":"forged-token-0000"}\\n' % i
                      for i in range(200))
    chunk = forged + b"A" * 1000000 + b"\\n" + b"garbage\\n" * 2000
    while True:
        try:
            os.write(fd, chunk)
        except OSError:
            time.sleep(0.05)
'''


@pytest.fixture(scope="module")
def flooding_disk(guest_image, vm_dir):
    """A raw copy of the guest's root disk whose guestd daemon is the flooder."""
    raw = vm_dir / "flood-root.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest_image.rootfs), str(raw)], check=True)
    (vm_dir / "flood_daemon.py").write_text(FLOODER)
    (vm_dir / "flood.debugfs").write_text("cd /usr/lib/python3/dist-packages/guestd\nrm daemon.py\n"
                                          f"write {vm_dir / 'flood_daemon.py'} daemon.py\n")
    # the image is a partitioned disk (guestd/image/disk.py: boot partition, then the ext4 root as the second
    # MBR entry): debugfs edits the root partition in place, at its offset in the raw disk (e2fsprogs' io
    # option "?offset=", rather than copying the partition out and back: two gigabytes less to write)
    with raw.open("rb") as f:
        mbr = f.read(512)
    entry = mbr[446 + 16:446 + 32]
    start = int.from_bytes(entry[8:12], "little")
    root = f"{raw}?offset={start * 512}"
    subprocess.run(["debugfs", "-w", "-f", str(vm_dir / "flood.debugfs"), root], check=True, capture_output=True)
    seen = subprocess.run(["debugfs", "-R", "cat /usr/lib/python3/dist-packages/guestd/daemon.py", root],
                          capture_output=True, text=True).stdout
    assert "floods the channel" in seen, "the flooder is in the guest's root disk"
    yield raw
    raw.unlink(missing_ok=True)


def test_a_guest_flooding_its_channel_is_read_at_a_bounded_rate_and_the_node_works_on(
        qemu_node, guest_spec_factory, flooding_disk):
    spec, _ = guest_spec_factory("q-flood", memory_mib=128)
    spec = dataclasses.replace(spec, disks=(Disk(flooding_disk, "raw"),))
    qemu_node.define(spec)
    try:
        qemu_node.start(spec.name)
        channel = qemu_node.guest_channel(spec.name)
        t0 = time.monotonic()
        channel.connect()
        deadline = time.monotonic() + 300
        while channel.rejected_total < 1000 and time.monotonic() < deadline:   # the flood is on
            time.sleep(0.2)
        assert channel.rejected_total >= 1000, "the flooder ran and its lines were refused"
        with pytest.raises(GuestUnavailable, match="not ready within 4 s"):
            channel.wait_ready(timeout=4, poll=0.5)
        read = channel.bytes_read
        elapsed = time.monotonic() - t0      # measured after: the bound only grows with it
        assert read <= channel.read_burst + channel.read_rate * elapsed + 2 * 65536
        assert channel.reports == {} and channel.ready_message is None, "forged reports were refused"
        assert len(channel.rejected) <= channel_mod.MAX_REJECTED
        # the node's verbs on the instance still answer, guestd's part failing within its timeout
        qemu_node.pause(spec.name)
        assert qemu_node.resume(spec.name) is False, "no clock confirmation from a flooding guest"
        with pytest.raises(GuestUnavailable):
            qemu_node.sync_guest_time(spec.name, timeout=2)
        qemu_node.destroy(spec.name)
        assert qemu_node.state(spec.name) == InstanceState.SHUTOFF
        assert channel.retired
    finally:
        for verb in (qemu_node.destroy, qemu_node.undefine):
            try:
                verb(spec.name)
            except Exception:  # noqa: BLE001 - already gone
                pass


# -- through a VMManager node process ------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid(grid_pki, guest_image, qemu_prerequisites, vm_dir):
    """Authorization + VMRepository in this process; the no-guestd image registered by the admin."""
    g = start_grid(grid_pki, vm_dir / "ug", nodes=0)
    try:
        rootfs = g.ingest / f"{IMAGE}.qcow2"
        link_or_copy(guest_image.rootfs, rootfs)      # the repository copies from its ingest directory
        text = DESCRIPTOR.format(name=IMAGE, kernel=guest_image.kernel_version, command="/bin/true").replace(
            "<boot><method>kernel</method></boot>",
            f"<boot><method>kernel</method><cmdline>{NO_GUESTD}</cmdline></boot>")
        g.repo(grid_pki.admin).register(parse_descriptor(text.encode()), local_path=str(rootfs))
        rootfs.unlink()
        yield g
    finally:
        g.close()


def powered_on(client: VMManagerClient, ref, timeout: float = 300):
    """Wait until the deploy is in its guest-ready phase (power-on timed, still Starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.status(ref)
        if info.state not in ("Registered", "Staging", "Starting") or "power-on" in dict(info.phases):
            return info
        time.sleep(0.2)
    raise AssertionError(f"instance {ref.key} never powered on")


def in_thread(fn, *args):
    """Run fn(*args) in a thread; return (thread, outcome list) so the test can bound how long it waits."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            out.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_guest_without_guestd_never_wedges_its_node(grid, grid_pki, guest_image, vm_dir):
    root, state = vm_dir / "untrusted-root", vm_dir / "un"
    node = NodeProcess(vm_dir / "untrusted.toml", state, vm_dir / "untrusted.log", free_port())

    def configure(ready_timeout: float) -> None:
        write_toml(node.config, {
            "container": {"host": "127.0.0.1", "port": node.port, "state_dir": str(state), "log_level": "info"},
            "security": {"cert_dir": str(grid_pki.cert_dir), "host_cert": str(grid_pki.host_cert_path),
                         "host_key": str(grid_pki.host_key_path)},
            "enforcement": {"authz_url": grid.authz_url, "permit_ttl": 0.0},
            "vmmanager": {"repository": grid.repository_url, **node_settings(
                guest_image, root=root, lease_range="10.99.0.230-10.99.0.232", name="untrusted1"),
                "guest_ready_timeout": ready_timeout},
        })

    def leases() -> int:
        with sqlite3.connect(f"file:{state / 'vmmanager' / 'node.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM leases").fetchone()[0]

    descriptor = grid.repo(grid_pki.alice).query([f"name = {IMAGE}"]).descriptors[0]
    try:
        # 1. a node that would wait an hour for guestd: Destroy answers meanwhile, and so does the node
        configure(3600.0)
        node.start(grid_pki.cert_dir)
        client = VMManagerClient(GridServiceClient(node.url, grid_pki.alice.proxy, grid_pki.trust()))
        first = client.deploy(descriptor, "no-guestd-1", 1800)
        assert powered_on(client, first.ref).state == "Starting"
        assert qemu_pids(domain_name(first.ref.key)), "the guest runs (without guestd)"
        assert [i.identifier for i in client.list()] == ["no-guestd-1"], "other calls are answered meanwhile"
        t, out = in_thread(client.destroy, first.ref)
        t.join(120)
        assert not t.is_alive() and not isinstance(out[0], Exception), \
            f"Destroy answered while the deploy waited for guestd: {out}\n{node.log_tail()}"
        ended = {i.identifier: i for i in client.list(include_ended=True)}
        assert ended["no-guestd-1"].state == "Destroyed"
        assert not qemu_pids(domain_name(first.ref.key)) and leases() == 0

        # 2. SIGTERM while a deploy waits for guestd: the node stops (it would otherwise wait an hour)
        second = client.deploy(descriptor, "no-guestd-2", 1800)
        powered_on(client, second.ref)
        node.process.send_signal(signal.SIGTERM)
        try:
            code = node.process.wait(120)
        except Exception:  # noqa: BLE001
            code = None
        assert code is not None, f"the node ignored SIGTERM:\n{node.log_tail()}"
        assert "Traceback" not in node.log_tail(), node.log_tail()

        # 3. restarted with a short guest-ready timeout: the interrupted deploy is Failed, and a new
        #    deploy of the guest that never gets ready fails at the timeout, releasing everything
        configure(6.0)
        node.start(grid_pki.cert_dir)
        assert client.status(second.ref).state == "Failed"
        third = client.deploy(descriptor, "no-guestd-3", 1800)
        final = client.wait_for(third.ref, ("Failed", "Running"), timeout=600, interval=1.0)
        assert final.state == "Failed" and "guestd did not report ready" in (final.failure or ""), final.failure
        assert "not ready within 6 s" in final.failure and "never answered on the guest channel" in final.failure
        # the site gets the end of the guest's console, which outlives the instance's directory
        kept = re.search(r"serial console is kept in (\S+) on node", final.failure)
        assert kept or "no file serial port" in final.failure, final.failure
        if kept:
            assert Path(kept.group(1)).parent == state / "vmmanager" / "consoles" and Path(kept.group(1)).exists()
        deadline = time.monotonic() + 30
        while qemu_pids(domain_name(third.ref.key)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not qemu_pids(domain_name(third.ref.key)), "the guest was destroyed"
        assert not (state / "vmmanager" / "instances" / third.ref.key).exists(), "overlay and context removed"
        assert leases() == 0, "the lease was released"
        node.stop()
        assert node.process.returncode is not None
    finally:
        node.stop()
        for pid in qemu_processes(f"{root}/lib/qemu/"):   # left only when the test failed midway
            os.kill(pid, signal.SIGKILL)
