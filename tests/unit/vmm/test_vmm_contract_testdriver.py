"""The VMM contract on libvirt's test driver (in-process, no real guest): every node is private."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.vmmanager.vmm import Disk, GuestChannel, InstanceSpec, LibvirtTestDriver, Nic, Port

from contract import VMMContract


@pytest.fixture
def vmm():
    node = LibvirtTestDriver.private_node()
    yield node
    node.close()


@pytest.fixture
def make_spec(tmp_path):
    def make(name: str) -> InstanceSpec:
        # The test driver runs no guest: the files need not exist, the paths only need to be valid.
        mac = "52:54:00:%02x:%02x:%02x" % tuple(uuid.uuid4().bytes[:3])
        return InstanceSpec(
            name=name, memory_mib=256, vcpus=1,
            disks=(Disk(tmp_path / f"{name}.qcow2"),), cdroms=(tmp_path / f"{name}-ctx.iso",),
            nics=(Nic(mac),), serial_ports=(Port("file", tmp_path / f"{name}.console"),),
            parallel_ports=(Port("null"),),
            channel=GuestChannel(Path("/tmp") / f"{name}-{uuid.uuid4().hex[:8]}.sock", "t" * 22))
    return make


class _PrivateNode:
    def restore(self, save_file, spec) -> dict:
        with LibvirtTestDriver.private_node() as node:
            name = node.restore(save_file, spec)
            result = {"state": node.state(name).value, "disks": [str(d.path) for d in node.spec_of(name).disks],
                      "instances": [i.name for i in node.list_instances()]}
            node.destroy(name)
            node.undefine(name)
            return result


@pytest.fixture
def other_node():
    return _PrivateNode()


@pytest.fixture
def wait_booted():
    return lambda vmm, name: None


class TestContractOnLibvirtTestDriver(VMMContract):
    pass


def test_default_node_is_shared_within_the_process():
    """test:///default is one node per process: a second connection sees the first one's instances."""
    a, b = LibvirtTestDriver(), LibvirtTestDriver()
    try:
        name = f"shared-{uuid.uuid4().hex[:8]}"
        a.define(InstanceSpec(name=name, memory_mib=64, disks=(Disk(Path("/tmp/x.qcow2")),)))
        assert name in {i.name for i in b.list_instances()}
        assert "test" not in {i.name for i in b.list_instances()}   # the driver's own demo domain is not vmgrid's
        b.undefine(name)
    finally:
        a.close()
        b.close()


def test_private_nodes_do_not_see_each_other():
    a, b = LibvirtTestDriver.private_node(), LibvirtTestDriver.private_node()
    with a, b:
        a.define(InstanceSpec(name="mine", memory_mib=64, disks=(Disk(Path("/tmp/x.qcow2")),)))
        assert [i.name for i in b.list_instances()] == []


def test_a_restore_with_another_mac_defines_the_instance_with_it_for_the_next_start(make_spec, tmp_path):
    """A migrated instance runs with the MAC it was saved with (libvirt restores no other), but its definition
    takes the target's leased MAC: a later Start boots with it, and a Save and Restore on the target keeps it."""
    import dataclasses
    with LibvirtTestDriver.private_node() as node:
        spec = make_spec("c-mac")
        node.define(spec)
        node.start("c-mac")
        node.save("c-mac", tmp_path / "a.state")
        leased = dataclasses.replace(spec, nics=(Nic("52:54:00:aa:bb:cc"),))
        node.restore(tmp_path / "a.state", leased)
        assert node.state("c-mac").value == "running"
        assert [n.mac for n in node.spec_of("c-mac").nics] == ["52:54:00:aa:bb:cc"]
        node.save("c-mac", tmp_path / "b.state")          # saved and restored here again, no spec
        node.restore(tmp_path / "b.state")
        assert [n.mac for n in node.spec_of("c-mac").nics] == ["52:54:00:aa:bb:cc"]
        node.destroy("c-mac")
        node.start("c-mac")
        live = node._domain("c-mac").XMLDesc(0)
        assert "52:54:00:aa:bb:cc" in live and spec.nics[0].mac not in live
        node.destroy("c-mac")
        node.undefine("c-mac")
