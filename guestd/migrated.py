"""A migrated guest takes its new node's lease: the ``migrated`` request.

After a cold migration the guest runs on another node, restored from its saved memory: the same
processes, but still the source node's address and MAC inside, a clock behind by the downtime, and a grid
container certificate naming the old address. The target node's first message is ``migrated``: the
instance's *current* token (the one guestd holds, which the source node handed to the target), the new
context (the target's lease, a new token) and the host's clock. guestd steps the clock, moves its NIC to
the new MAC, sets the new address, gateway and DNS, rewrites the grid container's configuration for the
new address with a new certificate request for the key it already has, and reports. Nothing reboots and
no first-boot step runs again (no new keys, no new host name): the processes keep running.

Who can ask: only the host end of guestd's virtio-serial port carries host-to-guest messages (a process
in the guest cannot write into that direction), and the message must carry the token guestd holds now,
so a node that did not get this instance by migration cannot re-address it. An untrusted host owns the
guest anyway (memory, disk, CPU); the checks keep the request to the one instance it is for.
"""
from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

from .context import ContextError, validate
from .steps import StepResult, clock, grid, network, report
from .steps.network import interface_for, remember
from .system import set_mac

if TYPE_CHECKING:
    from .daemon import Guestd

log = logging.getLogger("guestd.migrated")


def migrated(daemon: "Guestd", message: dict[str, Any]) -> dict[str, Any]:
    """Handle ``migrated``: take the target node's lease and clock; return guestd's status."""
    old = daemon.context
    if old is None or old.warm or not daemon.ready:
        raise ContextError("migrated is for a ready instance (not a warm template, not one still booting)")
    if not hmac.compare_digest(str(message["token"]).encode(), old.token.encode()):
        raise ContextError("migrated must carry the instance's current token")
    ctx = validate(message["context"])
    if ctx.warm or ctx.instance != old.instance:
        raise ContextError(f"migrated moves instance {old.instance}; the context is for {ctx.instance!r}")
    env = daemon.env
    # from here the target's context and token stand, even if a step below fails (the node records why)
    daemon.context, daemon.context_source = ctx, "migrated"
    if daemon.port is not None:
        daemon.port.set_token(ctx.token)
    results = dict(daemon.results)
    results["clock"] = _guarded("clock", lambda: clock.set_time(env, float(message["time"])))
    moved = _guarded("migrated", lambda: _move_nic(env, old.network.mac, ctx.network.mac))
    results["migrated"] = moved
    if moved.ok:
        results["network"] = network.handle(ctx, env)
    if ctx.grid is not None:
        results["grid"] = grid.handle(ctx, env)       # same key, new request, configuration for the new address
    daemon.results, daemon.error = results, None
    if daemon.port is not None:
        report.handle(ctx, results, daemon.port)
    log.info("migrated: now at %s (%s)", ctx.network.address, {n: r.ok for n, r in results.items()})
    return daemon.status()


def _guarded(name: str, fn) -> StepResult:
    try:
        return StepResult(name, True, fn())
    except Exception as exc:
        return StepResult(name, False, error=f"{type(exc).__name__}: {exc}")


def _move_nic(env, old_mac: str, new_mac: str) -> dict[str, Any]:
    """The interface that has the source node's MAC gets the target's (virtio-net tells the device)."""
    ifname = interface_for(env, old_mac) if old_mac != new_mac else interface_for(env, new_mac)
    if old_mac != new_mac:
        set_mac(env.system, ifname, new_mac)
        remember(env, ifname, new_mac)
    return {"interface": ifname, "mac_before": old_mac, "mac": new_mac}
