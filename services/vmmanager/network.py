"""The node's guest network in bridge mode: a Linux bridge holding the address pool's gateway, so the
addresses the node leases are reachable from the node and between guests.

libvirt gives every instance a tap on the bridge (``<interface type='bridge'>``); guestd sets the
leased address on the NIC with the leased MAC. ``NodeBridge.ensure()`` creates what is missing
(idempotent), ``check()`` only looks, ``teardown()`` removes only what vmgrid made, as recorded in
the node's state directory. Everything goes through iproute2 (``ip``), optionally inside a named
network namespace (``ip -n NETNS``). QEMU's user-mode network (nic_kind "user") needs none of this
and reaches no guest: see docs/configuration.md.
"""
from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

BRIDGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")   # IFNAMSIZ: 15 characters


class NetworkSetupError(ValueError):
    """The node's guest network cannot be set up as configured; the message says why and what to do."""


@dataclass(frozen=True)
class BridgeStatus:
    """What the node has: the bridge, whether it is up, its addresses, its ports (the guests' taps)."""

    name: str
    exists: bool
    is_bridge: bool = False
    up: bool = False
    addresses: tuple[str, ...] = ()      # "10.99.0.1/24"
    ports: tuple[str, ...] = ()
    made: dict = field(default_factory=dict)   # what vmgrid created: {"bridge": bool, "address": bool}
    removed_tables: tuple[str, ...] = ()  # teardown(): the nodes' guard tables of the bridge it removed (guard.py)

    def holds(self, address: str) -> bool:
        return address in self.addresses


