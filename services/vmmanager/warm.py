"""Warm snapshots: deploy a real guest by restoring a pre-booted copy instead of booting it.

Per image and node, the node keeps one **warm snapshot**: the image booted once to guestd ready (with a
template context marked ``warm``), its memory state saved (``memory.save``), its disk state frozen as
a read-only backing layer (``disk.qcow2``, an overlay on the cached image). A deploy then puts the
instance's overlay on that layer and restores a clone of the memory state (the ``restore`` phase, in
place of ``power-on`` and ``guest-ready``); guestd, told by the node's ``recontext`` message, takes the
instance's identity (address, MAC, host name, clock, token, a reseeded RNG, new host keys) and starts
its container (guestd/rewake.py).

An image is cloned only if its descriptor allows it (``<boot warmStart="true">``, default false). A
snapshot is used only if everything its saved state depends on is unchanged: the image, the hardware
the descriptor asks for, the node's kernel and network settings, the VMM backend and its hypervisor
and libvirt versions, the machine type (the fingerprint, kept in ``meta.json``). Otherwise, and when a
restore fails, the deploy boots the guest as before, and a failing or stale snapshot is dropped; the
node makes a new one after the next cold boot of a warm-startable image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import printable
from services.descriptor import NSMAP as WS_NSMAP
from services.descriptor import Descriptor
from services.vmmanager import phases, qemuimg
from services.vmmanager.context import build_context, new_token, write_context_iso
from services.vmmanager.store import Instance
from services.vmmanager.vmm import VMMError
from guestd.context import validate as validate_context

log = logging.getLogger(__name__)

FORMAT = 1
MACHINE = "pc"          # the machine type vmm/config.py defines real guests with
TEMPLATE_ADDRESS, TEMPLATE_NETMASK = "169.254.0.2", "255.255.0.0"   # link-local: never a leased address


def allowed(d: Descriptor) -> bool:
    """The descriptor lets the image be cloned from a warm snapshot (``<boot warmStart="true">``)."""
    boot = d.element.find("ws:software/ws:boot", namespaces=WS_NSMAP)
    return boot is not None and boot.get("warmStart", "false").strip() in ("true", "1")


@dataclass(frozen=True)
class Snapshot:
    """One image's warm snapshot on this node."""

    directory: Path
    fingerprint: dict[str, Any]

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def memory(self) -> Path:
        return self.directory / "memory.save"

    @property
    def spares(self) -> Path:
        """Copies of the memory state made ahead of deploys (vmm/saveimage.py, write_spare)."""
        return self.directory / "spares"

    def spare(self) -> Path | None:
        """A whole spare to restore a clone from, or None (the clone's save file is then copied)."""
        found = sorted(self.spares.glob("*.save")) if self.spares.is_dir() else []
        return found[0] if found else None


@dataclass
class _Template:
    """What phases.instance_spec reads of an instance, for the template guest."""

    key: str
    memory: int
    vcpus: int
    mac: str
    token: str


def _file_id(path: str) -> list:
    if not path:
        return []
    try:
        st = os.stat(path)
    except OSError:
        return [path, "missing"]
    return [path, st.st_size, st.st_mtime_ns]


