"""guestd's main loop: find the context, run the steps, report, then serve the host's requests."""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .context import DEFAULT_CHANNEL, ContextError, InstanceContext
from . import migrated, rewake
from .port import GuestPort, find_port
from .sources.cdrom import CdromSource
from .sources.channel import ChannelSource
from .sources.cmdline import CmdlineSource
from .sources.directory import DirectorySource
from .steps import Environment, StepResult, clock, grid, power, report, run_all
from .system import Roots, System, urgent_thread

log = logging.getLogger("guestd")
SOURCES = ("cdrom", "cmdline", "channel")


class Guestd:
    """One guestd: its environment, its port to the host, its context sources and its results."""

    def __init__(self, env: Environment, port: GuestPort | None, sources: list[Any],
                 zero_free: bool = False) -> None:
        self.env, self.port, self.sources = env, port, sources
        self.zero_free = zero_free     # a warm template zeroes free memory before ready (the real guest only)
        self.context: InstanceContext | None = None
        self.context_source: str | None = None
        self.results: dict[str, StepResult] = {}
        self.ready = False
        self.error: str | None = None
        self.started = time.monotonic()
        self.wake_calm: Callable[[], None] | None = None   # a warm template's raised port thread, put back
        self.recontext_seconds: dict[str, float] | None = None   # a warm clone's: where its recontext went
        self.env.state["on_container_change"] = self._container_changed
        if port is not None:
            port.handle("ping", lambda m: {"pong": True, "time": self.env.system.now()})
            port.handle("status", lambda m: self.status())
            port.handle("set-time", lambda m: clock.set_time(self.env, m["time"]))
            port.handle("certificate", lambda m: grid.install_certificate(self.env, m))
            port.handle("recontext", lambda m: rewake.recontext(self, m))
            port.handle("migrated", lambda m: migrated.migrated(self, m))

    def find_context(self) -> InstanceContext | None:
        """The first context a source has, in the configured order; a broken one stops the search."""
        for source in self.sources:
            try:
                ctx = source.read()
            except ContextError as exc:
                self.error = f"{source.name}: {exc}"
                log.error("context from %s is invalid: %s", source.name, exc)
                return None
            if ctx is not None:
                self.context, self.context_source = ctx, source.name
                return ctx
        self.error = "no context source has a context"
        return None

    def boot(self) -> bool:
        """Find the context and run every step; report; True when guestd is ready."""
        ctx = self.find_context()
        if ctx is None:
            return False
        self.error = None
        if self.port is not None:
            self.port.set_token(ctx.token)
        results = run_all(ctx, self.env)
        results["power"] = StepResult("power", True, power.watch(self.env, self._power_pressed))
        if ctx.warm and self.zero_free:       # the node saves the template once it is ready: a smaller state
            # nothing dirty left to write back: no clone starts with the template's journal commit or page
            # writeback falling due while it takes its identity (the kernel's timers run on from the save)
            os.sync()
            try:
                log.info("warm template: %d MiB of free memory zeroed before the save",
                         rewake.zero_free_memory(self.env.roots))
            except (OSError, ValueError) as exc:
                log.warning("warm template: free memory not zeroed: %s", exc)
        if ctx.warm and getattr(self.port, "native_id", None):
            # the clone's first message after the restore is its recontext: the port thread reads and decodes
            # it at the priority the recontext runs at (guestd/rewake.py), which puts it back after its answer
            self.wake_calm = urgent_thread(self.port.native_id)
        # published whole: the channel thread's status() may read it at any moment
        self.results = results
        self.ready = True
        if self.port is not None:
            report.handle(ctx, self.results, self.port)
        return True

    def status(self) -> dict[str, Any]:
        sup = self.env.state.get("container")
        return {
            "ready": self.ready, "error": self.error,
            "instance": self.context.instance if self.context else None,
            "context_source": self.context_source,
            "steps": {n: r.as_report() for n, r in list(self.results.items())},
            "container": sup.status() if sup is not None else None,
            "time": self.env.system.now(), "uptime": time.monotonic() - self.started,
            "boot_id": self._boot_id(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),   # the answering thread's (raised during a recontext)
            **({"recontext_seconds": self.recontext_seconds} if self.recontext_seconds is not None else {}),
        }

    def _boot_id(self) -> str | None:
        """The kernel's id of this boot (a restore or a migration keeps it; a reboot changes it)."""
        try:
            return (self.env.roots.proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        except OSError:
            return None

    def _container_changed(self, status: dict[str, Any]) -> None:
        if self.port is not None:
            self.port.send({"op": "report", "step": "container", "ok": status.get("running", False)
                            or status.get("event") == "exited", "detail": status, "error": None,
                            "at": self.env.system.now()})

    def _power_pressed(self) -> None:
        log.info("power button pressed: powering off")
        sup = self.env.state.get("container")
        if sup is not None:
            sup.stop()
        if self.port is not None:
            self.port.send({"op": "report", "step": "power", "ok": True, "detail": {"event": "power-off"},
                            "error": None, "at": self.env.system.now()})
            time.sleep(0.3)
        self.env.system.power_off()


def main(argv: list[str] | None = None) -> int:
    """guestd [--context-dir DIR] [--sources cdrom,cmdline,channel] [--channel NAME]"""
    ap = argparse.ArgumentParser(prog="guestd", description="vmgrid's daemon inside the VM")
    ap.add_argument("--context-dir", type=Path, help="read context.json from this directory first")
    ap.add_argument("--sources", default=",".join(SOURCES), help="context sources to try, in order")
    ap.add_argument("--channel", default=DEFAULT_CHANNEL, help="virtio-serial port name")
    ap.add_argument("--channel-wait", type=float, default=30.0, help="seconds to wait for a pushed context")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="guestd: %(levelname)s %(message)s")
    roots = Roots()
    env = Environment(System(roots), roots)
    grid.log_to_file(env)
    device = None
    for _ in range(50):                      # the port appears as soon as virtio_console is loaded
        device = find_port(roots, args.channel)
        if device is not None:
            break
        time.sleep(0.1)
    port = GuestPort(device).start() if device is not None else None
    if port is None:
        log.warning("no virtio-serial port named %s: running without a channel", args.channel)
    sources: list[Any] = []
    if args.context_dir:
        sources.append(DirectorySource(args.context_dir))
    for name in filter(None, args.sources.split(",")):
        if name == "cdrom":
            sources.append(CdromSource(roots))
        elif name == "cmdline":
            sources.append(CmdlineSource(roots))
        elif name == "channel" and port is not None:
            sources.append(ChannelSource(port, args.channel_wait))
    daemon = Guestd(env, port, sources, zero_free=True)
    while not daemon.boot():
        log.error("not ready: %s; trying again in 5 s", daemon.error)
        time.sleep(5)
    log.info("ready: %s", {n: r.ok for n, r in daemon.results.items()})
    threading.Event().wait()
    return 0
