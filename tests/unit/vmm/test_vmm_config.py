"""Domain XML from an InstanceSpec (config.py) and the spec's validation: what libvirt is told."""
from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from services.vmmanager.vmm import Disk, GuestChannel, InstanceSpec, InvalidSpec, KernelBoot, Nic, Port
from services.vmmanager.vmm.config import domain_xml, instance_name, relocate, spec_from_xml

P = Path("/srv/vmgrid/instances/i1")


def spec(**kw) -> InstanceSpec:
    base = dict(
        name="i1", memory_mib=512, vcpus=2, uuid="0f0e0d0c-0b0a-4908-8706-050403020100",
        disks=(Disk(P / "disk.qcow2"), Disk(P / "scratch.raw", format="raw", bus="ide", role="scratch")),
        cdroms=(P / "context.iso",), nics=(Nic("52:54:00:00:00:01"), Nic("52:54:00:00:00:02", kind="bridge", source="br0")),
        serial_ports=(Port("file", P / "console.log"), Port("pty")), parallel_ports=(Port("null"),),
        boot=KernelBoot(Path("/srv/k/vmlinuz"), Path("/srv/k/initrd.img"), "console=ttyS0 root=/dev/vda"),
        channel=GuestChannel(P / "guestd.sock", "token-abcdefghijklmnop"))
    base.update(kw)
    return InstanceSpec(**base)


def test_domain_xml_carries_every_device_of_the_spec():
    dom = ET.fromstring(domain_xml(spec(), "qemu"))
    assert dom.get("type") == "qemu" and dom.findtext("name") == "vmgrid-i1"
    assert dom.find("memory").text == "512" and dom.find("memory").get("unit") == "MiB"
    assert dom.findtext("vcpu") == "2" and dom.find("os/type").get("machine") == "pc"
    assert dom.findtext("os/kernel") == "/srv/k/vmlinuz" and dom.findtext("os/cmdline").startswith("console=ttyS0")
    assert dom.find("features/acpi") is not None          # the ACPI power button needs it
    disks = dom.findall("devices/disk")
    assert [(d.get("device"), d.find("target").get("dev"), d.find("target").get("bus")) for d in disks] == [
        ("disk", "vda", "virtio"), ("disk", "hda", "ide"), ("cdrom", "hdb", "ide")]
    assert disks[2].find("readonly") is not None and disks[0].find("driver").get("type") == "qcow2"
    nics = dom.findall("devices/interface")
    assert [n.get("type") for n in nics] == ["user", "bridge"] and nics[1].find("source").get("bridge") == "br0"
    ch = dom.find("devices/channel")
    assert ch.get("type") == "unix" and ch.find("source").get("mode") == "bind"
    assert ch.find("target").get("name") == "org.vmgrid.guestd.0"
    assert [s.get("type") for s in dom.findall("devices/serial")] == ["file", "pty"]
    assert dom.find("devices/parallel").get("type") == "null"


def test_disk_boot_and_the_test_domain_type():
    s = spec(boot=None, channel=None)
    dom = ET.fromstring(domain_xml(s, "test"))
    assert dom.get("type") == "test" and dom.find("os/boot").get("dev") == "hd"
    assert dom.find("os/kernel") is None and dom.find("devices/channel") is None
    assert dom.find("os/type").get("machine") is None


def test_the_spec_round_trips_through_the_xml():
    s = spec()
    assert spec_from_xml(domain_xml(s, "qemu")) == s


def test_only_vmgrid_domains_have_instance_names():
    assert instance_name("vmgrid-i1") == "i1" and instance_name("test") is None


def test_relocate_points_the_saved_domain_at_this_nodes_files():
    s = spec()
    here = Path("/var/lib/vmgrid/node2/i1")
    moved = dataclasses.replace(
        s, disks=tuple(dataclasses.replace(d, path=here / d.path.name) for d in s.disks),
        cdroms=(here / "context.iso",), serial_ports=(Port("file", here / "console.log"), Port("pty")),
        boot=KernelBoot(here / "vmlinuz", here / "initrd.img", s.boot.cmdline),
        channel=dataclasses.replace(s.channel, path=here / "guestd.sock", token="T" * 22))
    out = spec_from_xml(relocate(domain_xml(s, "qemu"), moved))
    assert out == moved     # files and channel token are this node's
    # the MACs stay the saved ones (libvirt checks them against the saved guest's)
    other_macs = dataclasses.replace(moved, nics=tuple(dataclasses.replace(n, mac=f"52:54:00:00:99:{i:02x}")
                                                      for i, n in enumerate(s.nics)))
    assert spec_from_xml(relocate(domain_xml(s, "qemu"), other_macs)).nics == s.nics


