"""Domain XML for libvirt, built (and read back) in this one module.

``domain_xml`` turns an InstanceSpec into a <domain>; ``spec_from_xml`` reads one back; ``relocate``
points a saved domain's devices at this node's files for restore. vmgrid's own facts (instance name,
token, disk roles) ride in <metadata> so they survive save, restore and migration.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .errors import InvalidSpec
from .spec import Disk, GuestChannel, InstanceSpec, KernelBoot, Nic, Port

DOMAIN_PREFIX = "vmgrid-"
METADATA_NS = "urn:vmgrid:instance:1"
ET.register_namespace("vmgrid", METADATA_NS)
_M = "{%s}" % METADATA_NS


def domain_name(instance: str) -> str:
    return DOMAIN_PREFIX + instance


def instance_name(domain: str) -> str | None:
    """The instance name of a vmgrid domain, None for domains vmgrid does not own."""
    return domain[len(DOMAIN_PREFIX):] if domain.startswith(DOMAIN_PREFIX) else None


def _targets(spec: InstanceSpec) -> tuple[list[str], list[str]]:
    """Target device names: virtio vdX, scsi/sata sdX, ide hdX shared by IDE disks and CD-ROMs."""
    counters = {"vd": 0, "sd": 0, "hd": 0}
    prefix = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}

    def take(p: str) -> str:
        name = p + "abcdefghijklmnopqrstuvwxyz"[counters[p]]
        counters[p] += 1
        return name

    disks = [take(prefix[d.bus]) for d in spec.disks]
    cdroms = [take("hd") for _ in spec.cdroms]
    return disks, cdroms


def tap_name(uuid: str, index: int) -> str:
    """The host tap device of an instance's NIC ``index`` (bridge and network NICs): named after the instance,
    not left to libvirt. Each node process has its own embedded libvirt, and each would pick the first free
    ``vnetN`` by itself: two nodes on one host creating a tap at the same moment chose the same name and one
    deploy failed ("Unable to create tap device vnet0: Device or resource busy"). 15 characters at most
    (IFNAMSIZ); an instance's UUID is unique, and it keeps its name when saved, restored or migrated."""
    return f"vg{uuid.replace('-', '')[:11]}{index % 10}"


def _set_taps(dom: ET.Element, spec: InstanceSpec) -> None:
    for i, e in enumerate(dom.findall("devices/interface")):
        for target in e.findall("target"):
            e.remove(target)
        if e.get("type") in ("bridge", "network"):
            ET.SubElement(e, "target", dev=tap_name(spec.uuid, i))


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    e = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrib.items()})
    if text is not None:
        e.text = text
    return e


def _port(devices: ET.Element, tag: str, port: Port) -> None:
    e = _sub(devices, tag, type=port.kind)
    if port.path is not None:
        _sub(e, "source", path=str(port.path))


