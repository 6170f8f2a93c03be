"""Test doubles for guestd's privileged operations, and fake /sys, /proc, /dev, /etc roots.

A mock only where the real part cannot run here: setting the clock, the host name or an address of the
test machine itself would change the machine (and needs root). The network and hostname steps are also
run for real inside namespaces in test_guestd_steps.py.
"""
from __future__ import annotations

import time
from pathlib import Path

from guestd.system import Roots, System


class FakeSystem(System):
    """Records what guestd asked for; the clock is the real one plus an offset the test controls."""

    def __init__(self, roots: Roots) -> None:
        super().__init__(roots)
        self.offset = 0.0
        self.hostname: str | None = None
        self.addresses: dict[str, tuple[str, str]] = {}
        self.up: set[str] = set()
        self.gateway: str | None = None
        self.powered_off = False
        self.calls: list[tuple] = []

    def now(self) -> float:
        return time.time() + self.offset

    def set_clock(self, when: float) -> None:
        self.calls.append(("set_clock", when))
        self.offset = when - time.time()

    def set_hostname(self, name: str) -> None:
        self.hostname = name

    def link_up(self, ifname: str) -> None:
        self.up.add(ifname)

    def set_address(self, ifname: str, address: str, netmask: str) -> None:
        self.addresses[ifname] = (address, netmask)
        self.up.add(ifname)

    def address_of(self, ifname: str):
        return self.addresses.get(ifname)

    def add_default_route(self, gateway: str, ifname: str) -> None:
        self.gateway = gateway

    def default_route(self):
        return self.gateway

    def power_off(self) -> None:
        self.powered_off = True


def fake_roots(base: Path, nics: dict[str, str] | None = None) -> Roots:
    """Fake roots under ``base``: /sys/class/net/<if>/address for ``nics`` (name -> MAC), an /etc."""
    roots = Roots(sys=base / "sys", proc=base / "proc", dev=base / "dev", etc=base / "etc", log=base / "log")
    for d in (roots.sys, roots.proc, roots.dev, roots.etc, roots.log):
        d.mkdir(parents=True, exist_ok=True)
    (roots.etc / "hosts").write_text("127.0.0.1\tlocalhost\n")
    for ifname, mac in (nics or {}).items():
        (roots.sys / "class" / "net" / ifname).mkdir(parents=True)
        (roots.sys / "class" / "net" / ifname / "address").write_text(mac + "\n")
    return roots
