"""Step network: give the NIC whose MAC the context names its leased address, netmask and gateway;
bring up loopback; write /etc/resolv.conf. Reports the address the kernel then has."""
from __future__ import annotations

from typing import Any

from ..context import InstanceContext
from . import Environment, StepResult, guarded

NAME = "network"


def interface_for(env: Environment, mac: str) -> str:
    """The interface whose MAC is ``mac``. guestd's own record first: the interface it last configured
    (``env.state["interface"]``) and the MAC it read there or set itself (``remember``): no read at all.
    A recontext asks twice, and under software emulation the first sysfs reads after a restore are cold
    code (25-60 ms each, docs/benchmarks.md, sixth pass). Else that interface's address file, if it has
    that MAC; else the first in /sys/class/net that has it."""
    last = env.state.get("interface")
    if last and env.state.get("nic") == (last, mac):
        return last
    net = env.roots.sys / "class" / "net"
    if last:
        try:
            if (net / last / "address").read_text().strip().lower() == mac:
                return remember(env, last, mac)
        except OSError:
            pass
    for entry in sorted(net.iterdir()) if net.is_dir() else []:
        try:
            if (entry / "address").read_text().strip().lower() == mac:
                return remember(env, entry.name, mac)
        except OSError:
            continue
    raise LookupError(f"no network interface has MAC {mac}")


def remember(env: Environment, ifname: str, mac: str) -> str:
    """Record that ``ifname`` has ``mac`` (read from it, or given to it by guestd: nothing else in the guest
    changes a MAC) and is the interface guestd configures; returns ``ifname``."""
    env.state["interface"], env.state["nic"] = ifname, (ifname, mac)
    return ifname


def _configure(ctx: InstanceContext, env: Environment) -> dict[str, Any]:
    net = ctx.network
    ifname = interface_for(env, net.mac)
    env.state["interface"] = ifname
    try:
        env.system.link_up("lo")
    except OSError:
        pass
    env.system.set_address(ifname, net.address, net.netmask)
    if net.gateway:
        env.system.add_default_route(net.gateway, ifname)
    if net.dns:
        (env.roots.etc / "resolv.conf").write_text("".join(f"nameserver {d}\n" for d in net.dns))
    have = env.system.address_of(ifname)
    if have != (net.address, net.netmask):
        raise RuntimeError(f"{ifname} has {have} after setting {net.address}/{net.netmask}")
    return {"interface": ifname, "address": have[0], "netmask": have[1],
            "gateway": env.system.default_route(), "dns": list(net.dns)}


def handle(ctx: InstanceContext, env: Environment) -> StepResult:
    return guarded(NAME, _configure, ctx, env)
