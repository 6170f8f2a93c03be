"""The VMM contract on QEMU (<domain type='qemu'>, software emulation) with vmgrid's real guest."""
from __future__ import annotations

import pytest

from services.vmmanager.vmm import VMMError

from contract import VMMContract


@pytest.fixture
def vmm(qemu_node):
    before = {i.name for i in qemu_node.list_instances()}
    yield qemu_node
    for info in qemu_node.list_instances():       # each case leaves no guest behind
        if info.name not in before:
            try:
                qemu_node.destroy(info.name)
                qemu_node.undefine(info.name)
            except VMMError:
                pass


@pytest.fixture
def make_spec(guest_spec_factory):
    return lambda name: guest_spec_factory(name, memory_mib=128)[0]


@pytest.fixture
def other_node(subprocess_node):
    return subprocess_node


@pytest.fixture
def wait_booted():
    def wait(vmm, name):
        vmm.guest_channel(name).wait_ready(timeout=120)   # guestd watches the power button once ready
    return wait


class TestContractOnQemu(VMMContract):
    pass


def test_shutdown_forces_off_a_guest_that_ignores_the_power_button(qemu_node, guest_spec_factory):
    """With acpi=off the guest has no power button: after the timeout the VMM pulls the plug."""
    import dataclasses
    from services.vmmanager.vmm import InstanceState
    spec, _ = guest_spec_factory("q-deaf", memory_mib=128)
    spec = dataclasses.replace(spec, boot=dataclasses.replace(spec.boot, cmdline=spec.boot.cmdline + " acpi=off"))
    qemu_node.define(spec)
    try:
        qemu_node.start(spec.name)
        qemu_node.guest_channel(spec.name).wait_ready(timeout=120)
        assert qemu_node.shutdown(spec.name, timeout=2) is False
        assert qemu_node.state(spec.name) == InstanceState.SHUTOFF
    finally:
        qemu_node.destroy(spec.name)
        qemu_node.undefine(spec.name)


def test_one_embedded_root_per_process(qemu_node, tmp_path):
    """libvirt embeds one QEMU root per process: a second root is refused, the same root reopens
    and sees the same instances (how a restarted VMManager finds its running guests)."""
    from services.vmmanager.vmm import LibvirtQemuDriver
    with pytest.raises(VMMError, match="one root per process"):
        LibvirtQemuDriver(root=tmp_path / "another-root")
    again = LibvirtQemuDriver(root=qemu_node.root)
    try:
        assert [i.name for i in again.list_instances()] == [i.name for i in qemu_node.list_instances()]
    finally:
        again.close()