class WarmSnapshots:
    """The node's warm snapshots, one directory each under ``root``, named by their fingerprint."""

    def __init__(self, root: Path, parts: phases.NodeParts) -> None:
        self.root = Path(root)
        self.parts = parts
        self._making: set[str] = set()
        self._filling: dict[Path, int] = {}
        self._lock = threading.Lock()

    @property
    def supported(self) -> bool:
        caps = self.parts.vmm.capabilities
        return caps.real_guest and caps.guest_channel and hasattr(self.parts.vmm, "restore_clone")

    def fingerprint(self, inst: Instance, d: Descriptor) -> dict[str, Any]:
        """Everything the saved state depends on; a snapshot whose fingerprint differs is stale."""
        config = self.parts.config
        el = d.element
        ns = WS_NSMAP
        return {
            "format": FORMAT, "image": inst.sha256, "image_format": inst.format,
            "memory": inst.memory, "vcpus": inst.vcpus, "arch": d.architecture, "machine": MACHINE,
            "vmm": self.parts.vmm.hypervisor_identity(),
            "boot": el.findtext("ws:software/ws:boot/ws:method", namespaces=ns) or "disk",
            "kernel": _file_id(config.kernel), "initrd": _file_id(config.initrd),
            "cmdline": el.findtext("ws:software/ws:boot/ws:cmdline", namespaces=ns) or config.cmdline,
            "disks": [[disk.role, disk.bus, disk.size] for disk in d.disks],
            "serial": el.xpath("ws:hardware/ws:serialPort/ws:type/text()", namespaces=ns),
            "parallel": el.xpath("ws:hardware/ws:parallelPort/ws:type/text()", namespaces=ns),
            "nic": [config.nic_kind, config.nic_source,
                    (el.xpath("ws:hardware/ws:nic/ws:model/text()", namespaces=ns) or ["virtio"])[0]],
        }

    def _dir(self, fingerprint: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        return self.root / f"{fingerprint['image'][:16]}-{digest[:16]}"

    def find(self, inst: Instance, d: Descriptor) -> Snapshot | None:
        """The usable snapshot for this instance, or None (not allowed, missing or stale: boot cold).
        Stale snapshots of the image are removed."""
        if not (self.supported and allowed(d)):
            return None
        fp = self.fingerprint(inst, d)
        want = self._dir(fp)
        for other in self.root.glob(f"{inst.sha256[:16]}-*") if self.root.is_dir() else []:
            if other != want:
                log.info("warm snapshot %s is stale (image, VMM, hardware or kernel changed): removed", other.name)
                shutil.rmtree(other, ignore_errors=True)
        try:
            meta = json.loads((want / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        snap = Snapshot(want, fp)
        if meta != fp or not snap.memory.is_file() or not snap.disk.is_file():
            self.discard(snap, "its files do not match its fingerprint")
            return None
        return snap

    def discard(self, snap: Snapshot, why: str) -> None:
        log.warning("warm snapshot %s dropped: %s", snap.directory.name, why)
        shutil.rmtree(snap.directory, ignore_errors=True)

    def refill(self, snap: Snapshot, executor) -> None:
        """Copy the memory state into spares in the background until the snapshot has ``warm_spares`` of them
        (taking one, a deploy writes only the clone's header: the copy is off the restore's path)."""
        want = self.parts.config.warm_spares
        with self._lock:
            have = len(list(snap.spares.glob("*.save"))) if snap.spares.is_dir() else 0
            missing = want - have - self._filling.get(snap.directory, 0)
            if missing <= 0:
                return
            self._filling[snap.directory] = self._filling.get(snap.directory, 0) + missing

        def run() -> None:
            from services.vmmanager.vmm import saveimage
            try:
                snap.spares.mkdir(exist_ok=True)
                image = saveimage.read(snap.memory)
                saveimage.write_spare(snap.memory, image, snap.spares / f"{secrets.token_hex(8)}.save")
            except Exception as exc:   # noqa: BLE001 - a spare is an optimisation: the deploy copies instead
                log.info("warm snapshot %s: no spare made: %s", snap.directory.name, exc)
            finally:
                with self._lock:
                    left = self._filling.get(snap.directory, 1) - 1
                    if left > 0:
                        self._filling[snap.directory] = left
                    else:
                        self._filling.pop(snap.directory, None)

        for _ in range(missing):
            executor.submit(run)

    def make_later(self, inst: Instance, d: Descriptor, executor) -> None:
        """Make the image's snapshot in the background unless there is one or one is being made."""
        if not (self.supported and allowed(d)) or self.find(inst, d) is not None:
            return
        with self._lock:
            if inst.sha256 in self._making:
                return
            self._making.add(inst.sha256)

        def run() -> None:
            try:
                self.refill(self.make(inst, d), executor)
            except Exception:   # noqa: BLE001 - a snapshot is an optimisation: deploys boot cold meanwhile
                log.exception("making the warm snapshot of image %s failed", inst.image_id)
            finally:
                with self._lock:
                    self._making.discard(inst.sha256)

        executor.submit(run)

    def make(self, inst: Instance, d: Descriptor) -> Snapshot:
        """Boot the image once as a template, wait for guestd ready, save it, freeze its disk."""
        parts = self.parts
        fp = self.fingerprint(inst, d)
        final = self._dir(fp)
        ident = final.name[-12:]
        tpl = _Template(key=f"warm-{ident}", memory=inst.memory, vcpus=inst.vcpus,
                        mac="02:%02x:%02x:%02x:%02x:%02x" % tuple(secrets.token_bytes(5)), token=new_token())
        home = parts.home(tpl.key)
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        part = self.root / f".part-{ident}"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        defined = False
        guarded = ExitStack()
        try:
            disks = []
            for n, disk in enumerate(d.disks):
                if disk.role == "root":
                    path = parts.cache.overlay(inst.sha256, inst.format, part / "disk.qcow2")
                else:
                    path = qemuimg.create_empty(home / f"{disk.role}{n}.qcow2", disk.size)
                disks.append(phases.Disk(path, "qcow2", disk.bus, disk.role))
            ctx = build_context(instance=tpl.key, hostname="vmgrid-warm", mac=tpl.mac, address=TEMPLATE_ADDRESS,
                                netmask=TEMPLATE_NETMASK, token=tpl.token)
            ctx = validate_context({**json.loads(ctx.to_json()), "warm": True})
            iso = write_context_iso(ctx, home / "context.iso")
            spec = phases.instance_spec(parts, tpl, d, disks, iso)
            guarded.enter_context(phases.closed_port(parts, spec))   # bridge mode: no lease, so it sends nothing
            phases.vmm_call("define", parts.vmm.define, spec)
            defined = True
            phases.vmm_call("power on", parts.vmm.start, spec.name)
            channel = parts.vmm.guest_channel(tpl.key)
            status = channel.wait_ready(timeout=parts.config.guest_ready_timeout, poll=0.25)
            if not status.get("ready"):
                raise VMMError(f"the template guest is not ready: {printable(status.get('error'), 500)}")
            # guestd's outbox is FIFO: once this reply is here, no report with the template's token is
            # left queued in the guest to reach a clone's host after the restore
            channel.request("ping", timeout=parts.config.warm_restore_timeout)
            # the channel stays connected through the save: guestd in the saved template waits in its poll on
            # a connected channel, so a clone reads its recontext as soon as it runs (a hang-up before the
            # pause would leave it in its back-off for a host-less port, cold code and up to a back-off step)
            phases.vmm_call("save", parts.vmm.save, tpl.key, part / "memory.save", hang_up=False)
            os.chmod(part / "disk.qcow2", 0o444)         # the frozen backing layer of every clone
            (part / "meta.json").write_text(json.dumps(fp, sort_keys=True, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(part, final)
            log.info("warm snapshot of image %s made: %s", inst.image_id, final.name)
            return Snapshot(final, fp)
        finally:
            if defined:
                for verb in ("destroy", "undefine"):
                    try:
                        getattr(parts.vmm, verb)(tpl.key)
                    except VMMError:
                        pass
            guarded.close()
            shutil.rmtree(home, ignore_errors=True)
            parts.remove_channel(tpl.key)
            shutil.rmtree(part, ignore_errors=True)
