"""A warm-snapshot clone wakes up: the ``recontext`` request.

The node keeps, per image, a guest booted once to ready (its context marked ``warm``) and saved; every
deploy restores a copy of it. The restored guestd still holds the template's identity, so the node's
first message after the restore is ``recontext`` with the instance's own context, a random seed from the
host and the host's clock. guestd then makes the clone an instance of its own: the new MAC on the
template's interface, a reseeded kernel RNG, new SSH host keys where the image has them, then every
boot step with the new context (clock, host name, address, container, ...), and reports ready with the
new token. Accepted once, and only by a warm template: a running instance never changes identity.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING, Any

from .context import ContextError, validate
from .steps import StepResult, clock, report, run_all
from .steps.network import interface_for, remember
from .system import reseed_rng, set_mac, urgent_thread

if TYPE_CHECKING:
    from .daemon import Guestd

log = logging.getLogger("guestd.rewake")
MIN_SEED = 32          # bytes of host randomness a recontext must bring


def recontext(daemon: "Guestd", message: dict[str, Any]) -> dict[str, Any]:
    """Handle ``recontext``: take the instance's identity; return guestd's status (ready, steps).

    It runs at a raised priority (system.urgent_thread; a warm template's port thread waits at it already, so
    the message is read and decoded at it too) until its answer has been written to the host: whatever else is
    runnable in the just-restored guest (the kernel's work after the clock step, then the container it starts,
    a fresh interpreter: all cold code under software emulation) would otherwise share the one vCPU with it.
    What it starts runs at the normal priority (docs/benchmarks.md, fifth pass)."""
    restore, daemon.wake_calm = daemon.wake_calm or urgent_thread(), None     # raised by the template already
    try:
        status = _recontext(daemon, message)
    except BaseException:
        restore()
        raise
    port = daemon.port
    if port is not None and hasattr(port, "after_flush"):
        port.after_flush(restore)        # the port thread runs this handler and flushes its answer next
    else:
        restore()
    return status


def _recontext(daemon: "Guestd", message: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    old = daemon.context
    if old is None or not old.warm or not daemon.ready:
        raise ContextError("recontext is for a ready warm-snapshot template only")
    ctx = validate(message["context"])
    if ctx.warm:
        raise ContextError("an instance's context cannot be a warm template")
    try:
        seed = bytes.fromhex(message["seed"])
    except ValueError:
        raise ContextError("seed must be hexadecimal") from None
    if len(seed) < MIN_SEED:
        raise ContextError(f"seed must bring at least {MIN_SEED} bytes")
    env = daemon.env
    # the template is gone from here on: a second recontext is refused even if a step below fails
    daemon.context, daemon.context_source, daemon.ready = ctx, "recontext", False
    if daemon.port is not None:
        daemon.port.set_token(ctx.token)
    seconds: dict[str, float] = {}
    received = getattr(daemon.port, "received_at", None)
    if received is not None:           # the message read, decoded and checked
        seconds["message"] = round(started - received, 4)
        seconds["wake.wait"] = round(getattr(daemon.port, "last_wait", 0.0), 4)
        seconds["wake.hups"] = getattr(daemon.port, "last_hups", 0)
    results: dict[str, StepResult] = {}
    for name, fn in (("clock-restore", lambda: clock.set_time(env, float(message["time"]))),
                     ("identity", lambda: _identity(daemon, old.network.mac, ctx.network.mac, seed, seconds))):
        t = time.monotonic()
        results[name] = _guarded(name, fn)
        seconds[name] = round(time.monotonic() - t, 4)
    results.update(run_all(ctx, env, seconds))
    sup = env.state.get("container")
    if getattr(sup, "spawn_seconds", None) is not None:
        seconds["container.spawn"] = round(sup.spawn_seconds, 4)
    results["power"] = daemon.results.get("power") or StepResult("power", True)
    daemon.results, daemon.ready, daemon.error = results, True, None
    t = time.monotonic()
    if daemon.port is not None:
        report.handle(ctx, results, daemon.port, each=False)
    seconds["report"] = round(time.monotonic() - t, 4)
    log.info("recontext: now %s (%s)", ctx.instance, {n: r.ok for n, r in results.items()})
    t = time.monotonic()
    status = daemon.status()
    seconds["status"] = round(time.monotonic() - t, 4)
    seconds["total"] = round(time.monotonic() - started, 4)
    # where the recontext's time went in the guest (the node logs it, later status requests carry it): seconds
    # per step; wake.wait is how long the port had waited when the message came, wake.hups how often it found
    # no host on the channel first (0: the clone woke in its wait on a connected channel)
    status["recontext_seconds"] = daemon.recontext_seconds = seconds
    return status


def _guarded(name: str, fn) -> StepResult:
    try:
        return StepResult(name, True, fn())
    except Exception as exc:
        return StepResult(name, False, error=f"{type(exc).__name__}: {exc}")


def _identity(daemon: "Guestd", old_mac: str, new_mac: str, seed: bytes,
              seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """The secrets and addresses no two clones may share: the RNG state, the MAC, the SSH host keys."""
    env = daemon.env
    t = time.monotonic()
    reseed_rng(env.system, seed + os.urandom(32) + str(time.monotonic_ns()).encode())
    # a digest of the first random bytes after the reseed: the node compares clones with it
    # (BLAKE2 is built into Python: OpenSSL's SHA-256 would set libcrypto up here, its first use in guestd,
    # code a clone would run cold under software emulation)
    probe = hashlib.blake2b(os.urandom(32), digest_size=16).hexdigest()
    t1 = time.monotonic()
    ifname = interface_for(env, old_mac)
    t2 = time.monotonic()
    if old_mac != new_mac:
        set_mac(env.system, ifname, new_mac)
    remember(env, ifname, new_mac)
    t3 = time.monotonic()
    keys = _new_host_keys(env.roots.etc)
    if seconds is not None:
        seconds.update({"identity.rng": round(t1 - t, 4), "identity.iface": round(t2 - t1, 4),
                        "identity.mac": round(t3 - t2, 4), "identity.keys": round(time.monotonic() - t3, 4)})
    return {"rng": "reseeded", "random_probe": probe, "interface": ifname, "mac": new_mac,
            "host_keys": keys}


def _new_host_keys(etc, prefix=None) -> list[str]:
    """Replace the image's SSH host keys (every clone would otherwise have the template's); ``prefix`` is
    the root ssh-keygen -A writes under (the guest's /)."""
    keys = sorted((etc / "ssh").glob("ssh_host_*_key")) if (etc / "ssh").is_dir() else []
    if not keys:
        return []
    for key in keys:
        key.unlink(missing_ok=True)
        key.with_name(key.name + ".pub").unlink(missing_ok=True)
    tool = shutil.which("ssh-keygen")
    if tool is None:
        raise RuntimeError("the image has SSH host keys but no ssh-keygen to make new ones")
    subprocess.run([tool, "-A"] + (["-f", str(prefix)] if prefix is not None else []), check=True,
                   capture_output=True, timeout=60)
    return sorted(k.name for k in (etc / "ssh").glob("ssh_host_*_key"))


MADV_POPULATE_WRITE = 23      # Linux 5.14: fault a mapping's pages in, writable (zero-filled by the kernel)
MIB = 1024 * 1024


def zero_free_memory(roots, keep_mib: int = 16) -> int:
    """In a warm template just before it reports ready (and the node saves it): have the kernel zero-fill
    most free pages by faulting them into a mapping, then give them back. Free pages keep whatever the
    boot left in them (the unpacked initramfs, exited processes); QEMU saves a zero page as a flag, not
    4 KiB, so the saved state is smaller and every clone's restore loads less. The page cache, dentries and
    inodes are kept: dropping them (``vm.drop_caches``) made the state 7% smaller but every clone's
    recontext slower, its opens and reads then going to the disk (docs/benchmarks.md, fourth pass).
    Returns the MiB zeroed (0 when there was too little free)."""
    free = 0
    for line in (roots.proc / "meminfo").read_text().splitlines():
        if line.startswith("MemFree:"):
            free = int(line.split()[1]) * 1024
    size = free - max(keep_mib * MIB, free // 8)
    size -= size % mmap.PAGESIZE
    if size < 4 * MIB:
        return 0
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        try:
            region.madvise(MADV_POPULATE_WRITE)
        except (OSError, ValueError):        # an older kernel: one write per page
            for offset in range(0, size, mmap.PAGESIZE):
                region[offset] = 0
    finally:
        region.close()
    return size // MIB

