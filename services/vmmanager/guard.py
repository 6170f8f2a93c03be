"""Bridge mode: every guest's tap may send only as its own lease, so no guest takes a neighbour's address.

A guest is untrusted. On a plain Linux bridge it could set another instance's IP or MAC (or answer ARP for
them) and take that instance's traffic or cut it off. The node therefore keeps, in the kernel's nftables,
a table of the bridge family of its own (``vmgrid_<bridge>_<8 hex>``, see :func:`table_name`) whose one
chain, on the bridge's prerouting hook, looks at every frame sent by a tap the node bound:

- a frame whose source MAC is not the tap's leased MAC is dropped;
- IPv4 passes only from the tap's leased address, ARP (Ethernet/IPv4) only when its sender is the tap's
  leased MAC and address (or 0.0.0.0, an address probe);
- anything else (IPv6, VLAN tags, other EtherTypes) is dropped: libvirt's ``clean-traffic`` filter, for
  hosts without libvirt's nwfilter driver;
- a DHCP server's answer (UDP from port 67, or to port 68, where DHCP clients listen whatever the answer's
  source port) is dropped: a guest may not hand out addresses, even from its own;
- broadcast and multicast frames beyond ``broadcast_rate`` a second (a burst of twice that) are dropped, per
  tap: every port of the bridge receives each of them, so one guest's flood would reach every neighbour and
  the host.

and a second chain, on the bridge's postrouting hook, looks at every frame the bridge sends out of a bound tap
(forwarded from a neighbour or sent by the host): a unicast frame leaves a tap only when it is addressed to the
tap's leased MAC. A bridge floods a frame for a MAC it has not learned (or has forgotten: a quiet guest's entry
ages out after 300 s) to every port, so without this a guest would read unicast traffic meant for a neighbour;
broadcast and multicast frames pass. A tap bound to nothing receives no unicast frame.

Frames from ports the node did not bind (the site's uplink, another node's guests: that node's own table
looks at those) pass untouched. A tap is
bound before its guest first runs (deploy, restore, a warm clone, a migration's arrival), so no frame of it
ever passes unchecked; a tap bound to nothing (a warm snapshot's template guest) may send nothing at all.
The table is rewritten whole, in one nftables transaction, from the node's records each time (``sync``):
a restart, a crash or a rule someone deleted by hand are mended by the next sync.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from services.vmmanager.network import BRIDGE_NAME, NetworkSetupError

TAP = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
NFT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Binding:
    """What tap ``tap`` may send as: the lease's MAC and IPv4 address."""

    tap: str
    mac: str
    address: str

    def __post_init__(self) -> None:
        if not TAP.match(self.tap or ""):
            raise ValueError(f"tap name {self.tap!r}: 1-15 characters of [A-Za-z0-9_.-]")
        if not MAC.match((self.mac or "").lower()):
            raise ValueError(f"MAC {self.mac!r}: six hex pairs separated by colons")
        ipaddress.IPv4Address(self.address)       # ValueError names it


def table_name(bridge: str, owner: str = "") -> str:
    """``vmgrid_<bridge>_<8 hex>``: one table per node, the hex a hash of the bridge and ``owner`` (the node's
    state directory), so two nodes on one bridge of one host each keep their own. A bridge name's '-' and '.'
    (allowed in interface names, not in nftables identifiers) become '_'; the hash keeps such names apart."""
    if not BRIDGE_NAME.match(bridge):
        raise NetworkSetupError(f"bridge name {bridge!r}: 1-15 characters of [A-Za-z0-9_.-], starting alphanumeric")
    plain = re.sub(r"[^A-Za-z0-9_]", "_", bridge)
    digest = hashlib.sha256(f"{bridge}\0{owner}".encode()).hexdigest()[:8]
    return f"vmgrid_{plain}_{digest}"


def nft_command(netns: str | None, *args: str) -> list[str]:
    """``nft ARGS``, inside the named network namespace ``netns`` when given (``ip netns exec``)."""
    return (["ip", "netns", "exec", netns] if netns else []) + ["nft", *args]


