"""The deployment phases after authorization, one small function each, in the order of
``states.PHASES``; a :class:`Recorder` times each one into the instance's PhaseTimings and passes its
crashpoint (the crash tests kill the node there).

Adding a phase: write ``def my_phase(parts, key, rec)`` here, name it in ``states.PHASES`` and call it
from :meth:`services.vmmanager.node.Node._deploy_rest` (or ``_start_instance``) inside ``rec.phase``.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lxml import etree

from guestd.context import FILE_NAME as CONTEXT_FILE
from guestd.sources.iso9660 import read_file as read_iso_file
from services.common.crash import crashpoint
from services.common.errors import printable
from services.wsrf.properties import xml_text
from services.descriptor import NSMAP as WS_NSMAP
from services.descriptor import Descriptor, image_blake3
from services.faults import VMMFault
from services.vmmanager import guestcred, qemuimg
from services.vmmanager.guard import Binding, PortGuard
from services.vmmanager.network import NetworkSetupError
from services.vmmanager.channels import ChannelPaths
from services.vmmanager.config import VMManagerConfig
from services.vmmanager.context import build_context, write_context_iso
from services.vmmanager.imagecache import ImageCache
from services.vmmanager.store import Instance, LeaseRange, NodeStore
from services.vmmanager.vmm import VMM, Disk, GuestChannel, InstanceSpec, KernelBoot, Nic, Port, VMMError, tap_name
from services.vmmanager.vmm.errors import GuestUnavailable, GuestWaitCancelled

log = logging.getLogger(__name__)

# the crashpoint passed after each phase (tests/integration/test_vmmanager_crash.py names them)
CRASHPOINTS = {"register": "deploy.registered", "lease": "deploy.leased", "stage": "deploy.staged",
               "overlay": "deploy.overlay", "context": "deploy.context", "power-on": "deploy.powered-on"}


# a node's hold on an image is asked for this much longer than its instances need: the deployments of the
# image within that time find it covering them and ask the repository nothing
HOLD_SLACK = 600


def image_holder(address: str, image_id: str) -> str:
    """The holder a node's hold on an image names: the node (its public address) and the image."""
    return f"{address}#image:{image_id}"


class ImageHolds:
    """The node's holds on images at the repository: one per image for all of the node's instances of it,
    asked for when a deployment would outlive it (:func:`hold_image`) and released when the last instance
    holding it ends (Node._release). Every instance records the holder before the hold is asked for and
    the hold's id after: the node store is the truth of who still needs a hold; this keeps only what the
    repository granted (id and expiry), in memory. ``lock`` orders asking, recording and releasing."""

    def __init__(self):
        self.lock = threading.RLock()
        self._granted: dict[str, tuple[str, float]] = {}     # image id -> (hold id, expires)

    def covering(self, image_id: str, until: float) -> str | None:
        got = self._granted.get(image_id)
        return got[0] if got is not None and got[1] >= until else None

    def granted(self, image_id: str, hold_id: str, expires: float) -> None:
        self._granted[image_id] = (hold_id, expires)

    def forget(self, image_id: str) -> None:
        self._granted.pop(image_id, None)


@dataclass
class NodeParts:
    """What the phases work with: the node's records, cache, repository access, VMM, configuration."""

    node: str
    config: VMManagerConfig
    store: NodeStore
    cache: ImageCache
    repository: object          # services.vmmanager.repository.RepositoryAccess (or a test's fake)
    vmm: VMM
    pool: LeaseRange
    instances_dir: Path
    address: str = ""           # the node's public VMManager URL (image holds name it)
    holds: ImageHolds = field(default_factory=ImageHolds)
    channels: ChannelPaths | None = None    # where the guests' channel sockets are (None: in their homes)
    guard: PortGuard | None = None          # bridge mode: each guest's tap sends only as its lease (guard.py)

    def home(self, key: str) -> Path:
        return self.instances_dir / key

    def channel_path(self, key: str) -> Path:
        """Instance ``key``'s channel socket: in its home when that path fits a Unix socket, else in the node's
        short private directory (services.vmmanager.channels)."""
        if self.channels is None:
            return self.home(key) / "guestd.sock"
        return self.channels.path(key)

    def remove_channel(self, key: str) -> None:
        if self.channels is not None:
            self.channels.remove(key)