class NodeBridge:
    """One bridge of one node: ``name`` holding ``gateway`` with the prefix of ``network``."""

    def __init__(self, name: str, gateway: str, network: str, state_dir: Path | None = None,
                 netns: str | None = None) -> None:
        if not isinstance(name, str) or not BRIDGE_NAME.match(name):
            raise NetworkSetupError(f"bridge name {name!r}: 1-15 characters of [A-Za-z0-9_.-], starting alphanumeric")
        try:
            net = ipaddress.IPv4Network(network, strict=True)
            gw = ipaddress.IPv4Address(gateway)
        except ValueError as exc:
            raise NetworkSetupError(f"bridge {name}: {exc}") from None
        if gw not in net or gw in (net.network_address, net.broadcast_address):
            raise NetworkSetupError(f"bridge {name}: the gateway {gw} is not a host address of {net}")
        self.name, self.network, self.gateway = name, net, gw
        self.address = f"{gw}/{net.prefixlen}"
        self.netns = netns
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._record = Path(state_dir) / "network" / f"{name}.json" if state_dir is not None else None

    # -- iproute2 ---------------------------------------------------------------------------------
    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["ip"] + (["-n", self.netns] if self.netns else []) + list(args)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise NetworkSetupError("bridge mode needs iproute2's `ip` command (Debian package iproute2)") from None
        if check and proc.returncode != 0:
            raise NetworkSetupError(f"bridge {self.name}: `{' '.join(cmd)}` failed: "
                                    f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    def _json(self, *args: str) -> list[dict]:
        proc = self._ip("-j", *args, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return []
        return json.loads(proc.stdout)

    # -- the record of what vmgrid made -----------------------------------------------------------
    def _made(self) -> dict:
        if self._record is None or not self._record.is_file():
            return {"bridge": False, "address": False}
        try:
            return {"bridge": False, "address": False, **json.loads(self._record.read_text())}
        except (OSError, ValueError):
            return {"bridge": False, "address": False}

    def _remember(self, made: dict) -> None:
        if self._record is None:
            return
        self._record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._record.with_suffix(".tmp")
        tmp.write_text(json.dumps({**made, "address_cidr": self.address}) + "\n")
        tmp.replace(self._record)

    # -- the verbs --------------------------------------------------------------------------------
    def check(self) -> BridgeStatus:
        """The bridge as it is now (changes nothing)."""
        links = self._json("-d", "link", "show", "dev", self.name)
        if not links:
            return BridgeStatus(self.name, exists=False, made=self._made())
        link = links[0]
        kind = (link.get("linkinfo") or {}).get("info_kind")
        addrs = self._json("addr", "show", "dev", self.name)
        addresses = tuple(f"{a['local']}/{a['prefixlen']}" for entry in addrs
                          for a in entry.get("addr_info", []) if a.get("family") == "inet")
        ports = tuple(sorted(p["ifname"] for p in self._json("link", "show", "master", self.name)))
        return BridgeStatus(self.name, exists=True, is_bridge=kind == "bridge", up="UP" in link.get("flags", []),
                            addresses=addresses, ports=ports, made=self._made())

    def ensure(self) -> BridgeStatus:
        """Make the bridge exist, be up and hold the gateway address; idempotent. Refuses an interface
        of that name that is not a bridge, and a gateway address another interface already holds."""
        made = self._made()
        status = self.check()
        if status.exists and not status.is_bridge:
            raise NetworkSetupError(f"{self.name} exists and is not a bridge: choose another nic_source")
        elsewhere = [entry["ifname"] for entry in self._json("addr", "show")
                     if entry.get("ifname") != self.name
                     and any(a.get("local") == str(self.gateway) for a in entry.get("addr_info", []))]
        if elsewhere:
            raise NetworkSetupError(f"the gateway {self.gateway} is already held by {', '.join(elsewhere)}, "
                                    f"not by the bridge {self.name}")
        if not status.exists:
            self._ip("link", "add", "name", self.name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
            made["bridge"] = True
            self._remember(made)
        if not status.up:
            self._ip("link", "set", "dev", self.name, "up")
        if not status.holds(self.address):
            self._ip("addr", "add", self.address, "dev", self.name)
            made["address"] = True
        self._remember(made)      # also when nothing was made: the record says so
        return self.check()

    def teardown(self) -> BridgeStatus:
        """Remove what ensure() made (the bridge it created, or the address it added to a bridge the
        site made) and this node's guard table of the bridge (guard.py: the one named for this bridge and this
        node's state directory), and forget it; leaves alone what the site made itself and every other node's
        guard (another node on the same bridge keeps guarding its guests). Guests still on the bridge lose their
        network: stop them first. Returns the status after, with the name of the guard table it removed
        (``removed_tables``, which the caller reports)."""
        from services.vmmanager.guard import remove_table     # guard.py builds on this module
        made = self._made()
        status = self.check()
        removed = remove_table(self.name, self.state_dir, self.netns) if self.state_dir is not None else []
        if status.exists and status.is_bridge:
            if made.get("bridge"):
                self._ip("link", "del", "dev", self.name)
            elif made.get("address") and status.holds(self.address):
                self._ip("addr", "del", self.address, "dev", self.name)
        if self._record is not None:
            self._record.unlink(missing_ok=True)
        return replace(self.check(), removed_tables=tuple(removed))


def prepare(nic_kind: str, nic_source: str, gateway: str, network: str, manage: bool,
            state_dir: Path) -> BridgeStatus | None:
    """The node's start-up step for its guest network (VMManagerConfig's nic_kind, nic_source,
    gateway, network, manage_bridge). Bridge mode: ensure the bridge (manage_bridge) or check the
    site's own (it must exist, be up and hold the gateway). Other modes: nothing to do (None)."""
    if nic_kind != "bridge":
        return None
    if not nic_source:
        raise NetworkSetupError("nic_kind = \"bridge\" needs nic_source, the bridge's name (e.g. \"vmgridbr0\")")
    bridge = NodeBridge(nic_source, gateway, network, state_dir)
    if manage:
        return bridge.ensure()
    status = bridge.check()
    if not (status.exists and status.is_bridge and status.up and status.holds(bridge.address)):
        raise NetworkSetupError(f"bridge {nic_source} must exist, be up and hold {bridge.address} "
                                f"(manage_bridge = false: the site sets it up); it has: "
                                f"{'no such bridge' if not status.exists else ', '.join(status.addresses) or 'no address'}")
    return status