@pytest.mark.parametrize("change", [
    lambda s: dataclasses.replace(s, cdroms=()),
    lambda s: dataclasses.replace(s, disks=s.disks[:1]),
    lambda s: dataclasses.replace(s, serial_ports=s.serial_ports[:1]),
    lambda s: dataclasses.replace(s, channel=None),
    lambda s: dataclasses.replace(s, name="i2"),
    lambda s: dataclasses.replace(s, uuid="11111111-2222-4333-8444-555555555555"),
])
def test_relocate_refuses_a_spec_of_other_devices(change):
    s = spec()
    with pytest.raises(InvalidSpec):
        relocate(domain_xml(s, "qemu"), change(s))


@pytest.mark.parametrize("change, words", [
    (dict(name="bad name"), "name"),
    (dict(name="-x"), "name"),
    (dict(uuid="nope"), "uuid"),
    (dict(memory_mib=8), "memory"),
    (dict(vcpus=0), "vcpus"),
    (dict(arch="sparc"), "arch"),
    (dict(boot=None, disks=()), "disk"),
    (dict(disks=(Disk(Path("relative.qcow2")),)), "absolute"),
    (dict(disks=(Disk(P / "d", format="vmdk"),)), "format"),
    (dict(disks=(Disk(P / "d", bus="usb"),)), "bus"),
    (dict(disks=(Disk(P / "d", role="boot"),)), "role"),
    (dict(disks=(Disk(P / "a"), Disk(P / "b"))), "root role"),
    (dict(disks=(Disk(P / "it's"),)), "quotes"),
    (dict(cdroms=tuple(P / f"c{i}.iso" for i in range(4))), "IDE"),
    (dict(nics=(Nic("52:54:00:00:00:0G"),)), "MAC"),
    (dict(nics=(Nic("01:00:5e:00:00:01"),)), "multicast"),
    (dict(nics=(Nic("52:54:00:00:00:01"), Nic("52:54:00:00:00:01"))), "share"),
    (dict(nics=(Nic("52:54:00:00:00:01", kind="bridge"),)), "source"),
    (dict(serial_ports=(Port("file"),)), "path"),
    (dict(serial_ports=(Port("tcp"),)), "kind"),
    (dict(boot=KernelBoot(Path("/k"), None, "a\nb")), "command line"),
    (dict(channel=GuestChannel(Path("/tmp/" + "x" * 120), "t" * 20)), "longer"),
    (dict(channel=GuestChannel(Path("/tmp/s"), "")), "token"),
])
def test_a_bad_spec_is_refused_with_the_field_named(change, words):
    with pytest.raises(InvalidSpec, match=words):
        spec(**change).validate()


def test_bridge_and_network_nics_get_a_tap_named_after_the_instance():
    """Each node process embeds its own libvirt; left to libvirt, two nodes on one host pick the same first
    free vnetN at the same moment and one deploy fails. The tap is named after the instance (unique), fits
    IFNAMSIZ, keeps its name through a save/restore, and a warm clone gets its own, not its template's."""
    from services.vmmanager.vmm.config import clone_xml, tap_name
    s = spec(nics=(Nic("52:54:00:00:00:01"), Nic("52:54:00:00:00:02", kind="bridge", source="br0"),
                   Nic("52:54:00:00:00:03", kind="network", source="default")))
    xml = domain_xml(s, "qemu")
    taps = [(n.find("target").get("dev") if n.find("target") is not None else None)
            for n in ET.fromstring(xml).findall("devices/interface")]
    assert taps[0] is None and taps[1] == tap_name(s.uuid, 1) and taps[2] == tap_name(s.uuid, 2)
    assert all(len(t) <= 15 and not t.startswith("vnet") for t in taps[1:]) and taps[1] != taps[2]
    assert tap_name(s.uuid, 1) != tap_name("1f0e0d0c-0b0a-4908-8706-050403020100", 1)
    saved = xml.replace(f"dev=\"{taps[1]}\"", "dev=\"vnet7\"")                 # what libvirt may record
    again = [n.find("target") for n in ET.fromstring(relocate(saved, s)).findall("devices/interface")]
    assert again[0] is None and again[1].get("dev") == taps[1]
    clone = dataclasses.replace(s, name="i2", uuid="1f0e0d0c-0b0a-4908-8706-050403020100")
    cloned = [n.find("target") for n in ET.fromstring(clone_xml(xml, clone)).findall("devices/interface")]
    assert cloned[1].get("dev") == tap_name(clone.uuid, 1) != taps[1]