class Recorder:
    """Times the phases of one instance's deployment and passes each phase's crashpoint. The timings are
    kept until :meth:`flush` or :meth:`take` (the next state change writes them in its own transaction):
    a write per phase was most of a warm deployment's SQLite commits."""

    def __init__(self, store: NodeStore, key: str):
        self.store = store
        self.key = key
        self.pending: list[list] = []

    def add(self, name: str, seconds: float) -> None:
        self.pending.append([name, round(seconds, 6)])

    def take(self) -> list[list]:
        """The timings not yet written, for a state change to write (and forgotten here)."""
        pending, self.pending = self.pending, []
        return pending

    def flush(self) -> None:
        if self.pending:
            self.store.add_phases(self.key, self.take())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t)
        if name in CRASHPOINTS:
            crashpoint(CRASHPOINTS[name])


def vmm_call(what: str, fn, *args, **kwargs):
    """A VMM call whose VMMError becomes a VMMFault naming the operation."""
    try:
        return fn(*args, **kwargs)
    except VMMError as exc:
        raise VMMFault(f"{what}: {exc}", operation=what) from None


# -- the phases --------------------------------------------------------------------------------------
def lease(parts: NodeParts, key: str, rec: Recorder | None = None) -> None:
    """A unique address and MAC from the node's range; ``rec``'s pending timings written in the same
    transaction (kept pending if the lease fails)."""
    timings = rec.take() if rec is not None else []
    try:
        with parts.store.transaction():
            parts.store.lease(key, parts.pool)
            if timings:
                parts.store.add_phases(key, timings)
    except BaseException:
        if rec is not None:
            rec.pending[:0] = timings
        raise


def stage(parts: NodeParts, key: str) -> None:
    """The image into the node cache (GridFTP, verified; once per node), and a hold on it at the repository
    for as long as the instance may live."""
    inst = parts.store.get(key)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 0.5:
            last[0] = time.monotonic()
            parts.store.update(key, staged_bytes=done)

    _, cached = parts.cache.get(inst.image_id, inst.sha256, inst.size, inst.format, progress,
                                blake3=image_blake3(inst.descriptor))
    until = inst.termination + parts.config.hold_grace
    with parts.holds.lock:
        holder = image_holder(parts.address, inst.image_id)
        hold = parts.holds.covering(inst.image_id, until)
        if hold is None:
            # the intent first: a node killed before it records the hold's id finds the hold by its holder
            parts.store.update(key, hold_holder=holder)
            hold = hold_image(parts, inst.image_id, holder, until)
        crashpoint("stage.held")
        parts.store.update(key, staged_bytes=inst.size, cached=1 if cached else 0, hold_id=hold, hold_holder=holder)


def hold_image(parts: NodeParts, image_id: str, holder: str, until: float) -> str:
    """The node's hold on an image lasting at least until ``until``: the one it has when that covers it,
    else the repository's (a new hold, or the holder's renewed), asked for HOLD_SLACK longer. Called under
    ``parts.holds.lock``."""
    shared = holder == image_holder(parts.address, image_id)   # not an instance's own (a node state of before)
    hold = parts.holds.covering(image_id, until) if shared else None
    if hold is None:
        parts.store.sync_pending()     # what the node recorded (the hold's intent) on the disk before it asks
        hold, expires = parts.repository.hold_until(image_id, holder, int(until - time.time()) + HOLD_SLACK)
        if shared:
            parts.holds.granted(image_id, hold, expires)
    return hold


