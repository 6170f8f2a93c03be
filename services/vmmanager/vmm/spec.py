"""The instance specification the VMM defines a domain from: dataclasses, validated before any XML is built."""
from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from guestd.context import DEFAULT_CHANNEL

from .errors import InvalidSpec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
CHANNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
DISK_FORMATS = ("qcow2", "raw")
DISK_BUSES = ("virtio", "ide", "scsi", "sata")
DISK_ROLES = ("root", "data", "swap", "scratch")
PORT_KINDS = ("file", "pty", "null")
NIC_KINDS = ("user", "network", "bridge")
ARCHES = ("x86_64", "i686")
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the terminating NUL


@dataclass(frozen=True)
class Disk:
    """A writable disk: an image file (usually the instance's qcow2 overlay)."""

    path: Path
    format: str = "qcow2"
    bus: str = "virtio"
    role: str = "root"


@dataclass(frozen=True)
class Port:
    """A serial or parallel port: written to a file, a pseudo-terminal, or nowhere."""

    kind: str = "file"
    path: Path | None = None


@dataclass(frozen=True)
class Nic:
    """A virtual NIC with the MAC the node leased; ``kind`` user = QEMU's user-mode network."""

    mac: str
    kind: str = "user"
    source: str | None = None   # the libvirt network or host bridge for kind network / bridge
    model: str = "virtio"


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot: a kernel, an optional initrd and the kernel command line."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class GuestChannel:
    """The virtio-serial port guestd talks on, exposed on the host as a Unix socket at ``path``.

    ``token`` is the per-instance secret from the context; guestd's messages must carry it.
    """

    path: Path
    token: str
    name: str = DEFAULT_CHANNEL


@dataclass(frozen=True)
class InstanceSpec:
    """One instance as the VMM defines it. ``boot`` None boots from the first disk."""

    name: str
    memory_mib: int
    vcpus: int = 1
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    arch: str = "x86_64"
    disks: tuple[Disk, ...] = ()
    cdroms: tuple[Path, ...] = ()
    serial_ports: tuple[Port, ...] = ()
    parallel_ports: tuple[Port, ...] = ()
    nics: tuple[Nic, ...] = ()
    boot: KernelBoot | None = None
    channel: GuestChannel | None = None

    def validate(self) -> "InstanceSpec":
        """Raise InvalidSpec naming the first bad field; return self when all is well."""
        def bad(message: str) -> None:
            raise InvalidSpec(f"instance {self.name!r}: {message}")

        if not isinstance(self.name, str) or not NAME.match(self.name):
            bad("name must be 1-64 characters of [A-Za-z0-9_.-], starting alphanumeric")
        try:
            uuidlib.UUID(str(self.uuid))
        except ValueError:
            bad(f"uuid {self.uuid!r} is not a UUID")
        if not isinstance(self.memory_mib, int) or not 16 <= self.memory_mib <= 1024 * 1024:
            bad("memory_mib must be an integer between 16 and 1048576")
        if not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= 64:
            bad("vcpus must be an integer between 1 and 64")
        if self.arch not in ARCHES:
            bad(f"arch must be one of {ARCHES}")
        if self.boot is None and not self.disks:
            bad("booting from disk needs at least one disk")
        for d in self.disks:
            if d.format not in DISK_FORMATS:
                bad(f"disk {d.path}: format must be one of {DISK_FORMATS}")
            if d.bus not in DISK_BUSES:
                bad(f"disk {d.path}: bus must be one of {DISK_BUSES}")
            if d.role not in DISK_ROLES:
                bad(f"disk {d.path}: role must be one of {DISK_ROLES}")
            _check_path(d.path, bad)
        if sum(d.role == "root" for d in self.disks) > 1:
            bad("at most one disk can have the root role")
        ide = sum(d.bus == "ide" for d in self.disks) + len(self.cdroms)
        if ide > 4:
            bad("at most 4 IDE devices (CD-ROMs and IDE disks together)")
        for c in self.cdroms:
            _check_path(c, bad)
        for kind, ports in (("serial", self.serial_ports), ("parallel", self.parallel_ports)):
            if len(ports) > 4:
                bad(f"at most 4 {kind} ports")
            for p in ports:
                if p.kind not in PORT_KINDS:
                    bad(f"{kind} port kind must be one of {PORT_KINDS}")
                if (p.kind == "file") != (p.path is not None):
                    bad(f"a {kind} port has a path exactly when its kind is file")
                if p.path is not None:
                    _check_path(p.path, bad)
        macs = [n.mac for n in self.nics]
        for n in self.nics:
            if not isinstance(n.mac, str) or not MAC.match(n.mac):
                bad(f"NIC MAC {n.mac!r} must be six lower-case hex pairs separated by colons")
            if int(n.mac[:2], 16) & 1:
                bad(f"NIC MAC {n.mac} is a multicast address")
            if n.kind not in NIC_KINDS:
                bad(f"NIC kind must be one of {NIC_KINDS}")
            if (n.kind == "user") != (n.source is None):
                bad("a NIC names a source exactly when its kind is network or bridge")
            if n.model not in ("virtio", "e1000", "rtl8139"):
                bad("NIC model must be virtio, e1000 or rtl8139")
        if len(set(macs)) != len(macs):
            bad("two NICs share a MAC address")
        if self.boot is not None:
            _check_path(self.boot.kernel, bad)
            if self.boot.initrd is not None:
                _check_path(self.boot.initrd, bad)
            if len(self.boot.cmdline) > 2000 or any(ord(ch) < 32 for ch in self.boot.cmdline):
                bad("kernel command line must be printable and at most 2000 characters")
        if self.channel is not None:
            if not CHANNEL_NAME.match(self.channel.name):
                bad("channel name must be 1-100 characters of [A-Za-z0-9_.-]")
            _check_path(self.channel.path, bad)
            if len(str(self.channel.path).encode()) > MAX_UNIX_PATH:
                bad(f"channel socket path is longer than {MAX_UNIX_PATH} bytes: {self.channel.path}")
            if not isinstance(self.channel.token, str) or not self.channel.token:
                bad("the guest channel needs the instance token")
        return self


def _check_path(path: Path, bad) -> None:
    p = str(path)
    if not Path(p).is_absolute() or any(ch in p for ch in "\0\n'\"<>&"):
        bad(f"path {p!r} must be absolute and free of quotes, angle brackets and control characters")