class PortGuard:
    """One node's guard of its taps: ``sync(bindings)`` makes its table hold exactly these (and ``closed``)."""

    def __init__(self, bridge: str, owner: str = "", netns: str | None = None, broadcast_rate: int = 100) -> None:
        if isinstance(broadcast_rate, bool) or not isinstance(broadcast_rate, int) or broadcast_rate < 0:
            raise NetworkSetupError(f"[vmmanager] guard_broadcast_rate = {broadcast_rate!r}: a whole number of "
                                    f"frames a second, 0 for no bound")
        self.bridge = bridge
        self.broadcast_rate = broadcast_rate
        self.table = table_name(bridge, owner)
        self.netns = netns                # a named network namespace (``ip netns exec``), as NodeBridge's
        self.closed: set[str] = set()     # taps bound to nothing: they may send no frame at all
        self._lock = threading.Lock()

    def _nft(self, script: str, *args: str) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(nft_command(self.netns, *args, "-f", "-"), input=script, capture_output=True, text=True,
                                  timeout=NFT_TIMEOUT)
        except FileNotFoundError:
            raise NetworkSetupError(
                "bridge mode guards each guest's tap with nftables and this host has no `nft` (Debian package "
                "nftables): install it, or set [vmmanager] guard_guests = false to run without the guard (any "
                "guest can then take another's address)") from None
        except subprocess.TimeoutExpired:
            raise NetworkSetupError(f"nft did not answer within {NFT_TIMEOUT:g} s (the guard of {self.bridge})") \
                from None
        if proc.returncode != 0:
            raise NetworkSetupError(f"the guard of bridge {self.bridge}: nft refused its rules: "
                                    f"{(proc.stderr or proc.stdout).strip()[:2000]}")
        return proc

    def script(self, bindings: Iterable[Binding], closed: Iterable[str] = ()) -> str:
        """The nftables transaction that replaces the table with one holding these bindings."""
        bound = sorted(set(bindings), key=lambda b: b.tap)
        taps = {b.tap for b in bound}
        if len(taps) != len(bound):
            raise ValueError("a tap is bound twice")
        shut = sorted(set(closed) - taps)
        for tap in shut:
            if not TAP.match(tap):
                raise ValueError(f"tap name {tap!r}: 1-15 characters of [A-Za-z0-9_.-]")

        def elements(items: list[str]) -> str:
            return f" elements = {{ {', '.join(items)} }}" if items else ""

        ports = elements([f'"{t}"' for t in sorted(taps | set(shut))])
        macs = elements([f'"{b.tap}" . {b.mac.lower()}' for b in bound])
        ipv4 = elements([f'"{b.tap}" . {b.mac.lower()} . {b.address}' for b in bound])
        arp = "ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4"
        flood = ""
        if self.broadcast_rate:     # the group bit of the destination: broadcast and multicast
            flood = (f"    ether daddr & 01:00:00:00:00:00 == 01:00:00:00:00:00 update @flood {{ iifname limit rate "
                     f"over {self.broadcast_rate}/second burst {2 * self.broadcast_rate} packets }} counter drop\n")
        t = self.table
        return (f"add table bridge {t}\n"
                f"delete table bridge {t}\n"
                f"table bridge {t} {{\n"
                f"  set ports {{ type ifname;{ports} }}\n"
                f"  set macs {{ type ifname . ether_addr;{macs} }}\n"
                f"  set ipv4 {{ type ifname . ether_addr . ipv4_addr;{ipv4} }}\n"
                f"  set flood {{ type ifname; flags dynamic, timeout; timeout 1m; }}\n"
                f"  chain guard {{\n"
                f"    type filter hook prerouting priority -200; policy accept;\n"
                f"    iifname != @ports accept\n"
                f"    iifname . ether saddr != @macs counter drop\n"
                f"{flood}"
                f"    ether type ip udp sport 67 counter drop\n"
                f"    ether type ip udp dport 68 counter drop\n"
                f"    ether type ip iifname . ether saddr . ip saddr @ipv4 accept\n"
                f"    {arp} iifname . arp saddr ether . arp saddr ip @ipv4 accept\n"
                f"    {arp} arp saddr ip 0.0.0.0 iifname . arp saddr ether @macs accept\n"
                f"    counter drop\n"
                f"  }}\n"
                f"  chain deliver {{\n"
                f"    type filter hook postrouting priority -200; policy accept;\n"
                f"    oifname != @ports accept\n"
                f"    ether daddr & 01:00:00:00:00:00 == 01:00:00:00:00:00 accept\n"
                f"    oifname . ether daddr @macs accept\n"
                f"    counter drop\n"
                f"  }}\n"
                f"}}\n")

    def sync(self, bindings: Iterable[Binding] | Callable[[], Iterable[Binding]]) -> int:
        """Make the table hold exactly ``bindings`` (and the taps of ``closed``, that may send nothing),
        atomically. A callable is read under the guard's lock: of two syncs at once, the later read is the one
        written last (a list read before the lock could undo a binding another thread had just written).
        Returns how many bindings it holds. NetworkSetupError when nftables is missing or refuses (the caller
        decides: a deploy fails)."""
        with self._lock:
            bound = list(bindings() if callable(bindings) else bindings)
            self._nft(self.script(bound, set(self.closed)))
        return len(set(bound))

    def check(self) -> None:
        """At the node's start: nftables is here and takes a bridge table (a dry run, nothing changes)."""
        self._nft(self.script(()), "--check")

    def remove(self) -> None:
        """Take the table away (the bridge's teardown); its guests are unguarded after this."""
        with self._lock:
            self._nft(f"add table bridge {self.table}\ndelete table bridge {self.table}\n")

    def listing(self) -> str:
        """``nft list table`` of the guard (what an operator would run); "" when there is none."""
        try:
            proc = subprocess.run(nft_command(self.netns, "list", "table", "bridge", self.table), capture_output=True, text=True,
                                  timeout=NFT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return proc.stdout if proc.returncode == 0 else ""


def tables_of(bridge: str, netns: str | None = None) -> list[str]:
    """The guard tables of every node on ``bridge`` (``nft list tables bridge``); [] without nft."""
    prefix = re.sub(r"[^A-Za-z0-9_]", "_", bridge)
    try:
        proc = subprocess.run(nft_command(netns, "list", "tables", "bridge"),
                              capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return re.findall(rf"^table bridge (vmgrid_{re.escape(prefix)}_[0-9a-f]{{8}})$", proc.stdout, re.M)


def remove_table(bridge: str, state_dir, netns: str | None = None) -> list[str]:
    """Take away the guard table of the node whose state directory is ``state_dir`` on ``bridge`` (the bridge's
    teardown by that node), as the node names it (:func:`table_name`); returns its name, or [] when there was none.
    Other nodes' tables, on this bridge or on one whose name reads the same in nftables (``vm.br``, ``vm_br``),
    stay."""
    name = table_name(bridge, str(Path(state_dir).resolve()))
    try:
        proc = subprocess.run(nft_command(netns, "delete", "table", "bridge", name),
                              capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [name] if proc.returncode == 0 else []
