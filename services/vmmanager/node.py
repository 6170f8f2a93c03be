"""The VMManager's node core, below SOAP: the operations of one node on typed values. Every operation
that acts on an instance gets it only through :meth:`Node._authorized`, which authorizes before anything
about the instance (its state, whether it has ended) is revealed; the factory operations authorize on
their first line. Built from its parts: the VMM, the node store, the image cache, repository access,
the enforcement point, the notifier and the node's public address (configuration, never a caller).

The deploy phases are in :mod:`services.vmmanager.phases`; states and transitions in
:mod:`services.vmmanager.states`; the wire form in :mod:`services.vmmanager.wire`.
"""
from __future__ import annotations

import logging
import queue
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from services.authz.pep import Enforcer, PolicyDecisionPoint
from services.faults import (RETRYABLE, AccessDenied, InternalFault, InvalidArgument, InvalidDescriptor,
                             LimitExceeded, ResourceUnknown, VMGridFault, VMMFault)
from services.vmmanager import migration, network, phases, states
from services.vmmanager.channels import ChannelPaths, fits
from services.vmmanager.config import VMManagerConfig
from services.vmmanager.context import new_token
from services.vmmanager.guard import Binding, PortGuard
from services.vmmanager.imagecache import ImageCache
from services.vmmanager.listing import MAX_PAGE, Cursors, Page, check_limit
from services.vmmanager.phases import NodeParts, Recorder, vmm_call
from services.vmmanager.states import FINAL, MIGRATION, TRANSIENT, State
from services.vmmanager.store import Instance, LeaseRange, NodeStore
from services.vmmanager.values import DeployRequest, DomainRow, InstanceView, NodeDomains, Subscribed
from services.vmmanager.warm import WarmSnapshots
from services.vmmanager.vmm import VMM, InstanceState, LifecycleEvent, LifecycleEventKind, VMMError, tap_name
from services.vmmanager.vmm.errors import GuestWaitCancelled, InstanceNotFound
from services.wsrf.lifetime import Sweeper
from services.wsrf.notification import ConsumerPolicy, Notifier, check_subscription_caps, new_subscription_key

log = logging.getLogger("vmgrid.VMManagerService")

STOPPED_HANDLERS = 4     # threads handling guests that stopped by themselves (a few may wait for a lock)
CLEANUP_PENDING = "destroyed; releases pending at the central services"
CLEANUP_DONE = "destroyed; releases delivered to the central services"
STOPPED_KINDS = (LifecycleEventKind.STOPPED, LifecycleEventKind.CRASHED)   # the lifecycle events the node handles
QUIET_STATES = frozenset({State.STAGING, State.STARTING, State.DESTROYED})   # state changes logged at debug


