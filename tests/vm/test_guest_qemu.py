"""A real vmgrid guest under QEMU: guestd boots from the context CD-ROM, sets the address from the
context, reports with the token, fixes the clock after pause, restore and migration. One booted guest
is shared by the module's tests; each test leaves it running."""
from __future__ import annotations

import dataclasses
import shutil
import time

import pytest

from services.vmmanager.vmm import GuestChannelClient, GuestUnavailable, InstanceState

from conftest import console_tail, new_guest_spec

CLOCK_BOUND = 0.5   # seconds: how far the guest clock may be from the host's after a fix
CONTAINER = ["/bin/sh", "-c", "while true; do date +%s > /tmp/container-alive; sleep 1; done"]


@pytest.fixture(scope="module")
def guest(qemu_node, guest_image, vm_dir):
    spec, ctx = new_guest_spec(guest_image, vm_dir, "guest-shared", memory_mib=256, container=CONTAINER,
                               address="10.0.2.21")
    qemu_node.define(spec)
    qemu_node.start(spec.name)
    try:
        status = qemu_node.guest_channel(spec.name).wait_ready(timeout=180)
    except GuestUnavailable:
        pytest.fail(f"guestd never got ready; console:\n{console_tail(spec)}")
    yield {"spec": spec, "ctx": ctx, "boot_status": status}
    qemu_node.destroy(spec.name)
    qemu_node.undefine(spec.name)


def _clock_offset(channel: GuestChannelClient) -> float:
    t1 = time.time()
    guest_time = channel.request("ping")["time"]
    return guest_time - (t1 + time.time()) / 2


def test_guestd_reports_ready_with_the_address_from_the_context(guest):
    status, ctx = guest["boot_status"], guest["ctx"]
    assert status["ready"] and status["instance"] == ctx.instance
    assert status["context_source"] == "cdrom"
    steps = status["steps"]
    assert all(report["ok"] for report in steps.values()), steps
    net = steps["network"]["detail"]
    assert (net["address"], net["netmask"], net["gateway"]) == ("10.0.2.21", "255.255.255.0", "10.0.2.2")
    assert net["interface"] == "eth0"                 # found by the MAC the context names
    assert steps["hostname"]["detail"]["hostname"] == "guest-shared"
    assert status["container"]["running"] and status["container"]["command"] == CONTAINER
    assert steps["power"]["detail"]["buttons"], "guestd watches the ACPI power button"


def test_every_guest_message_carries_the_instance_token(qemu_node, guest):
    name = guest["spec"].name
    channel = qemu_node.guest_channel(name)
    assert channel.rejected == []
    assert {"clock", "hostname", "network", "container"} <= set(channel.reports)
    channel.close()                                   # the socket takes one client: lend it to an impostor
    impostor = GuestChannelClient(name, guest["spec"].channel.path, "not-the-instance-token")
    try:
        with pytest.raises(GuestUnavailable):
            impostor.ping(timeout=3)
        assert any("bad token" in why for why in impostor.rejected)
    finally:
        impostor.close()
    assert qemu_node.guest_channel(name).ping() < 5   # the real client reconnects


def test_resume_after_a_pause_sets_the_guest_clock(qemu_node, guest):
    name = guest["spec"].name
    channel = qemu_node.guest_channel(name)
    channel.set_time(time.time() - 3600)              # a guest clock an hour behind...
    assert _clock_offset(channel) < -3000
    qemu_node.pause(name)
    time.sleep(3)                                     # ...and a pause of a few seconds on top
    assert qemu_node.resume(name) is True
    assert abs(_clock_offset(channel)) < CLOCK_BOUND


def test_save_and_restore_continue_the_same_guest(qemu_node, guest, tmp_path):
    name = guest["spec"].name
    before = qemu_node.guest_channel(name).status()
    qemu_node.save(name, tmp_path / "guest.state")
    assert qemu_node.state(name) == InstanceState.SAVED
    time.sleep(2)                                     # the guest clock stands still while saved
    qemu_node.restore(tmp_path / "guest.state")
    channel = qemu_node.guest_channel(name)
    after = channel.status()
    assert after["container"]["pid"] == before["container"]["pid"]    # the same processes, not a reboot
    assert after["uptime"] > before["uptime"]
    assert abs(_clock_offset(channel)) < CLOCK_BOUND


def test_migration_to_another_node_and_back(qemu_node, guest, subprocess_node, vm_dir, tmp_path):
    """save on the source, copy the state and the overlay, restore on a second QEMU root (another process),
    guestd answers there with the clock fixed; then the same way back."""
    spec = guest["spec"]
    before = qemu_node.guest_channel(spec.name).status()
    qemu_node.save(spec.name, tmp_path / "out.state")
    target = vm_dir / f"mig-{time.monotonic_ns() % 10**6}"
    target.mkdir()
    overlay = target / "disk.qcow2"
    shutil.copy2(spec.disks[0].path, overlay)
    target_spec = dataclasses.replace(
        spec, disks=(dataclasses.replace(spec.disks[0], path=overlay),),
        serial_ports=(dataclasses.replace(spec.serial_ports[0], path=target / "console.log"),),
        channel=dataclasses.replace(spec.channel, path=target / "guestd.sock"))
    seen = subprocess_node.restore(tmp_path / "out.state", target_spec, guest_timeout=20,
                                   save_to=tmp_path / "back.state")
    assert seen["state"] == "running" and seen["disks"] == [str(overlay)]
    remote = seen["guest"]
    assert remote["rejected"] == [] and remote["status"]["instance"] == spec.name
    assert remote["status"]["container"]["pid"] == before["container"]["pid"]
    assert abs(remote["clock_offset"]) < CLOCK_BOUND
    shutil.copy2(overlay, spec.disks[0].path)          # the disk comes home with the state
    qemu_node.restore(tmp_path / "back.state", spec)
    channel = qemu_node.guest_channel(spec.name)
    assert channel.status()["container"]["pid"] == before["container"]["pid"]
    assert abs(_clock_offset(channel)) < CLOCK_BOUND
