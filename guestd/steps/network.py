"""Step network: give the NIC whose MAC the context names its leased address, netmask and gateway;
bring up loopback; write /etc/resolv.conf. Reports the address the kernel then has."""
from __future__ import annotations

from typing import Any

from ..context import InstanceContext
from . import Environment, StepResult, guarded

NAME = "network"


def interface_for(env: Environment, mac: str) -> str:
    """The interface whose MAC is ``mac``: the one guestd last configured (``env.state["interface"]``)
    first, if it still has that MAC (one sysfs read; a recontext asks twice, and under software emulation
    every cold sysfs walk costs), else the first in /sys/class/net that has it."""
    net = env.roots.sys / "class" / "net"
    last = env.state.get("interface")
    if last:
        try:
            if (net / last / "address").read_text().strip().lower() == mac:
                return last
        except OSError:
            pass
    for entry in sorted(net.iterdir()) if net.is_dir() else []:
        try:
            if (entry / "address").read_text().strip().lower() == mac:
                return entry.name
        except OSError:
            continue
    raise LookupError(f"no network interface has MAC {mac}")


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
