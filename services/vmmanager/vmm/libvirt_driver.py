"""The VMM through libvirt: one base class and its two backends (the test driver and QEMU).

Backend differences are data (capabilities, domain type, URI) plus the few quirks kept in small
overridable methods here, never in callers.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import logging
import os
import pwd
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar, Iterable

import libvirt

from . import capscache, config, saveimage
from .channel import GuestChannelClient
from .driver import (VMM, Capabilities, EventCallback, InstanceInfo, InstanceState, LifecycleEvent,
                     LifecycleEventKind)
from .errors import GuestUnavailable, IllegalState, InstanceExists, InvalidSpec, VMMError
from .host import open_connection, translate
from .spec import InstanceSpec

log = logging.getLogger(__name__)

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: InstanceState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: InstanceState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: InstanceState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: InstanceState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: InstanceState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: InstanceState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: InstanceState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: InstanceState.SUSPENDED,
}
_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: LifecycleEventKind.DEFINED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: LifecycleEventKind.UNDEFINED,
    libvirt.VIR_DOMAIN_EVENT_STARTED: LifecycleEventKind.STARTED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: LifecycleEventKind.PAUSED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: LifecycleEventKind.RESUMED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: LifecycleEventKind.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: LifecycleEventKind.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: LifecycleEventKind.SUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: LifecycleEventKind.CRASHED,
}
_EVENT_PREFIX = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "DEFINED", libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "UNDEFINED",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "STARTED", libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "SUSPENDED",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "RESUMED", libvirt.VIR_DOMAIN_EVENT_STOPPED: "STOPPED",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "SHUTDOWN", libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "PMSUSPENDED",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "CRASHED",
}


@functools.lru_cache(maxsize=256)
def _event_detail(event: int, detail: int) -> str:
    """The detail's name (libvirt's VIR_DOMAIN_EVENT_<EVENT>_<DETAIL>, lower case), looked up once per pair:
    the scan of libvirt's names was a few per cent of a test-driver node's CPU per deploy+destroy."""
    prefix = f"VIR_DOMAIN_EVENT_{_EVENT_PREFIX.get(event, '?')}_"
    for name in dir(libvirt):
        if name.startswith(prefix) and getattr(libvirt, name) == detail:
            return name[len(prefix):].lower()
    return str(detail)


class LibvirtDriver(VMM):
    """The VMM interface over one libvirt connection (one node)."""

    domain_type: ClassVar[str]
    resume_sync_timeout: float = 2.0   # seconds guestd gets to confirm the clock after resume/restore
    clock_tolerance: float = 0.05     # seconds; sync_guest_time retries set-time above this

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._conn = open_connection(uri)
        self._lock = threading.Lock()
        self._channels: dict[str, GuestChannelClient] = {}
        self._subscribers: dict[int, tuple[EventCallback, frozenset[int] | None]] = {}
        # libvirt's lifecycle events the subscribers want (None: every one); libvirt cannot be asked for some of
        # them only, so the others are dropped here before anything is built for them (a deploy+destroy on the
        # test driver brings five: defined, started, stopped, undefined, and the node wants the stop only)
        self._wanted: frozenset[int] | None = frozenset()
        self._handles = itertools.count(1)
        self._event_id = self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def node(self) -> str:
        return self._uri

    def _domain(self, instance: str) -> libvirt.virDomain:
        try:
            return self._conn.lookupByName(config.domain_name(instance))
        except libvirt.libvirtError as exc:
            raise translate(exc, f"instance {instance!r}") from None

    @staticmethod
    def _state_of(dom: libvirt.virDomain) -> InstanceState:
        state, reason = dom.state()
        if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_SAVED:
            return InstanceState.SAVED
        return _STATES.get(state, InstanceState.UNKNOWN)

    def _expect(self, instance: str, dom: libvirt.virDomain, verb: str, *allowed: InstanceState) -> InstanceState:
        state = self._state_of(dom)
        if state not in allowed:
            raise IllegalState(instance, state.value, verb)
        return state

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except libvirt.libvirtError as exc:
            raise translate(exc, what) from None

    def _drop_channel(self, instance: str, why: str = "the instance stopped") -> None:
        """Retire the instance's channel: a wait on it (a deploy's guest-ready phase) ends at once."""
        with self._lock:
            ch = self._channels.pop(instance, None)
        if ch is not None:
            ch.retire(why)

    def _on_lifecycle(self, _conn, dom, event: int, detail: int, _opaque) -> None:
        wanted = self._wanted
        if event not in _EVENTS or (wanted is not None and event not in wanted):
            return
        instance = config.instance_name(dom.name())
        if instance is None:
            return
        ev = LifecycleEvent(instance, _EVENTS[event], _event_detail(event, detail), self._uri)
        for callback, events in list(self._subscribers.values()):
            if events is not None and event not in events:
                continue
            try:
                callback(ev)
            except Exception:
                log.exception("lifecycle subscriber failed on %s", ev)

    def _check_files(self, spec: InstanceSpec) -> None:
        """Backends running real guests check the files exist; the test driver needs none."""

    def _restore(self, path: Path, xml: str, relocated: bool, paused: bool) -> None:
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        self._conn.restoreFlags(str(path), xml if relocated else None, flags)

    @contextlib.contextmanager
    def _launching(self, instance: str):
        """Around every start and restore (a hypervisor process may be launched): nothing here."""
        yield

    def _request_shutdown(self, dom: libvirt.virDomain) -> None:
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)

    def _start(self, dom: libvirt.virDomain, paused: bool) -> None:
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)

    def _refuse_defined(self, spec: InstanceSpec) -> None:
        """InstanceExists if a domain of that name or UUID is already defined here."""
        for lookup, key in ((self._conn.lookupByName, config.domain_name(spec.name)),
                            (self._conn.lookupByUUIDString, spec.uuid)):
            try:
                lookup(key)
            except libvirt.libvirtError:
                continue
            raise InstanceExists(f"instance {spec.name!r} (uuid {spec.uuid}) is already defined on {self._uri}")

    # -- the verbs --------------------------------------------------------------------------------
    def define(self, spec: InstanceSpec) -> None:
        spec.validate()
        self._check_files(spec)
        self._refuse_defined(spec)
        self._call(f"define {spec.name}", self._conn.defineXML, config.domain_xml(spec, self.domain_type))

    def start(self, instance: str, paused: bool = False) -> None:
        dom = self._domain(instance)
        self._expect(instance, dom, "start", InstanceState.SHUTOFF)
        self._drop_channel(instance, "the instance was started again")
        with self._launching(instance):
            self._call(f"start {instance}", self._start, dom, paused)

    def pause(self, instance: str) -> None:
        dom = self._domain(instance)
        self._expect(instance, dom, "pause", InstanceState.RUNNING)
        self._call(f"pause {instance}", dom.suspend)

    def resume(self, instance: str, sync: bool = True) -> bool:
        dom = self._domain(instance)
        self._expect(instance, dom, "resume", InstanceState.PAUSED)
        self._call(f"resume {instance}", dom.resume)
        return self._sync_after_wake(instance) if sync else False

    def sync_after_wake(self, instance: str) -> bool:
        """Set the guest clock after a wake-up, as resume does: True when guestd confirmed it (False, logged,
        when the backend has no guest channel or guestd did not answer in resume_sync_timeout)."""
        return self._sync_after_wake(instance)

    def _sync_after_wake(self, instance: str) -> bool:
        if not self.capabilities.guest_channel or self.spec_of(instance).channel is None:
            return False
        try:
            self.sync_guest_time(instance, timeout=self.resume_sync_timeout)
            return True
        except VMMError as exc:
            log.warning("instance %s: guest clock not set after wake-up: %s", instance, exc)
            return False

    def save(self, instance: str, path: Path, hang_up: bool = True) -> None:
        path = Path(path)
        if path.exists():
            raise InvalidSpec(f"save file {path} exists already")
        if not path.parent.is_dir():
            raise InvalidSpec(f"save directory {path.parent} does not exist")
        dom = self._domain(instance)
        self._expect(instance, dom, "save", InstanceState.RUNNING, InstanceState.PAUSED)
        if hang_up:
            self._drop_channel(instance, "the instance was saved")
        try:
            self._call(f"save {instance}", dom.save, str(path))
        finally:
            self._drop_channel(instance, "the instance was saved")

    def restore(self, path: Path, spec: InstanceSpec | None = None, paused: bool = False, sync: bool = True) -> str:
        path = Path(path)
        if not path.is_file():
            raise InvalidSpec(f"save file {path} does not exist")
        saved_xml = self._call(f"read save file {path}", self._conn.saveImageGetXMLDesc, str(path), 0)
        instance = config.spec_from_xml(saved_xml).name
        xml = config.relocate(saved_xml, spec) if spec is not None else saved_xml
        macs = [n.mac for n in spec.nics] if spec is not None else None
        try:
            dom = self._conn.lookupByName(config.domain_name(instance))
            self._expect(instance, dom, "restore", InstanceState.SHUTOFF, InstanceState.SAVED)
        except libvirt.libvirtError:
            dom = None
        if macs is None and dom is not None:    # the definition's MACs (a migrated instance's: the lease here)
            try:
                macs = [n.mac for n in self.spec_of(instance).nics]
            except VMMError:
                macs = None
        if spec is not None:
            self._check_files(spec)
        self._drop_channel(instance, "the instance was restored")
        self._call(f"define {instance} for restore", self._conn.defineXML, xml)
        try:
            with self._launching(instance):
                self._restore(path, xml, spec is not None, paused)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"restore {instance} from {path}") from None
        self._define_macs(instance, xml, macs)
        if sync and not paused:
            self._sync_after_wake(instance)
        return instance

    def _define_macs(self, instance: str, xml: str, macs: list[str] | None) -> None:
        """libvirt restores a domain only with the MACs it was saved with (the guest's ABI): after a migration the
        running domain keeps the source's MAC. Its persistent definition takes ``macs`` (the spec's, or those the
        definition had before a later save and restore), so the next Start boots with them (the lease of this
        node); the running domain is left as it is. Logged, not raised: the restore itself succeeded."""
        if not macs or macs == [n.mac for n in config.spec_from_xml(xml).nics]:
            return
        try:
            self._conn.defineXML(config.with_macs(xml, macs))
        except (libvirt.libvirtError, InvalidSpec) as exc:
            log.warning("instance %s: the definition keeps the saved MACs (not %s): %s", instance, ", ".join(macs),
                        exc)

    # -- warm-snapshot clones (services/vmmanager/warm.py) ------------------------------------------
    def hypervisor_identity(self) -> dict[str, str]:
        """What a save file depends on besides its devices: backend, hypervisor and libvirt versions."""
        return {"backend": self.backend, "type": self._call("read the hypervisor", self._conn.getType),
                "hypervisor": str(self._call("read the hypervisor version", self._conn.getVersion)),
                "libvirt": str(self._call("read the libvirt version", self._conn.getLibVersion))}

    def restore_clone(self, template: Path, spec: InstanceSpec, work: Path, paused: bool = False,
                      spare: Path | None = None) -> bool:
        """Start instance ``spec`` from the save file ``template`` of another (a warm-snapshot template):
        its memory and device state, the spec's name, UUID, MAC and files. ``work`` is the clone's own
        save file while libvirt reads it (removed after): ``spare`` (saveimage.write_spare of ``template``)
        when there is one, re-headed in place, else a copy. The guest clock is left alone: the caller's
        first message to guestd is its new context, with the time. True when a spare served."""
        if not self.capabilities.real_guest:
            raise VMMError(f"{self.backend} has no real guest to clone from a save file")
        spec.validate()
        self._check_files(spec)
        self._refuse_defined(spec)
        image = saveimage.read(Path(template))
        xml = config.clone_xml(image.xml, spec)
        work = Path(work)
        try:
            spared = spare is not None and saveimage.take_spare(Path(spare), Path(template), image, xml, work)
            if not spared:
                saveimage.write_clone(Path(template), image, xml, work)
            self._drop_channel(spec.name, "the instance was cloned")
            self._call(f"define {spec.name} for a warm start", self._conn.defineXML, xml)
            flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
            with self._launching(spec.name):
                self._call(f"restore {spec.name} from {template}", self._conn.restoreFlags, str(work), None, flags)
        finally:
            work.unlink(missing_ok=True)
        return spared

    def shutdown(self, instance: str, timeout: float = 60.0, cancel: threading.Event | None = None) -> bool:
        dom = self._domain(instance)
        self._expect(instance, dom, "shut down", InstanceState.RUNNING, InstanceState.SHUTTING_DOWN)
        self._drop_channel(instance, "the instance is shutting down")
        try:
            self._request_shutdown(dom)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"shut down {instance}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._state_of(dom) in (InstanceState.SHUTOFF, InstanceState.CRASHED):
                return True
            if cancel is not None and cancel.wait(0.1):   # a Destroy or the node stopping: do not wait on
                log.info("instance %s: waiting for the power-off was cut short: forcing it off", instance)
                break
            if cancel is None:
                time.sleep(0.1)
        else:
            log.info("instance %s ignored the power button for %.0f s: forcing it off", instance, timeout)
        self.destroy(instance)
        return False

    def destroy(self, instance: str) -> None:
        dom = self._domain(instance)
        self._drop_channel(instance, "the instance was destroyed")
        if self._state_of(dom) in (InstanceState.SHUTOFF, InstanceState.SAVED):
            return
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if self._state_of(dom) not in (InstanceState.SHUTOFF, InstanceState.SAVED):
                raise translate(exc, f"destroy {instance}") from None

    def undefine(self, instance: str) -> None:
        dom = self._domain(instance)
        self._expect(instance, dom, "undefine", InstanceState.SHUTOFF, InstanceState.SAVED, InstanceState.CRASHED)
        self._drop_channel(instance, "the instance was undefined")
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError:
            self._call(f"undefine {instance}", dom.undefine)

    def state(self, instance: str) -> InstanceState:
        dom = self._domain(instance)
        try:
            return self._state_of(dom)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"state of {instance}") from None

    def list_instances(self) -> list[InstanceInfo]:
        out = []
        for dom in self._call("list instances", self._conn.listAllDomains, 0):
            instance = config.instance_name(dom.name())
            if instance is None:
                continue
            try:
                out.append(InstanceInfo(instance, dom.UUIDString(), self._state_of(dom), bool(dom.isPersistent())))
            except libvirt.libvirtError:  # vanished while listing
                continue
        return sorted(out, key=lambda i: i.name)

    def spec_of(self, instance: str) -> InstanceSpec:
        dom = self._domain(instance)
        # the persistent definition: after a restore on another node it holds this node's paths
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if dom.isPersistent() else 0
        return config.spec_from_xml(self._call(f"read {instance}", dom.XMLDesc, flags))

    def guest_channel(self, instance: str) -> GuestChannelClient:
        self.require("guest_channel")
        spec = self.spec_of(instance)
        if spec.channel is None:
            raise InvalidSpec(f"instance {instance!r} was defined without a guest channel")
        with self._lock:
            ch = self._channels.get(instance)
            if ch is None or ch.path != spec.channel.path:
                if ch is not None:
                    ch.retire("the instance's channel moved")
                ch = self._channels[instance] = GuestChannelClient(instance, spec.channel.path, spec.channel.token)
        return ch

    def sync_guest_time(self, instance: str, timeout: float = 5.0) -> float:
        self.require("guest_channel")
        state = self.state(instance)
        if state != InstanceState.RUNNING:
            raise IllegalState(instance, state.value, "set the guest clock of")
        channel = self.guest_channel(instance)
        offset = 0.0
        for _ in range(3):
            channel.set_time(timeout=timeout)
            # measure what is left, NTP-style: the guest's clock against the midpoint of the round trip
            t1 = time.time()
            guest = channel.request("ping", timeout).get("time")
            t2 = time.time()
            if not isinstance(guest, (int, float)):
                raise GuestUnavailable(f"guestd in {instance} answered ping without its clock")
            offset = float(guest) - (t1 + t2) / 2
            if abs(offset) <= self.clock_tolerance:
                break
        return offset

    def subscribe(self, callback: EventCallback, kinds: Iterable[LifecycleEventKind] | None = None) -> int:
        events = None if kinds is None else frozenset(e for e, k in _EVENTS.items() if k in set(kinds))
        handle = next(self._handles)
        with self._lock:
            self._subscribers[handle] = (callback, events)
            self._rewant()
        return handle

    def unsubscribe(self, handle: int) -> None:
        with self._lock:
            self._subscribers.pop(handle, None)
            self._rewant()

    def _rewant(self) -> None:
        """The union of what the subscribers want (with the lock held)."""
        wanted: set[int] = set()
        for _, events in self._subscribers.values():
            if events is None:
                self._wanted = None
                return
            wanted |= events
        self._wanted = frozenset(wanted)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.retire("the node's VMM connection closed")
        if self._conn is not None:
            try:
                self._conn.domainEventDeregisterAny(self._event_id)
            except libvirt.libvirtError:
                pass
            self._conn.close()
            self._conn = None


class LibvirtTestDriver(LibvirtDriver):
    """libvirt's built-in test hypervisor, in-process: the embedded default VMM (no real guest).

    ``test:///default`` is one node per process (state shared by every connection in the process);
    ``private_node()`` opens a node of its own (a test:///<file> connection), e.g. a migration target.
    """

    backend = "libvirt-test"
    domain_type = "test"
    capabilities = Capabilities(guest_channel=False, acpi_shutdown=False, device_attach=False,
                                live_migration=False, console=False, real_guest=False)

    def __init__(self, uri: str = "test:///default") -> None:
        super().__init__(uri)

    @classmethod
    def private_node(cls) -> "LibvirtTestDriver":
        fd, node_file = tempfile.mkstemp(prefix="vmgrid-node-", suffix=".xml")
        try:
            os.write(fd, b"<node/>\n")
            os.close(fd)
            return cls(f"test://{node_file}")
        finally:
            os.unlink(node_file)

    def _restore(self, path: Path, xml: str, relocated: bool, paused: bool) -> None:
        # The test driver refuses a replacement XML; the persistent definition (already relocated
        # by restore) holds this node's paths, which is all a simulated guest has.
        self._conn.restore(str(path))
        if paused:
            self._conn.lookupByName(config.domain_name(config.spec_from_xml(xml).name)).suspend()

    def _request_shutdown(self, dom: libvirt.virDomain) -> None:
        dom.shutdown()  # no ACPI in the test driver: its guest powers off at once

    def _start(self, dom: libvirt.virDomain, paused: bool) -> None:
        dom.create()    # the test driver has no start-paused flag: start, then freeze at once
        if paused:
            dom.suspend()


QEMU_CONF = """\
# Written by vmgrid for qemu:///embed: run QEMU as root without a security driver or virtlogd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
"""
QEMU_USER = "libvirt-qemu"
PROBE_DOMAIN = "capability-probe"   # the throw-away domain of LibvirtQemuDriver._load_storage_module
EVENT_SWITCH_INTERVAL = 0.0005   # seconds: sys.setswitchinterval in a process that embeds QEMU (see below)
_embed_lock = threading.Lock()
_embed_root: Path | None = None
PR_SET_CHILD_SUBREAPER = 36
_subreaper_lock = threading.Lock()
_subreaper_users = 0


def _subreaper(delta: int) -> None:
    """This process adopts orphaned descendants while at least one launch is under way (see _launching)."""
    global _subreaper_users
    with _subreaper_lock:
        before, _subreaper_users = _subreaper_users, _subreaper_users + delta
        if (before == 0) != (_subreaper_users == 0):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1 if _subreaper_users else 0, 0, 0, 0)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:       # not adopted here (launched by another process): init reaps it
        pass


def qemu_user_missing() -> bool:
    """libvirt's QEMU driver refuses to start as root unless the 'libvirt-qemu' user exists."""
    try:
        pwd.getpwnam(QEMU_USER)
        return False
    except KeyError:
        return True


PROBE_CLOSE_WAIT = 300.0   # seconds a closing QEMU driver waits for its background capability probe


class LibvirtQemuDriver(LibvirtDriver):
    """Real guests under QEMU software emulation (<domain type='qemu'>).

    By default in-process through ``qemu:///embed?root=ROOT`` (libvirt allows one embedded root per
    process: one node per process). ``uri`` may name a libvirtd instead, e.g. ``qemu:///system``.
    """

    backend = "libvirt-qemu"
    domain_type = "qemu"
    capabilities = Capabilities(guest_channel=True, acpi_shutdown=True, device_attach=True,
                                live_migration=False, console=True, real_guest=True)

    def __init__(self, root: Path | None = None, uri: str | None = None) -> None:
        global _embed_root
        if (root is None) == (uri is None):
            raise InvalidSpec("give either an embedded root directory or a libvirtd URI")
        if root is not None:
            root = Path(root).resolve()
            if qemu_user_missing():
                raise VMMError(f"libvirt's QEMU driver needs the system user {QEMU_USER!r}: "
                               f"useradd --system --user-group --no-create-home {QEMU_USER}")
            with _embed_lock:
                if _embed_root is not None and _embed_root != root:
                    raise VMMError(f"this process already embeds QEMU at {_embed_root}; libvirt allows one root per process")
                (root / "etc").mkdir(parents=True, exist_ok=True)
                (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
                _embed_root = root
            uri = f"qemu:///embed?root={root}"
            # libvirt's event loop (vmm/host.py) is a Python thread: between two poll iterations it waits for
            # the GIL, by default up to 5 ms whenever another thread of the node computes. Starting or
            # restoring a QEMU is hundreds of monitor round trips through that loop; measured
            # (bench/profile_restore.py) a restore took 1.8x as long beside one busy thread at 5 ms, 1.5x at 0.5 ms.
            sys.setswitchinterval(min(sys.getswitchinterval(), EVENT_SWITCH_INTERVAL))
        self.root = root
        super().__init__(uri)
        self._prober: threading.Thread | None = None
        if root is not None:
            self._prober = threading.Thread(target=self._probe, name="qemu-capabilities", daemon=True)
            self._prober.start()

    def wait_probed(self, timeout: float | None = None) -> bool:
        """Wait for the background capability probe (see _probe); True when it is over (or there was none)."""
        if self._prober is not None:
            self._prober.join(timeout)
            return not self._prober.is_alive()
        return True

    def close(self) -> None:
        """Close once the background probe is over: it calls libvirt on this connection, and closing the connection
        under its getDomainCapabilities crashed the process (SIGSEGV in libvirt-python, seen in a CI run of
        tests/vm/test_vmm_contract_qemu.py). A probe still running after PROBE_CLOSE_WAIT seconds keeps the
        connection: it is left open (logged), never closed under the probe."""
        if not self.wait_probed(PROBE_CLOSE_WAIT):
            log.warning("the QEMU capability probe still runs after %g s: the libvirt connection is left open",
                        PROBE_CLOSE_WAIT)
            with self._lock:
                channels, self._channels = list(self._channels.values()), {}
            for ch in channels:
                ch.retire("the node's VMM connection closed")
            return
        super().close()

    def _probe(self) -> None:
        """libvirt probes QEMU's capabilities (a QEMU process queried over QMP, seconds under TCG) on the first
        domain a new embed root defines, and keeps them in the root's cache: done now in the background, so the
        first deploy's power-on or the first migration's restore here does not wait for it (it was 4.7 s of a
        migration's 8.3 s restore phase on a loaded machine).

        The probe is stamped with the newest ctime of the libvirt modules loaded so far. The storage-file module
        (libvirt_storage_file_fs.so) is loaded only when a domain's disks are first prepared, and on Debian its
        ctime is a second newer than the QEMU driver's: a probe done before it turns stale then, and libvirt
        takes the cache file if it is valid, else probes again (3.5-6 s inline before QEMU was launched, measured
        on the first incoming migration after a deploy; libvirt's log: "Outdated capabilities ... libvirt
        changed"). So: probe, rewrite the cache file for the short guest-CPU check with the storage module's
        stamp (capscache.py: 0.18 s instead of 0.82 s for every start and restore), load the storage module (a
        block peek of a throw-away domain's raw disk), and libvirt loads the rewritten file."""
        conn = self._conn
        try:
            if conn is not None:
                conn.getDomainCapabilities(None, None, None, self.domain_type, 0)
                self._prefer_x86_cpu_query()
                self._load_storage_module(conn)
                conn.getDomainCapabilities(None, None, None, self.domain_type, 0)
        except libvirt.libvirtError as exc:
            log.info("QEMU capability probe in the background failed (the first domain probes): %s",
                     exc.get_error_message())
        except OSError as exc:      # the throw-away disk could not be written: the first domain probes
            log.info("QEMU capability probe in the background not done: %s", exc)

    def _prefer_x86_cpu_query(self) -> None:
        """The root's capability cache rewritten so that libvirt checks a started guest's CPU in 2 QMP round
        trips instead of 398 (capscache.py). Logged, not raised: without it libvirt takes the long way."""
        try:
            changed = capscache.rewrite(self.root, capscache.storage_module_ctime())
        except OSError as exc:
            log.info("QEMU capability cache not rewritten (libvirt checks guest CPUs the long way): %s", exc)
            return
        if changed:
            log.debug("QEMU capability cache rewritten for the short guest-CPU check: %s",
                      ", ".join(p.name for p in changed))

    def _load_storage_module(self, conn: libvirt.virConnect) -> None:
        """Make libvirt load its storage-file module now: define a domain (not a vmgrid one: no ``vmgrid-``
        prefix) with a 512-byte raw disk, peek one byte of it, undefine it."""
        disk = self.root / "capability-probe.raw"
        disk.write_bytes(bytes(512))
        xml = (f"<domain type='{self.domain_type}'><name>{PROBE_DOMAIN}</name><memory unit='MiB'>16</memory>"
               "<os><type>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>"
               f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>")
        try:
            dom = conn.defineXML(xml)
            try:
                dom.blockPeek(str(disk), 0, 1, 0)
            finally:
                dom.undefine()
        except libvirt.libvirtError as exc:
            log.info("loading libvirt's storage-file module before the capability probe failed (the second "
                     "domain start probes again): %s", exc.get_error_message())
        finally:
            disk.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _launching(self, instance: str):
        """libvirt daemonizes QEMU (its parent exits), so QEMU is an orphan, and when it exits libvirt polls
        it every 200 ms until it is gone (virProcessKillPainfully: a zombie counts as alive): every save and
        destroy waits for whoever reaps it. On this machine init reaps orphans 1.7-1.9 s after they exit
        (measured: a double-forked ``sleep`` killed), and a 512 MiB guest's save took 1.9 s of which 1.4 s
        came after QEMU had written its state (libvirt's log). So an embedding node is the subreaper while a
        start or restore launches QEMU (prctl PR_SET_CHILD_SUBREAPER: QEMU is adopted here, nothing else
        launched at other times), and a thread waits for that QEMU and reaps it the moment it exits."""
        if self.root is None:
            yield
            return
        _subreaper(+1)
        try:
            yield
        finally:
            _subreaper(-1)
            self._reap_later(instance)

    def _reap_later(self, instance: str) -> None:
        try:
            pid = int((self.root / "run" / "qemu" / f"{config.domain_name(instance)}.pid").read_text().strip())
        except (OSError, ValueError):
            return              # not started (the launch failed) or no pid file: nothing of ours to reap
        threading.Thread(target=_reap, args=(pid,), name=f"reap-qemu-{pid}", daemon=True).start()

    def _check_files(self, spec: InstanceSpec) -> None:
        paths = [d.path for d in spec.disks] + list(spec.cdroms)
        if spec.boot is not None:
            paths += [spec.boot.kernel] + ([spec.boot.initrd] if spec.boot.initrd else [])
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise InvalidSpec(f"instance {spec.name!r}: missing files: {', '.join(missing)}")
        if spec.channel is not None and not Path(spec.channel.path).parent.is_dir():
            raise InvalidSpec(f"instance {spec.name!r}: no directory for the channel socket {spec.channel.path}")
