"""Warm-snapshot clones at the VMM layer: libvirt's save-file header read and re-headed
(vmm/saveimage.py), the template's saved XML made into a clone's (vmm/config.clone_xml), and the
descriptor switch and fingerprint of services/vmmanager/warm.py. The QEMU tier restores real clones
(tests/vm/test_warm_qemu.py); here the file format and the XML, without a guest."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from lxml import etree

from services.descriptor import Descriptor
from services.vmmanager import warm
from services.vmmanager.vmm import Disk, GuestChannel, InstanceSpec, InvalidSpec, KernelBoot, Nic, Port
from services.vmmanager.vmm import saveimage
from services.vmmanager.vmm.config import clone_xml, domain_xml, spec_from_xml, tap_name

STREAM = b"QEVM" + bytes(range(256)) * 64


def spec(name: str, mac: str, d: Path, token: str) -> InstanceSpec:
    return InstanceSpec(name=name, memory_mib=256, disks=(Disk(d / "root.qcow2"),), cdroms=(d / "context.iso",),
                        nics=(Nic(mac, "bridge", "vgw-br0"),), serial_ports=(Port("file", d / "console.log"),),
                        boot=KernelBoot(Path("/k/vmlinuz"), Path("/k/initrd"), "console=ttyS0"),
                        channel=GuestChannel(d / "g.sock", token))


def save_file(path: Path, xml: str, cookie: bytes = b"<cookie/>", pad: int = 100) -> Path:
    body = xml.encode() + b"\0"
    cookie_off = len(body)
    body += cookie + b"\0" + bytes(pad)
    path.write_bytes(saveimage.HEADER.pack(saveimage.MAGIC, 2, len(body), 1, 0, cookie_off, *[0] * 14) + body + STREAM)
    return path


def test_a_clone_save_file_has_the_new_xml_the_cookie_and_the_same_stream(tmp_path):
    template = save_file(tmp_path / "t.save", "<domain>template</domain>")
    image = saveimage.read(template)
    assert (image.xml, image.cookie, image.was_running) == ("<domain>template</domain>", b"<cookie/>", 1)
    clone = saveimage.write_clone(template, image, "<domain>the clone, a longer XML</domain>", tmp_path / "c.save")
    again = saveimage.read(clone)
    assert again.xml == "<domain>the clone, a longer XML</domain>" and again.cookie == b"<cookie/>"
    assert again.stream_offset % 4096 == 0
    assert clone.read_bytes()[again.stream_offset:] == STREAM


def test_a_spare_taken_by_a_clone_reads_like_a_copied_clone_and_is_gone(tmp_path):
    template = save_file(tmp_path / "t.save", "<domain>template</domain>")
    image = saveimage.read(template)
    spare = saveimage.write_spare(template, image, tmp_path / "s1.save")
    assert not list(tmp_path.glob("*.part")), "a spare is renamed into place only when whole"
    xml = "<domain>the clone, a longer XML</domain>"
    assert saveimage.take_spare(spare, template, image, xml, tmp_path / "c.save")
    assert not spare.exists(), "a spare serves one clone"
    again = saveimage.read(tmp_path / "c.save")
    assert (again.xml, again.cookie, again.stream_offset) == (xml, b"<cookie/>", saveimage.RESERVED)
    assert (tmp_path / "c.save").read_bytes()[again.stream_offset:] == STREAM
    # taken already (another clone won the rename): the caller copies instead, nothing is left at dest
    assert not saveimage.take_spare(spare, template, image, xml, tmp_path / "d.save")
    assert not (tmp_path / "d.save").exists()


def test_a_spare_of_another_size_or_an_xml_too_long_for_it_is_not_used(tmp_path):
    template = save_file(tmp_path / "t.save", "<domain>template</domain>")
    image = saveimage.read(template)
    short = tmp_path / "short.save"
    short.write_bytes(bytes(saveimage.RESERVED) + STREAM[:-1])
    assert not saveimage.take_spare(short, template, image, "<domain/>", tmp_path / "c.save")
    assert not (tmp_path / "c.save").exists()
    spare = saveimage.write_spare(template, image, tmp_path / "s.save")
    huge = "<domain>" + "x" * saveimage.RESERVED + "</domain>"
    assert not saveimage.take_spare(spare, template, image, huge, tmp_path / "c.save")
    assert not (tmp_path / "c.save").exists()


@pytest.mark.parametrize("damage, why", [
    (lambda b: b"LibvirtQemudPart" + b[16:], "not a complete"),
    (lambda b: b[:50], "too short"),
    (lambda b: b[:16] + struct.pack("=I", 2) + struct.pack("=I", 1 << 30) + b[24:], "version 2"),
    (lambda b: b[:28] + struct.pack("=I", 1) + b[32:], "uncompressed"),
    (lambda b: b[:200], "truncated"),
])
def test_damaged_save_files_are_refused(tmp_path, damage, why):
    good = save_file(tmp_path / "t.save", "<domain>" + "x" * 400 + "</domain>").read_bytes()
    (tmp_path / "bad.save").write_bytes(damage(good))
    with pytest.raises(InvalidSpec, match=why):
        saveimage.read(tmp_path / "bad.save")


def test_clone_xml_gives_the_clone_its_name_uuid_mac_token_and_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    template = spec("warm-x", "02:00:00:00:00:01", a, "T" * 22)
    clone = spec("inst-7", "52:54:00:00:00:07", b, "C" * 22)
    saved = domain_xml(template, "qemu").replace("<interface type=\"bridge\">",
                                                  "<interface type=\"bridge\"><target dev=\"vnet3\"/>")
    got = spec_from_xml(clone_xml(saved, clone))
    assert (got.name, got.uuid, got.channel.token, got.channel.path) == (clone.name, clone.uuid, "C" * 22, b / "g.sock")
    assert [n.mac for n in got.nics] == ["52:54:00:00:00:07"] and got.nics[0].source == "vgw-br0"
    assert [d.path for d in got.disks] == [b / "root.qcow2"] and got.cdroms == (b / "context.iso",)
    assert got.serial_ports[0].path == b / "console.log"
    assert "vnet3" not in clone_xml(saved, clone), "the template's tap is not reused"
    nic = etree.fromstring(clone_xml(saved, clone).encode()).find("devices/interface")
    assert [t.get("dev") for t in nic.findall("target")] == [tap_name(clone.uuid, 0)], "one tap, the clone's own"


def test_clone_xml_refuses_other_devices(tmp_path):
    template = spec("warm-x", "02:00:00:00:00:01", tmp_path, "T" * 22)
    two_nics = InstanceSpec(**{**template.__dict__, "name": "inst-1", "uuid": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
                               "nics": (Nic("52:54:00:00:00:01"), Nic("52:54:00:00:00:02"))})
    with pytest.raises(InvalidSpec, match="NICs"):
        clone_xml(domain_xml(template, "qemu"), two_nics)


WS = "http://vmgrid.org/ns/workspace/1"


def descriptor(boot_attr: str = "") -> Descriptor:
    return Descriptor(etree.fromstring(
        f'<workspace xmlns="{WS}"><software><boot{boot_attr}><method>kernel</method></boot></software></workspace>'))


@pytest.mark.parametrize("attr, allowed", [("", False), (' warmStart="false"', False), (' warmStart="true"', True),
                                           (' warmStart="1"', True), (' warmStart="0"', False)])
def test_only_a_descriptor_that_says_so_is_cloned(attr, allowed):
    assert warm.allowed(descriptor(attr)) is allowed


class _Now:
    """An executor that runs the job at once (the node's is a thread pool)."""

    def submit(self, fn):
        fn()


def test_a_snapshot_is_refilled_with_whole_spares_and_a_taken_one_is_replaced(tmp_path):
    from types import SimpleNamespace
    snap = warm.Snapshot(tmp_path / "img-fp", {})
    snap.directory.mkdir()
    save_file(snap.memory, "<domain>template</domain>")
    snapshots = warm.WarmSnapshots(tmp_path, SimpleNamespace(config=SimpleNamespace(warm_spares=2)))
    snapshots.refill(snap, _Now())
    spares = sorted(snap.spares.glob("*.save"))
    assert len(spares) == 2 and not list(snap.spares.glob("*.part"))
    image = saveimage.read(snap.memory)
    assert saveimage.take_spare(snap.spare(), snap.memory, image, "<domain>c</domain>", tmp_path / "c.save")
    assert len(list(snap.spares.glob("*.save"))) == 1
    snapshots.refill(snap, _Now())
    assert len(list(snap.spares.glob("*.save"))) == 2
    snapshots.refill(snap, _Now())      # full: nothing more
    assert len(list(snap.spares.glob("*.save"))) == 2