class Node:
    """One node's VMManager, without SOAP. ``address`` is the node's public VMManager URL."""

    def __init__(self, state_dir: Path, config: VMManagerConfig, pdp: PolicyDecisionPoint, *, vmm: VMM,
                 repository, notifier: Notifier | None = None, address: str = "", state_change=None,
                 credential=None, trust=None, peer_factory=None, gridftp_options: dict | None = None):
        self.config = config
        self.node = config.node or socket.gethostname()
        self.authz = Enforcer(pdp, identity=self.node)   # slots keyed by this node and its credential
        self.vmm = vmm
        self.repository = repository
        self.notifier = notifier
        self.state_change = state_change    # (consumer, producer, key, identifier, old, new, when) -> a Notify
        self.consumers = ConsumerPolicy(tuple(config.consumers_allow))
        self.state_dir = Path(state_dir)
        channels = None
        if vmm.capabilities.guest_channel:
            # every guest's channel is a Unix socket, in its instance directory or (a state directory too deep
            # for that) in a short private directory of this node's: one that fits neither, or an unsafe short
            # directory, is refused here, at start, rather than at the first deploy after its image was staged
            channels = ChannelPaths(self.state_dir / "instances")
            channels.check()
            if not fits(channels.long_form("inst-" + "0" * 32)):
                channels.ensure()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = NodeStore(self.state_dir / "node.sqlite")
        self.cache = ImageCache(self.state_dir / "cache", self.store, repository)
        self.instances_dir = self.state_dir / "instances"
        self.instances_dir.mkdir(exist_ok=True)
        pool = LeaseRange.parse(config.lease_range, config.network, config.gateway or None, config.mac_prefix)
        # bridge mode: the bridge holding the gateway, so leased addresses are reachable (network.py)
        self.bridge = network.prepare(config.nic_kind, config.nic_source, config.gateway, config.network,
                                      config.manage_bridge, self.state_dir)
        guard = None
        if config.nic_kind == "bridge" and config.guard_guests:
            guard = PortGuard(config.nic_source, owner=str(self.state_dir.resolve()),
                              broadcast_rate=config.guard_broadcast_rate)
            guard.check()           # nftables is here and takes the bridge table, or the node does not start
            log.info("bridge %s: each guest's tap sends only as its lease (nftables table bridge %s)",
                     config.nic_source, guard.table)
        elif config.nic_kind == "bridge":
            # guard_guests = false: no table of this node's is left binding taps of an earlier run's guests
            stale = PortGuard(config.nic_source, owner=str(self.state_dir.resolve()))
            if stale.listing():
                stale.remove()
                log.warning("bridge %s: guard_guests = false: the guard of this node's guests was removed (any "
                            "guest can take another's address)", config.nic_source)
        self.parts = NodeParts(self.node, config, self.store, self.cache, repository, vmm, pool,
                               self.instances_dir, address, channels=channels, guard=guard)
        self.executor = ThreadPoolExecutor(config.deploy_workers, thread_name_prefix="vmgrid-deploy")
        self.warm = WarmSnapshots(self.state_dir / "warm", self.parts)
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._stop = threading.Event()
        # key -> set to cut short a wait on that instance's guest (guest ready, power-off) by a Destroy or the
        # node stopping: a guest never holds the instance's lock for longer
        self._guest_waits: dict[str, threading.Event] = {}
        self._sweeper: Sweeper | None = None
        self._event_handle: int | None = None
        # guests that stopped or crashed, handed from libvirt's event thread to a few long-lived handlers (a new
        # thread per event cost the node about 5% of its CPU per deploy+destroy: every Destroy stops a guest)
        self._stopped: queue.SimpleQueue[LifecycleEvent | None] = queue.SimpleQueue()
        self._stopped_handlers: list[threading.Thread] = []
        # migration (services.vmmanager.migration): the host credential pairs with a user's delegated proxy
        self.credential = credential
        self.trust = trust
        self.peer_factory = peer_factory     # (url, credential, trust, timeout) -> migration.Peer
        self.migrations = migration.Records(self.store)
        self.cursors = Cursors()             # ListInstances' page cursors (services/vmmanager/listing.py)
        if not 1 <= config.list_page <= MAX_PAGE:
            raise ValueError(f"[vmmanager] list_page must be 1 to {MAX_PAGE}, not {config.list_page}")
        # its migration export: [gridftp]'s bounds on sessions ([vmmanager] guest_dns/guest_ou: refused there)
        self.exports = (migration.Exports(self.instances_dir, credential, trust, address,
                                          {"guests": config.guest_patterns(), **(gridftp_options or {})})
                        if credential else None)
        self.reconcile_report = self.reconcile()
        log.info("node %s reconciled: %s", self.node, self.reconcile_report)

    @property
    def pool(self) -> LeaseRange:
        return self.parts.pool

    @pool.setter
    def pool(self, pool: LeaseRange) -> None:
        self.parts.pool = pool

    @property
    def address(self) -> str:
        return self.parts.address

    @address.setter
    def address(self, url: str) -> None:
        self.parts.address = url
        if self.exports is not None:
            self.exports.address = url

    # -- the node's own life ------------------------------------------------------------------------
    def start(self) -> None:
        if self.exports is not None and self.config.migration_port:
            self.exports.listen()      # [vmmanager] migration_port held from the start (in use: a ValueError)
        self._stopped_handlers = [threading.Thread(target=self._handle_stopped, daemon=True,
                                                   name=f"vmgrid-guest-stopped-{i}") for i in range(STOPPED_HANDLERS)]
        for handler in self._stopped_handlers:
            handler.start()
        self._event_handle = self.vmm.subscribe(self._on_vmm_event, STOPPED_KINDS)
        self._sweeper = Sweeper(lambda now: self.sweep(now), self.config.sweep_interval).start()

    def close(self) -> None:
        self._stop.set()
        for wait in list(self._guest_waits.values()):   # deployments waiting for guestd end now
            wait.set()
        if self._sweeper is not None:
            self._sweeper.stop()
        if self.exports is not None:
            self.exports.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._event_handle is not None:
            try:
                self.vmm.unsubscribe(self._event_handle)
            except Exception:
                pass
        for _ in self._stopped_handlers:
            self._stopped.put(None)
        if self.notifier is not None:
            self.notifier.close()
        self.repository.close()
        self.vmm.close()
        if self.parts.channels is not None:
            self.parts.channels.let_go()
        self.store.close()

    @contextmanager
    def _guest_wait(self, key: str) -> Iterator[threading.Event]:
        """The event that cuts short a wait on this instance's guest (already set if the node is stopping)."""
        cancel = self._guest_waits.setdefault(key, threading.Event())
        if self._stop.is_set():
            cancel.set()
        try:
            yield cancel
        finally:
            self._guest_waits.pop(key, None)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.RLock())
        with lock:
            yield

    # -- authorization first --------------------------------------------------------------------------
    def _resource(self, inst: Instance) -> dict[str, str]:
        return self._instance_resource(inst.key, inst.owner, inst.vo, inst.image_id)

    def _instance_resource(self, key: str, owner: str, vo: str, image_id: str) -> dict[str, str]:
        """What an operation on an instance is authorized on (the same for every operation on it)."""
        return {"type": "instance", "owner": owner, "vo": vo, "node": self.node, "id": key, "image": image_id}

    def _record(self, key: str) -> Instance:
        inst = self.store.get(key) if key else None
        if inst is None:
            raise ResourceUnknown(f"no instance {key} on node {self.node}", resource=key or "(none)")
        return inst

    def _authorized(self, caller, key: str, action: str, *, inst: Instance | None = None, **context) -> Instance:
        """The instance ``key`` for ``caller`` doing ``action``: authorized first (AccessDenied), then
        ResourceUnknown if it has ended. The one way an operation reaches an instance."""
        inst = inst or self._record(key)
        self.authz.check(caller, action, self._resource(inst), {k: str(v) for k, v in context.items()})
        if inst.state_enum == State.DESTROYED:
            raise ResourceUnknown(f"no instance {key} on node {self.node} (destroyed)", resource=key)
        if inst.state_enum == State.MIGRATED:
            raise migration.moved(self, key)
        return inst

    def view(self, inst: Instance) -> InstanceView:
        progress = self.cache.progress(inst.sha256) if inst.state == State.STAGING.value else None
        return InstanceView(inst, self.node, progress, self.parts.home(inst.key))

    # -- state changes and notifications ----------------------------------------------------------------
    def _set_state(self, key: str, new: State, *, expect: set[State] | None = None, **values) -> bool:
        old = self.store.set_state(key, new, expect=expect, **values)
        if old is None:
            return False
        if old != new:
            # the routine steps of a deployment and a Destroy (logged with its own line) at debug: a deploy+destroy
            # writes three INFO lines, not six (each a formatted, flushed write in the node's process)
            log.log(logging.DEBUG if new in QUIET_STATES else logging.INFO, "instance %s: %s -> %s", key, old.value,
                    new.value)
            self._notify(key, old, new)
        return True

    def _notify(self, key: str, old: State, new: State) -> None:
        if self.notifier is None:
            return
        now = time.time()
        # the end of an instance reaches every subscriber, even one whose subscription ran out with it
        subscribers = self.store.subscriptions(key, 0.0 if new in FINAL else now)
        if not subscribers:      # most instances have none: no record read, no write
            return
        inst = self.store.get(key)
        for _, consumer in subscribers:
            # queued as the owner's: slow consumers of one owner's instances delay only that owner's notifications
            self.notifier.send(consumer, self.state_change(consumer, self.address, key, inst.identifier,
                                                           old.value, new.value, now), owner=inst.owner)
        if new in FINAL:
            self.store.drop_subscriptions(key)

    # -- deployment -------------------------------------------------------------------------------------
    def deploy(self, caller, req: DeployRequest) -> InstanceView:
        # the deployment's commits (record, lease, its states on the way) made durable together, once, before the
        # answer (or the fault) leaves: one fsync, not one per commit (NodeStore.one_sync)
        with self.store.one_sync():
            return self._deploy(caller, req)

    def _deploy(self, caller, req: DeployRequest) -> InstanceView:
        started = time.perf_counter()
        d = req.descriptor
        if not (d.image_id and d.sha256 and d.size is not None and d.owner):
            raise InvalidDescriptor("deploy a descriptor as the repository gives it: it needs imageId, owner, "
                                    "sha256 and size", schemaMessage="descriptor not from the repository")
        key = "inst-" + uuid.uuid4().hex
        # authorize: vm.deploy on the image, the requested amounts in the context; obligations applied and
        # the instance counted against the concurrent-instance limits in one step
        resource = {"type": "image", "vo": d.vo, "owner": d.owner, "name": d.name, "id": d.image_id,
                    "node": self.node}
        context = {"memory": str(d.memory), "vcpus": str(d.vcpus), "lifetime": str(req.lifetime),
                   "image": d.image_id, "node": self.node}
        # the owner's Destroy of this instance asked ahead, with the claim: a policy point with a permit cache
        # then answers that Destroy's authorization (still its first step) without a message of its own while
        # the permit lasts (docs/authz.md, "Caching")
        ahead = [("vm.destroy", self._instance_resource(key, caller.dn, d.vo, d.image_id), {})]
        try:
            decision, _slot = self.authz.claim(caller, key, resource, context, ahead=ahead)
        except AccessDenied:
            raise
        except VMGridFault:
            # the slot may have been recorded before the answer was lost (the central process killed meanwhile)
            # or refused after it (an obligation): give it back, kept for retry (a release of no slot is a no-op)
            try:
                self._release_central("slot", key)
            except VMGridFault as exc:
                log.warning("instance %s: releasing a slot whose claim failed: %s", key, exc.description)
            raise
        t_authorize = time.perf_counter() - started
        rec = Recorder(self.store, key)
        try:
            with rec.phase("register"):   # the descriptor checked against the repository, the instance recorded
                self.repository.verify(d)
                max_lifetime = decision.obligations.get("max_lifetime")
                now = time.time()
                self.store.insert(Instance(
                    key=key, identifier=req.identifier, owner=caller.dn, vo=d.vo, image_id=d.image_id,
                    image_name=d.name, sha256=d.sha256, size=d.size, format=d.image_format, memory=d.memory,
                    vcpus=d.vcpus, descriptor=req.descriptor_xml, state=State.REGISTERED.value,
                    initial_state=req.initial_state, address=None, mac=None, created=now,
                    termination=now + req.lifetime, max_lifetime=int(max_lifetime) if max_lifetime else None,
                    token=new_token()))
                rec.add("authorize", t_authorize)
            with rec.phase("lease"):    # the lease written with the timings so far (authorize, register)
                phases.lease(self.parts, key, rec)
        except BaseException as exc:
            try:   # on a full disk the clean-up's own writes may fail too: the slot is given back anyway
                self._release(key, quiet=True)
                if self.store.get(key) is not None:
                    reason = f"{type(exc).__name__}: {getattr(exc, 'description', exc)}"
                    self.store.set_state(key, State.FAILED, failure=reason, phases=rec.take())
            except Exception:  # noqa: BLE001 - the deployment's own error is the one to report
                log.exception("instance %s: cleaning up a failed deployment failed", key)
            finally:
                self._release_central("slot", key)
            raise
        log.info("instance %s (%s) of %s registered for %s, lifetime %d s", key, req.identifier, d.image_id,
                 caller.dn, req.lifetime)
        if req.wait:
            self._deploy_rest(key, raise_fault=True, timings=rec.take())
            return self.view(self.store.get(key))
        # the answer is the registration (Registered, its lease), read before the phases start on the executor:
        # read after, it raced their first commit (Staging)
        registered = self.view(self.store.get(key))
        self.executor.submit(self._deploy_rest, key, False, rec.take())
        return registered

    def _deploy_rest(self, key: str, raise_fault: bool, timings: list | None = None) -> None:
        """The phases after registration (stage, overlay, context, power on, guest ready); on failure the
        instance is Failed and everything it held is released. The phase timings are written with the state
        changes (Recorder); ``timings``, the lease's, with the first."""
        with self.store.one_sync():     # inside deploy's own when it waits; alone on the executor's thread
            self._deploy_phases(key, raise_fault, timings)

    def _deploy_phases(self, key: str, raise_fault: bool, timings: list | None) -> None:
        rec = Recorder(self.store, key)
        rec.pending = list(timings or ())
        try:
            if self._set_state(key, State.STAGING, expect={State.REGISTERED}, phases=rec.pending):
                rec.pending = []
                with rec.phase("stage"):
                    phases.stage(self.parts, key)
            with self._locked(key):
                inst = self.store.get(key)
                if inst.state != State.STAGING.value:   # destroyed meanwhile
                    return
                self._set_state(key, State.STARTING, expect={State.STAGING}, phases=rec.take())
                self._start_instance(key, rec)
        except VMGridFault as fault:
            self._fail(key, fault)
            if raise_fault:
                raise
        except VMMError as exc:
            fault = VMMFault(f"the VMM failed: {exc}", operation="deploy")
            self._fail(key, fault)
            if raise_fault:
                raise fault from None
        except Exception as exc:  # noqa: BLE001 - recorded on the instance, never lost
            log.exception("deployment of %s failed", key)
            fault = InternalFault(f"deployment failed unexpectedly: {exc}", incident=key)
            self._fail(key, fault)
            if raise_fault:
                raise fault from None
        finally:
            try:
                rec.flush()     # what a failed or interrupted deployment timed
            except Exception:  # noqa: BLE001 - timings only; the deployment's own outcome is what counts
                log.exception("instance %s: phase timings not recorded", key)

    def _start_instance(self, key: str, rec: Recorder) -> None:
        inst = self.store.get(key)
        d = phases.descriptor_of(inst)
        self.parts.home(key).mkdir(parents=True, exist_ok=True)
        snap = None
        if self.config.warm_snapshots and inst.initial_state != State.PAUSED.value:
            snap = self.warm.find(inst, d)
        with rec.phase("overlay"):
            disks = phases.overlay(self.parts, inst, d, base=snap.disk if snap is not None else None)
        with rec.phase("context"):
            iso = phases.context(self.parts, inst, d)
        paused = inst.initial_state == State.PAUSED.value
        if snap is not None:
            if self._warm_start(key, rec, snap, phases.instance_spec(self.parts, inst, d, disks, iso), iso):
                return
            with rec.phase("overlay"):       # the restore failed: boot cold, on the cached image
                disks = phases.overlay(self.parts, inst, d)
        with rec.phase("power-on"):
            spec = phases.instance_spec(self.parts, inst, d, disks, iso)
            phases.power_on(self.parts, spec, paused)
        if spec.channel is not None and not paused:
            rec.flush()     # visible while the guest boots
            try:
                with rec.phase("guest-ready"), self._guest_wait(key) as cancel:
                    phases.guest_ready(self.parts, key, cancel)
            except GuestWaitCancelled:
                return      # a Destroy (or the node stopping) took over the instance; it releases it
        self._set_state(key, State.PAUSED if paused else State.RUNNING, expect={State.STARTING}, phases=rec.take())
        if self.config.warm_snapshots and not paused:
            self.warm.make_later(inst, d, self.executor)

    def _warm_start(self, key: str, rec: Recorder, snap, spec, iso) -> bool:
        """The restore phase (services/vmmanager/warm.py); False when it failed and the instance must boot
        cold (the snapshot is dropped: the node makes a new one after this boot)."""
        rec.flush()         # visible while the clone is restored
        try:
            with rec.phase("restore"), self._guest_wait(key) as cancel:
                phases.restore(self.parts, spec, snap, iso, cancel)
        except GuestWaitCancelled:
            return True     # a Destroy (or the node stopping) took over the instance; it releases it
        except (VMGridFault, VMMError) as exc:
            log.warning("instance %s: warm start failed, booting cold: %s", key, exc)
            self.warm.discard(snap, f"restoring {key} failed: {exc}")
            for verb in ("destroy", "undefine"):
                try:
                    getattr(self.vmm, verb)(key)
                except VMMError:
                    pass
            return False
        self._set_state(key, State.RUNNING, expect={State.STARTING}, phases=rec.take())
        self.warm.refill(snap, self.executor)
        return True

    def _fail(self, key: str, fault: VMGridFault) -> None:
        inst = self.store.get(key)
        if inst is None or inst.state_enum in FINAL:
            return
        log.warning("instance %s failed: %s", key, fault.description)
        with self._locked(key):
            self._release(key, final=State.FAILED, failure=f"{type(fault).__name__}: {fault.description}")
        self._release_central("slot", key)

    def _release(self, key: str, quiet: bool = False, final: State | None = None, **values) -> None:
        """Give back everything an instance holds: domain, overlay/context/state files, lease, image hold; with
        ``final``, the instance moved to that state (``values`` beside it) in the same write as its lease and
        hold (one commit, not three: Destroy's own)."""
        inst = self.store.get(key)
        for verb in ("destroy", "undefine"):
            try:
                getattr(self.vmm, verb)(key)
            except InstanceNotFound:
                break
            except VMMError as exc:
                if not quiet:
                    log.warning("instance %s: %s failed: %s", key, verb, exc)
        shutil.rmtree(self.parts.home(key), ignore_errors=True)
        self.parts.remove_channel(key)
        held = inst is not None and (inst.hold_id or inst.hold_holder)
        central = None
        # the holds' lock before SQLite's write lock, as staging takes them; a release at the repository is sent
        # after the commit but still under the holds' lock (a deployment meanwhile would be given the same hold)
        with self.parts.holds.lock if held else nullcontext():
            with self.store.transaction():
                self.store.release_lease(key)
                if held:
                    central = self._drop_hold(key, inst)
                if final is not None:
                    self._set_state(key, final, **values)
            if central is not None:
                self._release_central(*central)
        phases.sync_guard(self.parts)     # bridge mode: its tap is no longer bound to its lease

    def _drop_hold(self, key: str, inst: Instance) -> tuple[str, str, str] | None:
        """The instance no longer uses its image hold (under the holds' lock). The node's hold on the image is
        shared by its instances of it: given back when the last of them has ended and no other deployment took
        it within [vmmanager] hold_linger (the outbox's 'idle-hold', delivered by the sweeper), so a stream of
        deployments of one image holds it once. Returns the release to send to the repository now, if any."""
        shared = inst.hold_holder == phases.image_holder(self.address, inst.image_id)
        if inst.hold_id and shared and self.config.hold_linger > 0:
            self.store.drop_hold(key, (inst.hold_holder, f"{inst.image_id}\n{inst.hold_id}",
                                       time.time() + self.config.hold_linger))
            return None
        self.store.drop_hold(key)
        if inst.hold_holder and self.store.hold_users(holder=inst.hold_holder):
            return None
        self.parts.holds.forget(inst.image_id)
        if inst.hold_id:
            return ("hold", key, inst.hold_id)
        return ("holder", key, f"{inst.image_id}\n{inst.hold_holder}")   # asked for, its id never recorded

    # -- releases at the central services, delivered or kept until they are ----------------------------
    def _deliver(self, kind: str, key: str, arg: str) -> None:
        if kind == "slot":
            self.authz.release(key)
        elif kind in ("hold", "holder"):
            with self.parts.holds.lock:
                # a deployment since may have taken the same shared hold again (the repository renews a
                # holder's hold under its id): it is not released under that instance
                if kind == "hold" and not self.store.hold_users(hold_id=arg):
                    self.repository.release(arg)
                elif kind == "holder":
                    image_id, _, holder = arg.partition("\n")
                    if not self.store.hold_users(holder=holder):
                        self.repository.release_holder(image_id, holder)
        elif kind == "idle-hold":     # key: the holder; the hold lingered unused for [vmmanager] hold_linger
            image_id, _, hold_id = arg.partition("\n")
            with self.parts.holds.lock:
                if not self.store.hold_users(holder=key):   # else taken again: its last instance queues anew
                    self.parts.holds.forget(image_id)
                    self.repository.release(hold_id)
        else:
            log.error("outbox: unknown kind of release %r for %s", kind, key)

    def _release_central(self, kind: str, key: str, arg: str = "") -> bool:
        """Give back an instance's slot or image hold now; when the central services cannot take it (down,
        their disk full), keep it in the outbox (persisted with the node's state) for the sweeper to retry."""
        try:
            self._deliver(kind, key, arg)
            return True
        except RETRYABLE as exc:
            log.warning("instance %s: %s release kept for retry: %s", key, kind, exc.description)
            self.store.enqueue(kind, key, arg, exc.description)
            return False

    def deliver_outbox(self, now: float | None = None) -> int:
        """Retry the releases that are due; returns how many are still pending."""
        now = time.time() if now is None else now
        for entry, kind, key, arg, attempts in self.store.outbox(due=now):
            try:
                self._deliver(kind, key, arg)
            except RETRYABLE as exc:
                self.store.outbox_retry(entry, exc.description, now + min(30.0, 0.5 * 2 ** attempts))
                continue
            except VMGridFault as exc:   # refused for good: retrying cannot change it
                log.warning("instance %s: %s release refused: %s", key, kind, exc.description)
            self.store.outbox_done(entry)
            log.info("instance %s: %s released (after %d attempt(s))", key, kind, attempts + 1)
            if not self.store.outbox(instance=key):
                inst = self.store.get(key)
                if inst is not None and inst.guest_status.startswith(CLEANUP_PENDING):
                    self.store.update(key, guest_status=CLEANUP_DONE)
        return len(self.store.outbox())

    def _destroy(self, key: str, reason: str) -> list[str]:
        """Destroy the instance and release what it holds; returns the kinds of release the central services
        did not take yet (kept in the outbox and retried), empty when everything was given back."""
        # interrupt a deployment waiting for guestd first (it holds the instance's lock meanwhile);
        # set before the wait starts, the wait ends at once
        self._guest_waits.setdefault(key, threading.Event()).set()
        try:
            with self._locked(key):
                inst = self.store.get(key)
                if inst is None or inst.state_enum in FINAL:
                    return []
                self._release(key, final=State.DESTROYED)
        finally:
            self._guest_waits.pop(key, None)
        self._release_central("slot", key)
        pending = sorted({kind for _, kind, *_ in self.store.outbox(instance=key)})
        if pending:   # destroyed all the same: what the central services did not take yet is retried
            self.store.update(key, guest_status=f"{CLEANUP_PENDING} ({', '.join(pending)}), retried until "
                                                f"the central services take it")
        log.info("instance %s destroyed (%s)%s", key, reason, f"; pending: {pending}" if pending else "")
        return pending

    # -- the factory ------------------------------------------------------------------------------------
    def list(self, caller, include_ended: bool = False) -> list[InstanceView]:
        self.authz.check(caller, "vm.list", {"type": "node", "node": self.node, "owner": caller.dn})
        return [self.view(i) for i in self.store.list(caller.dn, live_only=not include_ended)]

    def list_page(self, caller, include_ended: bool = False, *, limit: int | None = None,
                  cursor: str | None = None) -> Page:
        """One page of the caller's instances (``limit``, default ``[vmmanager] list_page``), from the start or
        from ``cursor``; the page's cursor names the next one while more remain (services/vmmanager/listing.py)."""
        self.authz.check(caller, "vm.list", {"type": "node", "node": self.node, "owner": caller.dn})
        limit = check_limit(limit, self.config.list_page)
        after = self.cursors.position(caller.dn, include_ended, cursor) if cursor is not None else None
        rows = self.store.page(caller.dn, live_only=not include_ended, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = self.cursors.make(caller.dn, include_ended, rows[-1].created, rows[-1].key) if more else None
        # the Instance element reads no file: no home directory, staging progress only while staging
        return Page([InstanceView(i, self.node, self.cache.progress(i.sha256) if i.state == State.STAGING.value
                                  else None) for i in rows], nxt)

    def domains(self, caller) -> NodeDomains:
        """Site administration (action admin.node): the hypervisor's vmgrid domains beside the live instance
        records. A domain without a live record is an orphan; a live Running or Paused record without a domain
        is missing its domain."""
        self.authz.check(caller, "admin.node", {"type": "node", "node": self.node})
        return self.domain_census()

    def domain_census(self) -> NodeDomains:
        """The census itself. The two listings race with deployments and destroys, so an entry that looks
        wrong is looked at again under its instance's lock (deploy and destroy change both under it)."""
        live = {i.key: i for i in self.store.list(None, live_only=True)}
        listed = {d.name: d for d in vmm_call("list domains", self.vmm.list_instances)}
        rows, missing = [], []
        for name in sorted(set(listed) | set(live)):
            dom, inst = listed.get(name), live.get(name)
            suspicious = (dom is None) != (inst is None) and \
                (inst is None or inst.state_enum in (State.RUNNING, State.PAUSED))
            if suspicious:
                with self._locked(name):
                    inst = self.store.get(name)
                    if inst is not None and inst.state_enum in FINAL:
                        inst = None
                    dom = next((d for d in vmm_call("list domains", self.vmm.list_instances) if d.name == name),
                               None)
            if dom is not None:
                rows.append(DomainRow(dom.name, dom.uuid, dom.state.value, inst.key if inst else None,
                                      inst.state if inst else None))
            elif inst is not None and inst.state_enum in (State.RUNNING, State.PAUSED):
                missing.append((inst.key, inst.state))
        return NodeDomains(self.node, tuple(rows), tuple(missing))

    # -- control ----------------------------------------------------------------------------------------
    def _control(self, caller, key: str, action: str, transition: str, run) -> State:
        inst = self._authorized(caller, key, action)
        with self._locked(inst.key):
            inst = self.store.get(inst.key)
            states.check(inst.state_enum, transition)
            new = run(inst)
            self._set_state(inst.key, new)
        return new

    def start_instance(self, caller, key: str) -> State:
        def run(inst):
            (self.parts.home(inst.key) / migration.GUEST_TOKEN).unlink(missing_ok=True)   # a boot: nothing to move
            vmm_call("start", self.vmm.start, inst.key)
            if self.vmm.capabilities.guest_channel and vmm_call("start", self.vmm.spec_of, inst.key).channel:
                # the same guest-ready phase as Deploy: GuestStatus says what guestd reports now
                try:
                    with self._guest_wait(inst.key) as cancel:
                        phases.guest_ready(self.parts, inst.key, cancel)
                except GuestWaitCancelled:
                    raise VMMFault("Start was interrupted: the instance is being destroyed or the node is "
                                   "stopping", operation="start") from None
                except VMGridFault:
                    try:   # never leave a guest running that nobody can use; its disks stay
                        self.vmm.destroy(inst.key)
                    except VMMError:
                        pass
                    raise
            return State.RUNNING
        return self._control(caller, key, "vm.start", "start", run)

    def pause(self, caller, key: str) -> State:
        def run(inst):
            vmm_call("pause", self.vmm.pause, inst.key)
            return State.PAUSED
        return self._control(caller, key, "vm.pause", "pause", run)

    def resume(self, caller, key: str) -> State:
        def run(inst):
            if vmm_call("resume", self.vmm.resume, inst.key):
                self.store.update(inst.key, guest_status="ready (clock set after resume)")
            self._readdress_if_migrated(inst.key)
            return State.RUNNING
        return self._control(caller, key, "vm.resume", "resume", run)

    def _readdress_if_migrated(self, key: str) -> None:
        """A guest that arrived paused or saved by migration takes this node's address when it first runs here."""
        note = migration.readdress_pending(self, key)
        if note is not None:
            self.store.update(key, guest_status=note)

    def save(self, caller, key: str) -> State:
        def run(inst):
            path = self.parts.home(inst.key) / "state.save"
            path.unlink(missing_ok=True)
            vmm_call("save", self.vmm.save, inst.key, path)
            return State.SAVED
        return self._control(caller, key, "vm.save", "save", run)

    def restore(self, caller, key: str, paused: bool = False) -> State:
        def run(inst):
            path = self.parts.home(inst.key) / "state.save"
            vmm_call("restore", self.vmm.restore, path, paused=paused, sync=False)
            path.unlink(missing_ok=True)
            if not paused:
                if self.vmm.sync_after_wake(inst.key):
                    self.store.update(inst.key, guest_status="ready (clock set after restore)")
                elif inst.guest_status.startswith("ready (clock set after"):     # not this wake-up's news
                    self.store.update(inst.key, guest_status="ready (clock not confirmed after restore)")
                self._readdress_if_migrated(inst.key)
            return State.PAUSED if paused else State.RUNNING
        return self._control(caller, key, "vm.restore", "restore", run)

    def shutdown(self, caller, key: str, mode: str = "Normal", timeout: int | None = None) -> State:
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        if mode == "Trash":
            def run(inst):
                try:
                    self.vmm.destroy(inst.key)
                except VMMError as exc:
                    raise VMMFault(f"power off: {exc}", operation="shutdown") from None
                return State.SHUTOFF
            return self._control(caller, key, "vm.shutdown", "shutdown-trash", run)
        inst = self._authorized(caller, key, "vm.shutdown")
        with self._locked(inst.key):
            inst = self.store.get(inst.key)
            states.check(inst.state_enum, "shutdown-normal")
            self._set_state(inst.key, State.SHUTTING_DOWN)
            try:
                with self._guest_wait(inst.key) as cut_short:
                    graceful = vmm_call("shutdown", self.vmm.shutdown, inst.key, timeout=timeout, cancel=cut_short)
            except VMGridFault:
                self._set_state(inst.key, State.RUNNING, expect={State.SHUTTING_DOWN})
                raise
            self.store.update(inst.key, guest_status="shut down" if graceful else "forced off after timeout")
            self._set_state(inst.key, State.SHUTOFF, expect={State.SHUTTING_DOWN})
        return State.SHUTOFF

    def destroy(self, caller, key: str) -> list[str]:
        """Destroy the instance; returns the releases at the central services still pending (retried)."""
        inst = self._authorized(caller, key, "vm.destroy")
        states.check(inst.state_enum, "destroy")
        return self._destroy(inst.key, f"by {caller.dn}")

    def set_termination_time(self, caller, key: str, new: float | None) -> float:
        """Move the instance's termination time to ``new`` (UNIX seconds; None asks for none: refused);
        the image hold follows. Returns the new termination time."""
        inst = self._record(key)
        now = time.time()
        lifetime = int(new - inst.created) if new is not None else 0
        inst = self._authorized(caller, key, "vm.set-lifetime", inst=inst, lifetime=lifetime)
        states.check(inst.state_enum, "set-lifetime")
        if new is None:
            raise InvalidArgument("an instance always has a termination time; ask for a later one",
                                  argument="RequestedTerminationTime")
        if new <= now:
            raise InvalidArgument("the requested termination time is in the past; use Destroy to end it now",
                                  argument="RequestedTerminationTime")
        if inst.max_lifetime is not None and lifetime > inst.max_lifetime:
            raise LimitExceeded(f"a lifetime of {lifetime} s exceeds the {inst.max_lifetime} s this deployment was "
                                f"authorized for", limit="max_lifetime", allowed=str(inst.max_lifetime),
                                requested=str(lifetime))
        self.store.update(inst.key, termination=new)
        if inst.hold_id:  # the image stays held as long as the instance may live (the same hold, renewed)
            holder = inst.hold_holder or phases.image_holder(self.address, inst.image_id)
            with self.parts.holds.lock:
                hold = phases.hold_image(self.parts, inst.image_id, holder, new + self.config.hold_grace)
                self.store.update(inst.key, hold_id=hold, hold_holder=holder)
                if hold != inst.hold_id and not self.store.hold_users(hold_id=inst.hold_id):
                    self.repository.release(inst.hold_id)
        return new

    # -- inspection ----------------------------------------------------------------------------------------
    def inspect(self, caller, key: str) -> InstanceView:
        """The instance for reading its resource properties (vm.inspect)."""
        return self.view(self._authorized(caller, key, "vm.inspect"))

    def subscribe(self, caller, key: str, consumer: str, initial_termination: float | None) -> Subscribed:
        inst = self._authorized(caller, key, "vm.inspect")
        states.check(inst.state_enum, "subscribe")

        def check_caps(now: float) -> None:
            db = self.store.db.conn()
            check_subscription_caps(
                db.execute("SELECT COUNT(*) FROM subscriptions WHERE instance_key = ? AND expires > ?",
                           (inst.key, now)).fetchone()[0],
                db.execute("SELECT COUNT(*) FROM subscriptions WHERE subscriber = ? AND expires > ?",
                           (caller.dn, now)).fetchone()[0])
        check_caps(time.time())         # the caps before the lookup: a Subscribe they refuse looks nothing up
        self.consumers.check(consumer, caller=caller.dn)     # the subscriber's own bound on lookups
        expires = inst.termination if initial_termination is None else min(inst.termination, initial_termination)
        sub_key = new_subscription_key()
        now = time.time()
        with self.store.transaction():       # counted again and recorded in one transaction: the caps hold
            check_caps(now)
            self.store.subscribe(sub_key, inst.key, consumer, caller.dn, expires)
        return Subscribed(sub_key, expires)

    # -- migration (services.vmmanager.migration) ------------------------------------------------------------
    def migrate(self, caller, key: str, target: str, mode: str, proxy_pem: bytes):
        """Migrate the instance to the VMManager at ``target``: (the instance there as the peer returned it,
        this node's phases after the target answered)."""
        return migration.migrate(self, caller, key, target, mode, proxy_pem)

    def accept_migration(self, caller, offer) -> InstanceView:
        return migration.accept(self, caller, offer)

    def complete_migration(self, caller, key: str, commit: bool):
        return migration.complete(self, caller, key, commit)

    # -- lifetimes, VMM events, recovery --------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        """Destroy the instances whose termination time has passed; returns their keys."""
        now = time.time() if now is None else now
        try:
            self.deliver_outbox(now)
        except Exception:
            log.exception("could not retry the pending releases")
        if self.exports is not None:
            migration.sweep(self)
        expired = self.store.expired(now)
        for key in expired:
            try:
                self._destroy(key, "its termination time passed")
            except Exception:
                log.exception("could not destroy expired instance %s", key)
        return expired

    def _on_vmm_event(self, event: LifecycleEvent) -> None:
        # runs on libvirt's event thread: hand over, never call the VMM here
        if event.kind in STOPPED_KINDS:
            self._stopped.put(event)

    def _handle_stopped(self) -> None:
        """One of the STOPPED_HANDLERS threads: the stopped guests, one after the other (a handler waits for the
        instance's lock, which a deployment holds while its guest boots: the others go on meanwhile)."""
        while (event := self._stopped.get()) is not None:
            try:
                self._guest_stopped(event)
            except Exception:  # noqa: BLE001 - one event's failure must not stop the handler
                log.exception("handling the stop of %s failed", event.instance)

    def _guest_stopped(self, event: LifecycleEvent) -> None:
        """A guest that powered itself off (or crashed) while Running is now Shutoff."""
        key = event.instance
        with self._locked(key):
            inst = self.store.get(key)
            if inst is None or inst.state != State.RUNNING.value:
                return
            try:
                if self.vmm.state(key) not in (InstanceState.SHUTOFF, InstanceState.CRASHED):
                    return
            except VMMError:
                return
            self.store.update(key, guest_status=f"stopped by itself ({event.detail})")
            self._set_state(key, State.SHUTOFF, expect={State.RUNNING})

    def reconcile(self) -> dict[str, int]:
        """After a start (or a crash): make the records, libvirt and the disk agree. Interrupted
        deployments fail and release what they held; instances the VMM lost fail; domains, leases and
        files nobody owns go."""
        report = {"failed_interrupted": 0, "failed_lost": 0, "orphan_domains": 0, "leases_released": 0,
                  "dirs_removed": 0, "states_synced": 0}
        if self.credential is not None:
            report.update(migration.reconcile(self))
        domains = {i.name: i for i in self.vmm.list_instances()}
        live = {i.key: i for i in self.store.list(None, live_only=True)}
        for key, inst in live.items():
            state = inst.state_enum
            dom = domains.get(key)
            if state in MIGRATION:      # settled above; still waiting for its target to answer
                continue
            if state in TRANSIENT - {State.SHUTTING_DOWN}:
                self._release(key, quiet=True)
                self.store.set_state(key, State.FAILED, failure=f"Interrupted: the VMManager restarted while the "
                                                               f"instance was {state.value}")
                report["failed_interrupted"] += 1
                continue
            if dom is None:
                self._release(key, quiet=True)
                self.store.set_state(key, State.FAILED, failure="Lost: the node's VMM no longer has this VM "
                                                               "(it was not running when the VMManager restarted)")
                report["failed_lost"] += 1
                continue
            actual = {InstanceState.RUNNING: State.RUNNING, InstanceState.PAUSED: State.PAUSED,
                      InstanceState.SAVED: State.SAVED, InstanceState.SHUTOFF: State.SHUTOFF}.get(dom.state)
            if state == State.SAVED and dom.state == InstanceState.SHUTOFF and \
                    (self.parts.home(key) / "state.save").exists():
                actual = State.SAVED
            if actual is not None and actual != state:
                self.store.set_state(key, actual)
                report["states_synced"] += 1
        for name in domains:
            if name not in live or self.store.get(name).state_enum in FINAL:
                for verb in ("destroy", "undefine"):
                    try:
                        getattr(self.vmm, verb)(name)
                    except VMMError:
                        pass
                report["orphan_domains"] += 1
        live_now = {i.key for i in self.store.list(None, live_only=True)}
        for key in self.store.leases():
            if key not in live_now:
                self.store.release_lease(key)
                report["leases_released"] += 1
        if self.parts.guard is not None:
            # bridge mode: every running guest's tap bound to its lease before the node serves (an instance of a
            # node state older than the guard gets the tap its domain's UUID names); NetworkSetupError: no start
            ports, leases = self.store.ports(), self.store.leases()
            for key in live_now & leases.keys() & domains.keys():
                if key not in ports:
                    self.store.bind_port(key, tap_name(domains[key].uuid, 0))
            report["taps_guarded"] = self.parts.guard.sync(
                lambda: [Binding(*row) for row in self.store.port_bindings()])
        for d in self.instances_dir.iterdir():
            if d.name not in live_now:
                shutil.rmtree(d, ignore_errors=True)
                report["dirs_removed"] += 1
        if self.parts.channels is not None:     # sockets of guests killed while the node was down
            report["channels_removed"] = self.parts.channels.sweep(live_now)
        report.update(self.cache.reconcile())
        try:
            self.authz.reconcile(sorted(live_now))
        except VMGridFault as exc:
            log.warning("could not reconcile instance slots with the Authorization service: %s", exc.description)
        report["releases_pending"] = self.deliver_outbox()
        return report