def domain_xml(spec: InstanceSpec, domain_type: str) -> str:
    """The <domain> for ``spec`` on a hypervisor of ``domain_type`` ('qemu', 'kvm' or 'test')."""
    spec.validate()
    disk_targets, cdrom_targets = _targets(spec)
    dom = ET.Element("domain", type=domain_type)
    _sub(dom, "name", domain_name(spec.name))
    _sub(dom, "uuid", spec.uuid)
    meta = _sub(_sub(dom, "metadata"), _M + "instance")
    _sub(meta, _M + "name", spec.name)
    if spec.channel is not None:
        _sub(meta, _M + "token", spec.channel.token)
    for d, target in zip(spec.disks, disk_targets):
        _sub(meta, _M + "disk", target=target, role=d.role)
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch=spec.arch, **({"machine": "pc"} if domain_type != "test" else {}))
    if spec.boot is not None:
        _sub(os_, "kernel", str(spec.boot.kernel))
        if spec.boot.initrd is not None:
            _sub(os_, "initrd", str(spec.boot.initrd))
        _sub(os_, "cmdline", spec.boot.cmdline)
    else:
        _sub(os_, "boot", dev="hd")
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    for d, target in zip(spec.disks, disk_targets):
        e = _sub(devices, "disk", type="file", device="disk")
        _sub(e, "driver", name="qemu", type=d.format)
        _sub(e, "source", file=str(d.path))
        _sub(e, "target", dev=target, bus=d.bus)
    for path, target in zip(spec.cdroms, cdrom_targets):
        e = _sub(devices, "disk", type="file", device="cdrom")
        _sub(e, "driver", name="qemu", type="raw")
        _sub(e, "source", file=str(path))
        _sub(e, "target", dev=target, bus="ide")
        _sub(e, "readonly")
    for index, nic in enumerate(spec.nics):
        e = _sub(devices, "interface", type=nic.kind)
        _sub(e, "mac", address=nic.mac)
        if nic.kind == "network":
            _sub(e, "source", network=nic.source or "")
        elif nic.kind == "bridge":
            _sub(e, "source", bridge=nic.source or "")
        _sub(e, "model", type=nic.model)
        if nic.kind in ("network", "bridge"):
            _sub(e, "target", dev=tap_name(spec.uuid, index))
    for port in spec.serial_ports:
        _port(devices, "serial", port)
    for port in spec.parallel_ports:
        _port(devices, "parallel", port)
    if spec.channel is not None:
        e = _sub(devices, "channel", type="unix")
        _sub(e, "source", mode="bind", path=str(spec.channel.path))
        _sub(e, "target", type="virtio", name=spec.channel.name)
    if domain_type != "test":
        _sub(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def spec_from_xml(xml: str) -> InstanceSpec:
    """Read an InstanceSpec back from a vmgrid domain's XML (as libvirt returns it)."""
    dom = ET.fromstring(xml)
    meta = dom.find(f"metadata/{_M}instance")
    if meta is None:
        raise InvalidSpec("the domain was not defined by vmgrid (no vmgrid metadata)")
    name = meta.findtext(_M + "name") or ""
    token = meta.findtext(_M + "token")
    roles = {e.get("target"): e.get("role", "data") for e in meta.findall(_M + "disk")}
    memory_kib = int(dom.findtext("memory") or 0)
    unit = dom.find("memory").get("unit", "KiB") if dom.find("memory") is not None else "KiB"
    memory_mib = memory_kib // 1024 if unit == "KiB" else memory_kib
    disks, cdroms = [], []
    for e in dom.findall("devices/disk"):
        src = e.find("source")
        path = Path(src.get("file")) if src is not None and src.get("file") else None
        if e.get("device") == "cdrom":
            if path is not None:
                cdroms.append(path)
            continue
        target = e.find("target")
        driver = e.find("driver")
        disks.append(Disk(path=path, format=driver.get("type", "raw") if driver is not None else "raw",
                          bus=target.get("bus"), role=roles.get(target.get("dev"), "data")))
    nics = []
    for e in dom.findall("devices/interface"):
        src = e.find("source")
        source = None if src is None else (src.get("network") or src.get("bridge"))
        model = e.find("model")
        nics.append(Nic(mac=e.find("mac").get("address"), kind=e.get("type"), source=source,
                        model=model.get("type") if model is not None else "virtio"))

    def ports(tag: str) -> tuple[Port, ...]:
        out = []
        for e in dom.findall(f"devices/{tag}"):
            src = e.find("source")
            kind = e.get("type")
            out.append(Port(kind=kind, path=Path(src.get("path")) if kind == "file" and src is not None else None))
        return tuple(out)

    boot = None
    kernel = dom.findtext("os/kernel")
    if kernel:
        initrd = dom.findtext("os/initrd")
        boot = KernelBoot(Path(kernel), Path(initrd) if initrd else None, dom.findtext("os/cmdline") or "")
    channel = None
    ch = dom.find("devices/channel[@type='unix']")
    if ch is not None and token:
        channel = GuestChannel(path=Path(ch.find("source").get("path")), token=token,
                               name=ch.find("target").get("name"))
    ostype = dom.find("os/type")
    return InstanceSpec(
        name=name, uuid=dom.findtext("uuid"), memory_mib=memory_mib, vcpus=int(dom.findtext("vcpu") or 1),
        arch=ostype.get("arch", "x86_64") if ostype is not None else "x86_64",
        disks=tuple(disks), cdroms=tuple(cdroms), serial_ports=ports("serial"),
        parallel_ports=ports("parallel"), nics=tuple(nics), boot=boot, channel=channel,
    )


def relocate(saved_xml: str, spec: InstanceSpec) -> str:
    """The saved domain's XML with every file location replaced by those of ``spec`` (this node's), and its
    channel token (a migrated instance's token here).

    The devices must match one for one (same disks, CD-ROMs, ports, channel); InvalidSpec otherwise.
    """
    spec.validate()
    dom = ET.fromstring(saved_xml)
    saved = spec_from_xml(saved_xml)
    if saved.name != spec.name or saved.uuid != spec.uuid:
        raise InvalidSpec(f"the save file holds instance {saved.name} ({saved.uuid}), not {spec.name} ({spec.uuid})")
    disks = [e for e in dom.findall("devices/disk") if e.get("device") != "cdrom"]
    cdroms = [e for e in dom.findall("devices/disk") if e.get("device") == "cdrom"]
    pairs = [("disks", disks, [d.path for d in spec.disks], "file"),
             ("CD-ROMs", cdroms, list(spec.cdroms), "file")]
    for what, elems, paths, attr in pairs:
        if len(elems) != len(paths):
            raise InvalidSpec(f"the saved instance has {len(elems)} {what}, the spec {len(paths)}")
        for e, path in zip(elems, paths):
            e.find("source").set(attr, str(path))
    for tag, ports in (("serial", spec.serial_ports), ("parallel", spec.parallel_ports)):
        elems = dom.findall(f"devices/{tag}")
        if len(elems) != len(ports):
            raise InvalidSpec(f"the saved instance has {len(elems)} {tag} ports, the spec {len(ports)}")
        for e, port in zip(elems, ports):
            if e.get("type") != port.kind:
                raise InvalidSpec(f"{tag} port kind {port.kind} differs from the saved {e.get('type')}")
            src = e.find("source")
            if port.path is not None and src is not None:
                src.set("path", str(port.path))
    if spec.boot is not None:
        for tag, value in (("kernel", spec.boot.kernel), ("initrd", spec.boot.initrd)):
            e = dom.find(f"os/{tag}")
            if (e is None) != (value is None):
                raise InvalidSpec(f"the spec's {tag} does not match the saved instance's")
            if e is not None:
                e.text = str(value)
    ch = dom.find("devices/channel[@type='unix']")
    if (ch is None) != (spec.channel is None):
        raise InvalidSpec("the spec's guest channel does not match the saved instance's")
    if ch is not None:
        ch.find("source").set("path", str(spec.channel.path))
        token = dom.find(f"metadata/{_M}instance/{_M}token")
        if token is not None:          # a migrated instance's channel speaks with this node's token
            token.text = spec.channel.token
    _set_taps(dom, spec)
    # the NICs keep their saved MACs: libvirt refuses a restore whose MAC differs (guest ABI); after a migration
    # guestd moves the guest's NIC to the target's leased MAC itself (guestd/migrated.py)
    return ET.tostring(dom, encoding="unicode")


def with_macs(xml: str, macs: list[str]) -> str:
    """The domain XML with its NICs' MACs replaced, in order (InvalidSpec if the counts differ)."""
    dom = ET.fromstring(xml)
    nics = dom.findall("devices/interface")
    if len(nics) != len(macs):
        raise InvalidSpec(f"the domain has {len(nics)} NICs, {len(macs)} MACs were given")
    for e, mac in zip(nics, macs):
        e.find("mac").set("address", mac)
        target = e.find("target")      # the running domain's tap: not part of a definition
        if target is not None:
            e.remove(target)
    return ET.tostring(dom, encoding="unicode")


def clone_xml(saved_xml: str, spec: InstanceSpec) -> str:
    """A warm-snapshot template's saved XML made into instance ``spec``'s: its name, UUID, token, MACs
    and every file location; the devices (and so the saved machine state) stay the template's.

    The devices must match one for one, as for ``relocate``; InvalidSpec otherwise.
    """
    dom = ET.fromstring(saved_xml)
    dom.find("name").text = domain_name(spec.name)
    dom.find("uuid").text = spec.uuid
    meta = dom.find(f"metadata/{_M}instance")
    if meta is None:
        raise InvalidSpec("the saved domain was not defined by vmgrid (no vmgrid metadata)")
    meta.find(_M + "name").text = spec.name
    token = meta.find(_M + "token")
    if (token is None) != (spec.channel is None):
        raise InvalidSpec("the spec's guest channel does not match the saved instance's")
    if token is not None:
        token.text = spec.channel.token
    nics = dom.findall("devices/interface")
    if len(nics) != len(spec.nics):
        raise InvalidSpec(f"the saved instance has {len(nics)} NICs, the spec {len(spec.nics)}")
    for e, nic in zip(nics, spec.nics):
        if e.get("type") != nic.kind or (e.find("model") is not None and e.find("model").get("type") != nic.model):
            raise InvalidSpec(f"NIC {nic.kind}/{nic.model} differs from the saved {e.get('type')}")
        e.find("mac").set("address", nic.mac)
    return relocate(ET.tostring(dom, encoding="unicode"), spec)
