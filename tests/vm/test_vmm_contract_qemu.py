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