def overlay(parts: NodeParts, inst: Instance, d: Descriptor, base: Path | None = None) -> list[Disk]:
    """The copy-on-write overlay on the cached image (or on ``base``, a warm snapshot's frozen disk),
    and empty data/scratch disks."""
    home = parts.home(inst.key)
    disks = []
    for n, disk in enumerate(d.disks):
        if disk.role == "root" and base is not None:
            path = qemuimg.create_overlay(base, "qcow2", home / "root.qcow2")
        elif disk.role == "root":
            path = parts.cache.overlay(inst.sha256, inst.format, home / "root.qcow2")
        else:
            path = qemuimg.create_empty(home / f"{disk.role}{n}.qcow2", disk.size)
        disks.append(Disk(path, "qcow2", disk.bus, disk.role))
    return disks


def context(parts: NodeParts, inst: Instance, d: Descriptor) -> Path:
    """guestd's context (address, hostname, container, token) as an ISO 9660 image for a virtual CD-ROM."""
    command = shlex.split(d.container_command) if d.container_command else None
    ctx = build_context(instance=inst.key, hostname=inst.identifier.replace(".", "-").replace("_", "-")[:63],
                        mac=inst.mac, address=inst.address, netmask=str(parts.pool.network.netmask),
                        gateway=parts.pool.gateway, dns=parts.config.dns, container_command=command,
                        token=inst.token, grid=guestcred.grid_context(parts.config, inst.owner))
    # built just now with the host's time: written as it is, not read back, checked and timed once more
    return write_context_iso(ctx, parts.home(inst.key) / "context.iso", refresh_time=False)


def sync_guard(parts: NodeParts, strict: bool = False) -> None:
    """The bridge guard made to hold the node's bound taps (services/vmmanager/guard.py). ``strict``: a guard
    that cannot be set is a VMMFault (a guest is about to run: it must not run unguarded); else it is logged
    (an instance going away: its tap goes with it)."""
    if parts.guard is None:
        return
    try:
        parts.guard.sync(lambda: [Binding(*row) for row in parts.store.port_bindings()])   # read under its lock
    except (NetworkSetupError, ValueError) as exc:
        if strict:
            raise VMMFault(f"the guest network's guard: {exc}", operation="guard") from None
        log.error("the guest network's guard could not be updated: %s", exc)


def bind_port(parts: NodeParts, spec: InstanceSpec) -> None:
    """Bridge mode: instance ``spec.name``'s tap (named after the domain's UUID) may send only as the instance's
    lease, from before the VMM first runs it (deploy, a warm clone, a migration's arrival)."""
    if parts.guard is None:
        return
    parts.store.bind_port(spec.name, tap_name(spec.uuid, 0))
    sync_guard(parts, strict=True)


@contextmanager
def closed_port(parts: NodeParts, spec: InstanceSpec) -> Iterator[None]:
    """Bridge mode: the tap of ``spec`` (a warm snapshot's template, which holds no lease) sends nothing."""
    if parts.guard is None:
        yield
        return
    tap = tap_name(spec.uuid, 0)
    parts.guard.closed.add(tap)
    try:
        sync_guard(parts, strict=True)
        yield
    finally:
        parts.guard.closed.discard(tap)
        sync_guard(parts)


def power_on(parts: NodeParts, spec: InstanceSpec, paused: bool) -> None:
    """Define the domain and start it (or leave it paused), its tap guarded from the start (bridge mode)."""
    bind_port(parts, spec)
    vmm_call("define", parts.vmm.define, spec)
    vmm_call("power on", parts.vmm.start, spec.name, paused=paused)


KEPT_CONSOLES = 32                 # consoles of guests that never got ready, kept for the site (the newest)
KEPT_CONSOLE_BYTES = 1 << 20       # the end of each


