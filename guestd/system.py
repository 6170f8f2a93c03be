"""The guest's privileged operations in one place: clock, host name, interface address, route, power-off.

Linux ioctls through fcntl and libc through ctypes (a minbase guest has no `ip` binary). Unit tests
replace System with a recording fake where an operation would change the test machine itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SIOCADDRT = 0x890B
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFADDR = 0x8915
SIOCSIFADDR = 0x8916
SIOCGIFNETMASK = 0x891B
SIOCSIFNETMASK = 0x891C
IFF_UP = 0x1
RTF_UP, RTF_GATEWAY = 0x1, 0x2
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


class SystemError_(OSError):
    """A privileged operation in the guest failed."""


@dataclass
class Roots:
    """Where guestd finds the kernel's and the system's files (all '/' in a real guest)."""

    sys: Path = Path("/sys")
    proc: Path = Path("/proc")
    dev: Path = Path("/dev")
    etc: Path = Path("/etc")
    log: Path = Path("/var/log")


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(address))


def _ifreq(ifname: str, payload: bytes = b"") -> bytes:
    name = ifname.encode()
    if len(name) >= 16:
        raise SystemError_(f"interface name {ifname!r} too long")
    return struct.pack("16s", name) + payload.ljust(24, b"\0")


@dataclass
class System:
    """The real operations (needs root in the guest)."""

    roots: Roots = field(default_factory=Roots)

    def now(self) -> float:
        return time.time()

    def set_clock(self, when: float) -> None:
        time.clock_settime(time.CLOCK_REALTIME, when)

    def set_hostname(self, name: str) -> None:
        socket.sethostname(name)

    def _ioctl(self, request: int, arg: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                return fcntl.ioctl(s.fileno(), request, arg)
            except OSError as exc:
                raise SystemError_(exc.errno, f"ioctl {request:#x}: {exc.strerror}") from None

    def link_up(self, ifname: str) -> None:
        flags = struct.unpack_from("H", self._ioctl(SIOCGIFFLAGS, _ifreq(ifname)), 16)[0]
        self._ioctl(SIOCSIFFLAGS, _ifreq(ifname, struct.pack("H", flags | IFF_UP)))

    def set_address(self, ifname: str, address: str, netmask: str) -> None:
        """Give ``ifname`` its IPv4 address and netmask and bring it up."""
        self._ioctl(SIOCSIFADDR, _ifreq(ifname, _sockaddr_in(address)))
        self._ioctl(SIOCSIFNETMASK, _ifreq(ifname, _sockaddr_in(netmask)))
        self.link_up(ifname)

    def address_of(self, ifname: str) -> tuple[str, str] | None:
        """The interface's IPv4 address and netmask as the kernel has them (None when unset)."""
        try:
            addr = self._ioctl(SIOCGIFADDR, _ifreq(ifname))
            mask = self._ioctl(SIOCGIFNETMASK, _ifreq(ifname))
        except SystemError_:
            return None
        return socket.inet_ntoa(addr[20:24]), socket.inet_ntoa(mask[20:24])

    def add_default_route(self, gateway: str, ifname: str) -> None:
        """Route 0.0.0.0/0 via ``gateway`` (struct rtentry for SIOCADDRT)."""
        dev = ctypes.create_string_buffer(ifname.encode())
        # struct rtentry (native layout): pad1, dst, gateway, genmask, flags, pad2, pad3, pad4,
        # metric, dev, mtu, window, irtt
        rtentry = struct.pack(
            "@L16s16s16sHhLPhPLLH0L",
            0, _sockaddr_in("0.0.0.0"), _sockaddr_in(gateway), _sockaddr_in("0.0.0.0"),
            RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, ctypes.addressof(dev), 0, 0, 0)
        try:
            self._ioctl(SIOCADDRT, rtentry)
        except SystemError_ as exc:
            if exc.errno != 17:   # EEXIST: the route is there already
                raise

    def default_route(self) -> str | None:
        """The default gateway from /proc/net/route (None when there is none)."""
        try:
            lines = (self.roots.proc / "net" / "route").read_text().splitlines()[1:]
        except OSError:
            return None
        for line in lines:
            cols = line.split()
            if len(cols) > 2 and cols[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<L", int(cols[2], 16)))
        return None

    def power_off(self) -> None:
        """Flush the disks and power the machine off (the ACPI power button's meaning)."""
        os.sync()
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.reboot(LINUX_REBOOT_CMD_POWER_OFF) != 0:
            raise SystemError_(ctypes.get_errno(), "reboot(POWER_OFF) failed")


# -- a warm-snapshot clone's new identity (guestd/rewake.py) ------------------------------------------
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
RNDADDENTROPY = 0x40085203      # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207          # _IO('R', 0x07)


def set_mac(system: System, ifname: str, mac: str) -> None:
    """Give ``ifname`` the hardware address ``mac`` (virtio-net passes it on to the device)."""
    hw = bytes(int(b, 16) for b in mac.split(":"))
    system._ioctl(SIOCSIFHWADDR, _ifreq(ifname, struct.pack("=H", ARPHRD_ETHER) + hw))


def reseed_rng(system: System, seed: bytes) -> None:
    """Mix ``seed`` into the kernel's input pool, credited, then reseed the CRNG from it at once: a clone
    of a saved guest must not go on with the random state every other clone has."""
    info = struct.pack("ii", len(seed) * 8, len(seed)) + seed
    fd = os.open(system.roots.dev / "urandom", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:
        raise SystemError_(exc.errno, f"reseeding the kernel RNG: {exc.strerror}") from None
    finally:
        os.close(fd)


# -- a recontext's answer before anything it starts ---------------------------------------------------
URGENT_NICE = -10      # CFS weight 9548 against 1024 at nice 0: the thread gets about 90% of a busy CPU


def urgent_thread(tid: int | None = None) -> Callable[[], None]:
    """Raise a thread's CPU priority (the calling thread's, or the thread ``tid`` of this process) to nice
    URGENT_NICE, with SCHED_RESET_ON_FORK so that every process or thread it starts runs at nice 0 from its
    first instruction (the container a recontext starts must not inherit guestd's priority, nor could a
    grandchild). Returns the function that puts the thread back; a no-op pair where the system refuses (no
    CAP_SYS_NICE, no such policy flag)."""
    tid = threading.get_native_id() if tid is None else tid
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        if os.sched_getscheduler(tid) != os.SCHED_OTHER:
            return lambda: None
        os.sched_setscheduler(tid, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
    except (OSError, AttributeError):
        return lambda: None
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(before, URGENT_NICE))
    except OSError:
        pass

    def restore() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, before)
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
    return restore