def keep_console(parts: NodeParts, key: str) -> Path | None:
    """Copy the end of a guest's serial console (its descriptor's first file serial port) out of its home,
    which goes with the instance, to ``consoles/<key>.log`` beside the instances: what the site reads when a
    guest never got ready. Keeps the newest :data:`KEPT_CONSOLES`; None when the guest has no console file."""
    consoles = sorted(parts.home(key).glob("serial*.log"))
    if not consoles:
        return None
    kept_dir = parts.instances_dir.parent / "consoles"
    try:
        kept_dir.mkdir(exist_ok=True)
        with open(consoles[0], "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - KEPT_CONSOLE_BYTES))
            data = f.read(KEPT_CONSOLE_BYTES)
        kept = kept_dir / f"{key}.log"
        kept.write_bytes(data)
        for old in sorted(kept_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)[:-KEPT_CONSOLES]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("instance %s: its console could not be kept: %s", key, exc)
        return None
    return kept


def guest_ready(parts: NodeParts, key: str, cancel: threading.Event) -> None:
    """Wait for guestd's ready report over the guest channel; its summary becomes GuestStatus (Deploy and
    Start). ``cancel`` (a Destroy, the node stopping) ends the wait with GuestWaitCancelled; no ready
    report within guest_ready_timeout is a VMMFault: the guest is untrusted, the node never waits longer."""
    try:
        # a short poll: a ready report is noticed within a quarter second, not a 2 s step
        report = parts.vmm.guest_channel(key).wait_ready(timeout=parts.config.guest_ready_timeout, poll=0.25,
                                                         cancel=cancel)
    except GuestWaitCancelled:
        raise
    except VMMError as exc:
        parts.store.update(key, guest_status=f"no report: {exc}")
        kept = keep_console(parts, key)
        where = (f"; the end of its serial console is kept in {kept} on node {parts.node}" if kept else
                 "; its descriptor has no file serial port, so the node has no console log of it")
        raise VMMFault(f"guestd did not report ready: {exc}{where}", operation="guest-ready") from None
    summary = guest_summary(report)
    note = grid_container(parts, key, report)
    parts.store.update(key, guest_status=summary if note is None else f"{summary}; {note}")


def grid_container(parts: NodeParts, key: str, report: dict) -> str | None:
    """The grid container's certificate, when guestd asked for one (services/vmmanager/guestcred.py)."""
    inst = parts.store.get(key)
    hostname = inst.identifier.replace(".", "-").replace("_", "-")[:63]
    return guestcred.deliver(parts.config, parts.vmm.guest_channel(key), report, inst.address, hostname,
                             parts.home(key))


def restore(parts: NodeParts, spec: InstanceSpec, snapshot, iso: Path, cancel: threading.Event) -> None:
    """Instead of power-on and guest-ready: a clone of the image's warm snapshot (``snapshot``, a
    services.vmmanager.warm.Snapshot) restored on the instance's overlay, then guestd's ``recontext``:
    the instance's context (read back from its context ISO), a random seed and the host clock. guestd
    answers with its status once it has the new identity and its container runs (GuestStatus).

    The recontext is sent while libvirt still restores: as soon as the clone's channel socket listens,
    so it waits in the socket and guestd reads it the moment the guest runs (no connect, no wake-up
    after the restore). The guest clock it sets is then as old as the rest of the restore: a
    ``set-time`` follows the answer."""
    key = spec.name
    with open(iso, "rb") as f:
        ctx = json.loads(read_iso_file(f, CONTEXT_FILE))
    bind_port(parts, spec)
    early = _EarlyRecontext(parts, key, spec.channel.path, ctx, cancel)
    t = time.perf_counter()
    try:
        spared = vmm_call("restore", parts.vmm.restore_clone, snapshot.memory, spec, parts.home(key) / "warm.save",
                          spare=snapshot.spare())
    except BaseException:
        early.abandon()
        raise
    restored = time.perf_counter() - t
    try:
        status = early.result(parts.config.warm_restore_timeout)
        answered = time.perf_counter() - t - restored
        if status is None:       # not sent early (the socket was never seen, or the connection failed): now
            ctx["time"] = time.time()
            status = _recontext(parts, key, ctx, cancel)
        else:
            parts.vmm.guest_channel(key).set_time(timeout=parts.config.warm_restore_timeout)
    except GuestWaitCancelled:
        raise
    except VMMError as exc:
        raise VMMFault(f"guestd did not take its context after the warm restore: {exc}", operation="restore") from None
    took = time.perf_counter() - t - restored
    log.info("instance %s: warm clone restored in %.2f s (%s), guestd took its identity in %.2f s (%s, answered after "
             "%.3f s, set-time %.3f s; in the guest: %s)", key, restored, "from a spare" if spared else "save file copied",
             took, "sent during the restore" if early.sent else "sent after the restore", answered, took - answered,
             printable(status.get("recontext_seconds"), 400))    # the guest's words: escaped, cut
    if not status.get("ready"):
        parts.store.update(key, guest_status=guest_summary(status))
        raise VMMFault(f"guestd is not ready after the warm restore: {printable(status.get('error'), 500)}",
                       operation="restore")
    # the clone's grid step made its own key (the template had no grid context): its certificate, as after a boot
    note = grid_container(parts, key, status)
    parts.store.update(key, guest_status=guest_summary(status) if note is None else f"{guest_summary(status)}; {note}")


def _recontext(parts: NodeParts, key: str, ctx: dict, cancel: threading.Event) -> dict:
    return parts.vmm.guest_channel(key).request(
        "recontext", timeout=parts.config.warm_restore_timeout, cancel=cancel,
        context=ctx, seed=secrets.token_hex(64), time=time.time())


class _EarlyRecontext:
    """The recontext request on a thread of its own, sent once the clone's channel socket exists (libvirt
    listens on it before QEMU runs). ``result`` is guestd's answer, or None when nothing was sent."""

    POLL = 0.005           # seconds between looks for the socket
    RESTORE_LIMIT = 600.0  # seconds a restore may take before the early request gives up by itself

    def __init__(self, parts: NodeParts, key: str, socket_path: Path, ctx: dict, cancel: threading.Event) -> None:
        self.parts, self.key, self.path, self.ctx, self.cancel = parts, key, Path(socket_path), ctx, cancel
        self.sent = False
        self._stop = threading.Event()
        self._abort = threading.Event()      # the request's own cancel: the deploy's, or result() gave up
        self._done = threading.Event()
        self._status: dict | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name=f"recontext-{key}", daemon=True).start()

    def _run(self) -> None:
        try:
            while not self.path.exists():
                if self._stop.wait(self.POLL) or self.cancel.is_set():
                    return
            channel = self.parts.vmm.guest_channel(self.key)
            try:
                channel.connect()
            except VMMError:
                return           # not listening yet after all: the request goes after the restore
            self.sent = True
            # its time limit is result()'s, counted from the end of the restore: this one only bounds the thread
            self._status = self.parts.vmm.guest_channel(self.key).request(
                "recontext", timeout=self.parts.config.warm_restore_timeout + self.RESTORE_LIMIT, cancel=self._abort,
                context={**self.ctx, "time": time.time()}, seed=secrets.token_hex(64), time=time.time())
        except BaseException as exc:   # noqa: BLE001 - handed to the deploy's thread by result()
            self._error = exc
        finally:
            self._done.set()

    def abandon(self) -> None:
        self._stop.set()
        self._abort.set()

    def result(self, timeout: float) -> dict | None:
        """guestd's answer, waited for at most ``timeout`` seconds from now (the end of the restore), as a
        recontext sent after the restore would be; None when it was not sent."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while not self._done.wait(max(0.0, min(0.1, deadline - time.monotonic()))):
            if self.cancel.is_set():
                self._abort.set()
                raise GuestWaitCancelled(f"the deploy of {self.key} was cancelled during its recontext")
            if time.monotonic() >= deadline:
                self._abort.set()
                raise GuestUnavailable(f"guestd in {self.key} did not answer recontext within {timeout:g} s "
                                       "after the restore")
        if self._error is not None and self.sent:
            raise self._error
        return self._status if self.sent else None


def guest_summary(status: dict) -> str:
    """guestd's status in one line for the GuestStatus property: ready or not, the steps that failed,
    the address it set on which interface, and the grid container's state. Every word of it is the guest's
    (untrusted): each is shown escaped and cut, and the line is at most SUMMARY_LIMIT characters."""
    def g(value: object, limit: int = 200) -> str:
        return xml_text(printable(value, limit))      # and nothing XML cannot carry (a lone surrogate)

    if not isinstance(status, dict):
        return "not ready: guestd's status is not an object"
    if not status.get("ready"):
        return g(f"not ready: {g(status.get('error') or 'no ready report', SUMMARY_LIMIT)}", SUMMARY_LIMIT)
    steps = status.get("steps") if isinstance(status.get("steps"), dict) else {}
    failed = sorted(g(n, 64) for n, r in steps.items() if isinstance(r, dict) and not r.get("ok", True))
    parts = ["ready" if not failed else f"ready, failed steps: {', '.join(failed[:16])}"
             + (f" (and {len(failed) - 16} more)" if len(failed) > 16 else "")]
    network = steps.get("network")
    net = network.get("detail") if isinstance(network, dict) else None
    if isinstance(net, dict) and net.get("address"):
        parts.append(f"address {g(net['address'], 64)}/{g(net.get('netmask', '?'), 64)} "
                     f"on {g(net.get('interface', '?'), 64)}")
    container = status.get("container")
    if isinstance(container, dict) and container:
        parts.append(f"container {'running' if container.get('running') else 'not running'}"
                     + (f" (pid {g(container['pid'], 20)})" if container.get("pid") else ""))
    return g("; ".join(parts), SUMMARY_LIMIT)


SUMMARY_LIMIT = 1000    # characters of GuestStatus made from guestd's status


def instance_spec(parts: NodeParts, inst: Instance, d: Descriptor, disks: list[Disk], iso: Path) -> InstanceSpec:
    """What the VMM defines: hardware from the descriptor, disks, the context CD-ROM, the leased NIC."""
    home = parts.home(inst.key)
    config = parts.config
    boot = None
    if d.element.findtext("ws:software/ws:boot/ws:method", namespaces=WS_NSMAP) == "kernel":
        if not config.kernel:
            raise VMMFault("the image boots a kernel, and this node has none configured ([vmmanager] kernel)",
                           operation="define")
        cmdline = d.element.findtext("ws:software/ws:boot/ws:cmdline", namespaces=WS_NSMAP) or config.cmdline
        boot = KernelBoot(Path(config.kernel), Path(config.initrd) if config.initrd else None, cmdline)
    serial = tuple(Port(t, home / f"serial{n}.log" if t == "file" else None) for n, t in enumerate(
        d.element.xpath("ws:hardware/ws:serialPort/ws:type/text()", namespaces=WS_NSMAP)))
    parallel = tuple(Port(t, home / f"parallel{n}.log" if t == "file" else None) for n, t in enumerate(
        d.element.xpath("ws:hardware/ws:parallelPort/ws:type/text()", namespaces=WS_NSMAP)))
    models = d.element.xpath("ws:hardware/ws:nic/ws:model/text()", namespaces=WS_NSMAP) or ["virtio"]
    nic = Nic(inst.mac, config.nic_kind, config.nic_source or None, models[0])
    channel = None
    if parts.vmm.capabilities.guest_channel:
        try:
            channel = GuestChannel(parts.channel_path(inst.key), inst.token)
        except ValueError as exc:      # channels.ChannelDirError: an unsafe or unmakeable short directory
            raise VMMFault(f"the guest channel of {inst.key}: {exc}", operation="define") from None
    return InstanceSpec(name=inst.key, memory_mib=inst.memory, vcpus=inst.vcpus, arch=d.architecture,
                        disks=tuple(disks), cdroms=(iso,), serial_ports=serial, parallel_ports=parallel,
                        nics=(nic,), boot=boot, channel=channel)


def descriptor_of(inst: Instance) -> Descriptor:
    return Descriptor(etree.fromstring(inst.descriptor))
