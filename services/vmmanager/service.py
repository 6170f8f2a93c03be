"""The VMManager grid service: deploys descriptors as VM instances (WS-Resources) on this node and
controls them through the node's VMM, timing every deployment phase."""
from __future__ import annotations

import copy
import json
import shlex
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from lxml import etree

from services.authz.pep import Enforcer, PolicyDecisionPoint
from services.container.service import CallContext, SoapService, operation
from services.descriptor import NSMAP as WS_NSMAP
from services.descriptor import WS, Descriptor, check_descriptor
from services.faults import (InternalFault, InvalidArgument, InvalidDescriptor, LimitExceeded, ResourceUnknown,
                             VMGridFault, VMMFault)
from services.vmmanager import states
from services.vmmanager.config import VMManagerConfig
from services.vmmanager.context import build_context, new_token, write_context_iso
from services.vmmanager.imagecache import ImageCache
from services.vmmanager.notify import Notifier, notify_envelope, utc
from services.vmmanager.states import FINAL, LIVE, TRANSIENT, State
from services.vmmanager.store import COLUMNS, Instance, LeaseRange, NodeStore
from services.vmmanager.vmm import (VMM, Disk, GuestChannel, InstanceSpec, InstanceState, KernelBoot,
                                    LifecycleEvent, LifecycleEventKind, Nic, Port, VMMError)
from services.vmmanager.vmm.errors import InstanceNotFound
from services.common.crash import crashpoint

VMM_NS = "http://vmgrid.org/ns/vmmanager/1"
WSA = "http://www.w3.org/2005/08/addressing"
RP = "http://docs.oasis-open.org/wsrf/rp-2"
RL = "http://docs.oasis-open.org/wsrf/rl-2"
WSNT = "http://docs.oasis-open.org/wsn/b-2"
NS = {"vmm": VMM_NS, "ws": WS, "wsa": WSA, "wsrf-rp": RP, "wsrf-rl": RL, "wsnt": WSNT}
KEY_HEADER = f"{{{VMM_NS}}}InstanceKey"
RESOURCE_PROPERTIES = frozenset(
    [f"{{{VMM_NS}}}{n}" for n in ("Identifier", "State", "Node", "Owner", "Image", "Hardware", "Address", "Mac",
                                   "Created", "PhaseTimings", "StagingProgress", "GuestStatus", "Failure",
                                   "Lifetime")]
    + [f"{{{RL}}}TerminationTime", f"{{{RL}}}CurrentTime"])


def _el(name: str, text: object | None = None, ns: str = VMM_NS) -> etree._Element:
    el = etree.Element(f"{{{ns}}}{name}", nsmap={"vmm": VMM_NS} if ns == VMM_NS else None)
    if text is not None:
        el.text = str(text)
    return el


def _sub(parent: etree._Element, name: str, text: object | None = None, ns: str = VMM_NS) -> etree._Element:
    el = etree.SubElement(parent, f"{{{ns}}}{name}")
    if text is not None:
        el.text = str(text)
    return el


def guest_summary(status: dict) -> str:
    """guestd's status in one line for the GuestStatus property: ready or not, the steps that failed,
    the address it set on which interface, and the grid container's state."""
    if not status.get("ready"):
        return f"not ready: {status.get('error') or 'no ready report'}"
    steps = status.get("steps") or {}
    failed = sorted(n for n, r in steps.items() if isinstance(r, dict) and not r.get("ok", True))
    parts = ["ready" if not failed else f"ready, failed steps: {', '.join(failed)}"]
    net = (steps.get("network") or {}).get("detail") or {}
    if net.get("address"):
        parts.append(f"address {net['address']}/{net.get('netmask', '?')} on {net.get('interface', '?')}")
    container = status.get("container") or {}
    if container:
        parts.append(f"container {'running' if container.get('running') else 'not running'}"
                     + (f" (pid {container['pid']})" if container.get("pid") else ""))
    return "; ".join(parts)


def _parse_time(text: str) -> float:
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _parse_duration(text: str) -> float:
    """An xs:duration limited to days/hours/minutes/seconds (P1DT2H, PT30M, PT90S)."""
    import re

    m = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", text.strip())
    if not m or text.strip() in ("P", "PT"):
        raise ValueError(f"{text!r} is not a duration of days, hours, minutes and seconds")
    d, h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


class VMManagerService(SoapService):
    name = "VMManagerService"
    wsdl = "vmmanager.wsdl"
    extra_understood_headers = frozenset({KEY_HEADER})

    def __init__(self, state_dir: Path, config: VMManagerConfig, pdp: PolicyDecisionPoint, *, vmm: VMM,
                 repository, notifier: Notifier | None = None):
        super().__init__(state_dir)
        self.config = config
        self.node = config.node or socket.gethostname()
        self.authz = Enforcer(pdp)
        self.vmm = vmm
        self.repository = repository
        self.notifier = notifier
        self.store = NodeStore(self.state_dir / "node.sqlite")
        self.cache = ImageCache(self.state_dir / "cache", self.store, repository)
        self.instances_dir = self.state_dir / "instances"
        self.instances_dir.mkdir(exist_ok=True)
        self.pool = LeaseRange.parse(config.lease_range, config.network, config.gateway or None, config.mac_prefix)
        self.executor = ThreadPoolExecutor(config.deploy_workers, thread_name_prefix="vmgrid-deploy")
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._event_handle: int | None = None
        self.service_url = ""   # learnt from the first call (the EPR address); config public_url otherwise
        self.reconcile_report = self.reconcile()
        self.log.info("node %s reconciled: %s", self.node, self.reconcile_report)

    # -- lifecycle of the service -------------------------------------------------------------------
    def start(self) -> None:
        self._event_handle = self.vmm.subscribe(self._on_vmm_event)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="vmgrid-lifetimes", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        self._stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._event_handle is not None:
            try:
                self.vmm.unsubscribe(self._event_handle)
            except Exception:
                pass
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        if self.notifier is not None:
            self.notifier.close()
        self.repository.close()
        self.vmm.close()
        self.store.close()

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.RLock())
        with lock:
            yield

    # -- helpers -------------------------------------------------------------------------------------
    def _dir(self, key: str) -> Path:
        return self.instances_dir / key

    def _epr(self, key: str) -> etree._Element:
        epr = etree.Element(f"{{{WSA}}}EndpointReference", nsmap={"wsa": WSA, "vmm": VMM_NS})
        etree.SubElement(epr, f"{{{WSA}}}Address").text = self.service_url
        params = etree.SubElement(epr, f"{{{WSA}}}ReferenceParameters")
        etree.SubElement(params, KEY_HEADER).text = key
        return epr

    def _learn_url(self, ctx: CallContext) -> None:
        if not self.service_url:
            self.service_url = f"{ctx.base_url}/wsrf/services/{self.name}"

    def _instance(self, ctx: CallContext) -> Instance:
        """The instance the request's InstanceKey reference parameter names (ResourceUnknown if none)."""
        self._learn_url(ctx)
        header = ctx.header(KEY_HEADER)
        if header is None or not (header.text or "").strip():
            raise ResourceUnknown("this operation is addressed to an instance: send its EndpointReference's "
                                  "InstanceKey as a SOAP header", resource="(none)")
        key = header.text.strip()
        inst = self.store.get(key)
        if inst is None or inst.state_enum == State.DESTROYED:
            raise ResourceUnknown(f"no instance {key} on node {self.node}"
                                  + (" (destroyed)" if inst is not None else ""), resource=key)
        return inst

    def _resource(self, inst: Instance) -> dict[str, str]:
        return {"type": "instance", "owner": inst.owner, "vo": inst.vo, "node": self.node, "id": inst.key,
                "image": inst.image_id}

    def _authorize(self, ctx: CallContext, inst: Instance, action: str, **context) -> None:
        self.authz.check(ctx.caller, action, self._resource(inst), {k: str(v) for k, v in context.items()})

    def _set_state(self, key: str, new: State, *, expect: set[State] | None = None, **values) -> bool:
        old = self.store.set_state(key, new, expect=expect, **values)
        if old is None:
            return False
        if old != new:
            self.log.info("instance %s: %s -> %s", key, old.value, new.value)
            self._notify(key, old, new)
        return True

    def _notify(self, key: str, old: State, new: State) -> None:
        if self.notifier is None:
            return
        inst = self.store.get(key)
        now = time.time()
        # the end of an instance reaches every subscriber, even one whose subscription ran out with it
        for _, consumer in self.store.subscriptions(key, 0.0 if new in FINAL else now):
            self.notifier.send(consumer, notify_envelope(consumer, self.service_url, key, inst.identifier,
                                                         old.value, new.value, now))
        if new in FINAL:
            self.store.drop_subscriptions(key)

    def _vmm(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VMMError as exc:
            raise VMMFault(f"{what}: {exc}", operation=what) from None

    # -- the resource properties ----------------------------------------------------------------------
    def _properties(self, inst: Instance) -> list[etree._Element]:
        """The instance's resource properties, in the order of vmm:InstanceType."""
        out = [_el("Identifier", inst.identifier), _el("State", inst.state), _el("Node", self.node),
               _el("Owner", inst.owner)]
        image = _el("Image")
        for name, value in (("imageId", inst.image_id), ("name", inst.image_name), ("vo", inst.vo),
                            ("sha256", inst.sha256), ("size", inst.size)):
            _sub(image, name, value)
        hardware = _el("Hardware")
        _sub(hardware, "memory", inst.memory)
        _sub(hardware, "vcpus", inst.vcpus)
        out += [image, hardware]
        if inst.address:
            out += [_el("Address", inst.address), _el("Mac", inst.mac)]
        out += [_el("Created", utc(inst.created)), _el("TerminationTime", utc(inst.termination), RL),
                _el("CurrentTime", utc(time.time()), RL)]
        phases = _el("PhaseTimings")
        for name, seconds in inst.phase_list():
            p = _sub(phases, "phase")
            _sub(p, "name", name)
            _sub(p, "seconds", repr(float(seconds)))
        out.append(phases)
        progress = self.cache.progress(inst.sha256) if inst.state == State.STAGING.value else None
        done, total = progress if progress else (inst.staged_bytes, inst.size)
        staging = _el("StagingProgress")
        _sub(staging, "bytesDone", done)
        _sub(staging, "bytesTotal", total)
        _sub(staging, "cached", "true" if inst.cached else "false")
        out += [staging, _el("GuestStatus", inst.guest_status)]
        if inst.failure:
            out.append(_el("Failure", inst.failure))
        out.append(_el("Lifetime", max(0, int(round(inst.termination - inst.created)))))
        return out

    def _instance_element(self, inst: Instance) -> etree._Element:
        el = _el("Instance")
        el.append(self._epr(inst.key))
        for p in self._properties(inst):
            if etree.QName(p).localname != "Lifetime":
                el.append(p)
        return el

    # -- deployment ---------------------------------------------------------------------------------
    @operation("Deploy")
    def deploy(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._learn_url(ctx)
        started = time.perf_counter()
        ws = copy.deepcopy(req.find("ws:workspace", NS))
        check_descriptor(ws)
        d = Descriptor(ws)
        if not (d.image_id and d.sha256 and d.size is not None and d.owner):
            raise InvalidDescriptor("deploy a descriptor as the repository gives it: it needs imageId, owner, "
                                    "sha256 and size", schemaMessage="descriptor not from the repository")
        identifier = req.findtext("vmm:identifier", namespaces=NS).strip()
        lifetime = int(req.findtext("vmm:lifetime", namespaces=NS))
        initial = (req.findtext("vmm:initialState", namespaces=NS) or "Running").strip()
        wait = (req.findtext("vmm:wait", namespaces=NS) or "false").strip() in ("true", "1")
        key = "inst-" + uuid.uuid4().hex

        # 1. authorize: vm.deploy on the image, the requested amounts in the context; obligations
        #    applied and the instance counted against the concurrent-instance limits in one step
        resource = {"type": "image", "vo": d.vo, "owner": d.owner, "name": d.name, "id": d.image_id,
                    "node": self.node}
        context = {"memory": str(d.memory), "vcpus": str(d.vcpus), "lifetime": str(lifetime),
                   "image": d.image_id, "node": self.node}
        decision, _slot = self.authz.claim(ctx.caller, key, resource, context)
        t_authorize = time.perf_counter() - started
        try:
            # 2. register: the descriptor checked against the repository, the instance recorded
            t = time.perf_counter()
            self.repository.verify(d)
            max_lifetime = decision.obligations.get("max_lifetime")
            now = time.time()
            inst = Instance(key=key, identifier=identifier, owner=ctx.dn, vo=d.vo, image_id=d.image_id,
                            image_name=d.name, sha256=d.sha256, size=d.size, format=d.image_format,
                            memory=d.memory, vcpus=d.vcpus, descriptor=etree.tostring(ws), state=State.REGISTERED.value,
                            initial_state=initial, address=None, mac=None, created=now, termination=now + lifetime,
                            max_lifetime=int(max_lifetime) if max_lifetime else None, token=new_token())
            self.store.insert(inst)
            self.store.add_phase(key, "authorize", t_authorize)
            self.store.add_phase(key, "register", time.perf_counter() - t)
            crashpoint("deploy.registered")
            # 3. lease a unique address and MAC
            t = time.perf_counter()
            self.store.lease(key, self.pool)
            self.store.add_phase(key, "lease", time.perf_counter() - t)
            crashpoint("deploy.leased")
        except BaseException as exc:
            self._release(key, quiet=True)
            if self.store.get(key) is not None:
                reason = f"{type(exc).__name__}: {getattr(exc, 'description', exc)}"
                self.store.set_state(key, State.FAILED, failure=reason)
            self.authz.release(key)
            raise
        self.log.info("instance %s (%s) of %s registered for %s, lifetime %d s", key, identifier, d.image_id,
                      ctx.dn, lifetime)
        if wait:
            self._deploy_rest(key, raise_fault=True)
        else:
            self.executor.submit(self._deploy_rest, key, False)
        resp = _el("DeployResponse")
        resp.append(self._instance_element(self.store.get(key)))
        return resp

    def _deploy_rest(self, key: str, raise_fault: bool) -> None:
        """Phases 4-8 (stage, overlay, context, power on, guest ready); on failure the instance is
        Failed and everything it held is released."""
        try:
            self._stage(key)
            with self._locked(key):
                inst = self.store.get(key)
                if inst.state != State.STAGING.value:   # destroyed meanwhile
                    return
                self._set_state(key, State.STARTING, expect={State.STAGING})
                self._start_instance(key)
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
            self.log.exception("deployment of %s failed", key)
            fault = InternalFault(f"deployment failed unexpectedly: {exc}", incident=key)
            self._fail(key, fault)
            if raise_fault:
                raise fault from None

    def _stage(self, key: str) -> None:
        inst = self.store.get(key)
        if not self._set_state(key, State.STAGING, expect={State.REGISTERED}):
            return
        t = time.perf_counter()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last[0] > 0.5:
                last[0] = time.monotonic()
                self.store.update(key, staged_bytes=done)

        _, cached = self.cache.get(inst.image_id, inst.sha256, inst.size, inst.format, progress)
        hold = self.repository.hold(inst.image_id, f"{self.service_url}#{key}",
                                    int(inst.termination - time.time()) + self.config.hold_grace)
        self.store.update(key, staged_bytes=inst.size, cached=1 if cached else 0, hold_id=hold)
        self.store.add_phase(key, "stage", time.perf_counter() - t)
        crashpoint("deploy.staged")

    def _start_instance(self, key: str) -> None:
        inst = self.store.get(key)
        d = Descriptor(etree.fromstring(inst.descriptor))
        home = self._dir(key)
        home.mkdir(parents=True, exist_ok=True)
        # 5. the copy-on-write overlay on the cached image (and empty data/scratch disks)
        t = time.perf_counter()
        disks = []
        for n, disk in enumerate(d.disks):
            if disk.role == "root":
                path = self.cache.overlay(inst.sha256, inst.format, home / "root.qcow2")
            else:
                path = home / f"{disk.role}{n}.qcow2"
                self._empty_disk(path, disk.size)
            disks.append(Disk(path, "qcow2", disk.bus, disk.role))
        self.store.add_phase(key, "overlay", time.perf_counter() - t)
        crashpoint("deploy.overlay")
        # 6. the context, as an ISO 9660 image on a virtual CD-ROM
        t = time.perf_counter()
        command = shlex.split(d.container_command) if d.container_command else None
        ctx = build_context(instance=key, hostname=inst.identifier.replace(".", "-").replace("_", "-")[:63],
                            mac=inst.mac, address=inst.address, netmask=str(self.pool.network.netmask),
                            gateway=self.pool.gateway, dns=self.config.dns, container_command=command,
                            token=inst.token)
        iso = write_context_iso(ctx, home / "context.iso")
        self.store.add_phase(key, "context", time.perf_counter() - t)
        crashpoint("deploy.context")
        # 7. define and power on (or leave paused)
        t = time.perf_counter()
        spec = self._spec(inst, d, disks, iso)
        paused = inst.initial_state == State.PAUSED.value
        self._vmm("define", self.vmm.define, spec)
        self._vmm("power on", self.vmm.start, key, paused=paused)
        self.store.add_phase(key, "power-on", time.perf_counter() - t)
        crashpoint("deploy.powered-on")
        # 8. guestd reports ready (real guests with a guest channel)
        if spec.channel is not None and not paused:
            t = time.perf_counter()
            try:
                # a short poll: a ready report is noticed within a quarter second, not a 2 s step
                report = self.vmm.guest_channel(key).wait_ready(timeout=self.config.guest_ready_timeout, poll=0.25)
                status = guest_summary(report)
            except VMMError as exc:
                status = f"no report: {exc}"
            self.store.update(key, guest_status=status)
            self.store.add_phase(key, "guest-ready", time.perf_counter() - t)
        self._set_state(key, State.PAUSED if paused else State.RUNNING, expect={State.STARTING})

    def _empty_disk(self, path: Path, size: int) -> None:
        import subprocess

        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"qemu-img create failed: {r.stderr.strip()}")

    def _spec(self, inst: Instance, d: Descriptor, disks: list[Disk], iso: Path) -> InstanceSpec:
        home = self._dir(inst.key)
        boot = None
        if d.element.findtext("ws:software/ws:boot/ws:method", namespaces=WS_NSMAP) == "kernel":
            if not self.config.kernel:
                raise VMMFault("the image boots a kernel, and this node has none configured ([vmmanager] kernel)",
                               operation="define")
            cmdline = d.element.findtext("ws:software/ws:boot/ws:cmdline", namespaces=WS_NSMAP) or self.config.cmdline
            boot = KernelBoot(Path(self.config.kernel), Path(self.config.initrd) if self.config.initrd else None,
                              cmdline)
        serial = tuple(Port(t, home / f"serial{n}.log" if t == "file" else None) for n, t in enumerate(
            d.element.xpath("ws:hardware/ws:serialPort/ws:type/text()", namespaces=WS_NSMAP)))
        parallel = tuple(Port(t, home / f"parallel{n}.log" if t == "file" else None) for n, t in enumerate(
            d.element.xpath("ws:hardware/ws:parallelPort/ws:type/text()", namespaces=WS_NSMAP)))
        models = d.element.xpath("ws:hardware/ws:nic/ws:model/text()", namespaces=WS_NSMAP) or ["virtio"]
        nic = Nic(inst.mac, self.config.nic_kind, self.config.nic_source or None, models[0])
        channel = None
        if self.vmm.capabilities.guest_channel:
            channel = GuestChannel(home / "guestd.sock", inst.token)
        return InstanceSpec(name=inst.key, memory_mib=inst.memory, vcpus=inst.vcpus, arch=d.architecture,
                            disks=tuple(disks), cdroms=(iso,), serial_ports=serial, parallel_ports=parallel,
                            nics=(nic,), boot=boot, channel=channel)

    def _fail(self, key: str, fault: VMGridFault) -> None:
        inst = self.store.get(key)
        if inst is None or inst.state_enum in FINAL:
            return
        self.log.warning("instance %s failed: %s", key, fault.description)
        with self._locked(key):
            self._release(key)
            self._set_state(key, State.FAILED, failure=f"{type(fault).__name__}: {fault.description}")
        self.authz.release(key)

    def _release(self, key: str, quiet: bool = False) -> None:
        """Give back everything an instance holds: domain, overlay/context/state files, lease, image hold."""
        inst = self.store.get(key)
        for verb in ("destroy", "undefine"):
            try:
                getattr(self.vmm, verb)(key)
            except InstanceNotFound:
                break
            except VMMError as exc:
                if not quiet:
                    self.log.warning("instance %s: %s failed: %s", key, verb, exc)
        shutil.rmtree(self._dir(key), ignore_errors=True)
        self.store.release_lease(key)
        if inst is not None and inst.hold_id:
            self.repository.release(inst.hold_id)
            self.store.update(key, hold_id=None)

    def _destroy(self, key: str, reason: str) -> None:
        with self._locked(key):
            inst = self.store.get(key)
            if inst is None or inst.state_enum in FINAL:
                return
            self._release(key)
            self._set_state(key, State.DESTROYED)
        self.authz.release(key)
        self.log.info("instance %s destroyed (%s)", key, reason)

    # -- factory operations ------------------------------------------------------------------------------
    @operation("ListInstances")
    def list_instances(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._learn_url(ctx)
        self.authz.check(ctx.caller, "vm.list", {"type": "node", "node": self.node, "owner": ctx.dn})
        ended = (req.findtext("vmm:includeEnded", namespaces=NS) or "false").strip() in ("true", "1")
        resp = _el("ListInstancesResponse")
        for inst in self.store.list(ctx.dn, live_only=not ended):
            resp.append(self._instance_element(inst))
        return resp

    # -- control -----------------------------------------------------------------------------------------
    def _control(self, ctx: CallContext, action: str, transition: str, fn) -> etree._Element:
        inst = self._instance(ctx)
        self._authorize(ctx, inst, action)
        with self._locked(inst.key):
            inst = self.store.get(inst.key)
            states.check(inst.state_enum, transition)
            new = fn(inst)
            self._set_state(inst.key, new)
        return new

    def _state_response(self, name: str, state: State) -> etree._Element:
        resp = _el(name)
        _sub(resp, "State", state.value)
        return resp

    @operation("Start")
    def start_instance(self, ctx, req):
        def run(inst):
            self._vmm("start", self.vmm.start, inst.key)
            return State.RUNNING
        return self._state_response("StartResponse", self._control(ctx, "vm.start", "start", run))

    @operation("Pause")
    def pause(self, ctx, req):
        def run(inst):
            self._vmm("pause", self.vmm.pause, inst.key)
            return State.PAUSED
        return self._state_response("PauseResponse", self._control(ctx, "vm.pause", "pause", run))

    @operation("Resume")
    def resume(self, ctx, req):
        def run(inst):
            synced = self._vmm("resume", self.vmm.resume, inst.key)
            if synced:
                self.store.update(inst.key, guest_status="ready (clock set after resume)")
            return State.RUNNING
        return self._state_response("ResumeResponse", self._control(ctx, "vm.resume", "resume", run))

    @operation("Save")
    def save(self, ctx, req):
        def run(inst):
            path = self._dir(inst.key) / "state.save"
            path.unlink(missing_ok=True)
            self._vmm("save", self.vmm.save, inst.key, path)
            return State.SAVED
        return self._state_response("SaveResponse", self._control(ctx, "vm.save", "save", run))

    @operation("Restore")
    def restore(self, ctx, req):
        paused = (req.findtext("vmm:paused", namespaces=NS) or "false").strip() in ("true", "1")

        def run(inst):
            path = self._dir(inst.key) / "state.save"
            self._vmm("restore", self.vmm.restore, path, paused=paused)
            path.unlink(missing_ok=True)
            return State.PAUSED if paused else State.RUNNING
        return self._state_response("RestoreResponse", self._control(ctx, "vm.restore", "restore", run))

    @operation("Shutdown")
    def shutdown(self, ctx, req):
        mode = req.findtext("vmm:mode", namespaces=NS).strip()
        timeout = int(req.findtext("vmm:timeout", namespaces=NS) or self.config.shutdown_timeout)
        if mode == "Trash":
            def run(inst):
                try:
                    self.vmm.destroy(inst.key)
                except VMMError as exc:
                    raise VMMFault(f"power off: {exc}", operation="shutdown") from None
                return State.SHUTOFF
            return self._state_response("ShutdownResponse", self._control(ctx, "vm.shutdown", "shutdown-trash", run))
        inst = self._instance(ctx)
        self._authorize(ctx, inst, "vm.shutdown")
        with self._locked(inst.key):
            inst = self.store.get(inst.key)
            states.check(inst.state_enum, "shutdown-normal")
            self._set_state(inst.key, State.SHUTTING_DOWN)
            try:
                graceful = self._vmm("shutdown", self.vmm.shutdown, inst.key, timeout=timeout)
            except VMGridFault:
                self._set_state(inst.key, State.RUNNING, expect={State.SHUTTING_DOWN})
                raise
            self.store.update(inst.key, guest_status="shut down" if graceful else "forced off after timeout")
            self._set_state(inst.key, State.SHUTOFF, expect={State.SHUTTING_DOWN})
        return self._state_response("ShutdownResponse", State.SHUTOFF)

    @operation("Destroy")
    def destroy(self, ctx, req):
        inst = self._instance(ctx)
        self._authorize(ctx, inst, "vm.destroy")
        states.check(inst.state_enum, "destroy")
        self._destroy(inst.key, f"by {ctx.dn}")
        return etree.Element(f"{{{RL}}}DestroyResponse", nsmap={"wsrf-rl": RL})

    @operation("SetTerminationTime")
    def set_termination_time(self, ctx, req):
        inst = self._instance(ctx)
        states.check(inst.state_enum, "set-lifetime")
        now = time.time()
        requested = req.find("wsrf-rl:RequestedTerminationTime", NS)
        try:
            if requested is not None:
                if requested.get("{http://www.w3.org/2001/XMLSchema-instance}nil") in ("true", "1"):
                    raise InvalidArgument("an instance always has a termination time; ask for a later one",
                                          argument="RequestedTerminationTime")
                new = _parse_time(requested.text or "")
            else:
                new = now + _parse_duration(req.findtext("wsrf-rl:RequestedLifetimeDuration", namespaces=NS) or "")
        except ValueError as exc:
            raise InvalidArgument(str(exc), argument="SetTerminationTime") from None
        if new <= now:
            raise InvalidArgument("the requested termination time is in the past; use Destroy to end it now",
                                  argument="RequestedTerminationTime")
        lifetime = int(new - inst.created)
        self._authorize(ctx, inst, "vm.set-lifetime", lifetime=lifetime)
        if inst.max_lifetime is not None and lifetime > inst.max_lifetime:
            raise LimitExceeded(f"a lifetime of {lifetime} s exceeds the {inst.max_lifetime} s this deployment was "
                                f"authorized for", limit="max_lifetime", allowed=str(inst.max_lifetime),
                                requested=str(lifetime))
        self.store.update(inst.key, termination=new)
        if inst.hold_id:  # the image stays held as long as the instance may live
            hold = self.repository.hold(inst.image_id, f"{self.service_url}#{inst.key}",
                                        int(new - time.time()) + self.config.hold_grace)
            self.store.update(inst.key, hold_id=hold)
            self.repository.release(inst.hold_id)
        resp = etree.Element(f"{{{RL}}}SetTerminationTimeResponse", nsmap={"wsrf-rl": RL})
        etree.SubElement(resp, f"{{{RL}}}NewTerminationTime").text = utc(new)
        etree.SubElement(resp, f"{{{RL}}}CurrentTime").text = utc(time.time())
        return resp

    # -- inspection ----------------------------------------------------------------------------------------
    def _property(self, inst: Instance, qname: etree.QName) -> list[etree._Element]:
        """The elements of one resource property (none when it has no value now, e.g. Failure)."""
        if qname.text not in RESOURCE_PROPERTIES:
            known = ", ".join(sorted(etree.QName(q).localname for q in RESOURCE_PROPERTIES))
            raise InvalidArgument(f"no resource property {qname.text}; an instance has: {known}",
                                  argument="ResourceProperty")
        return [p for p in self._properties(inst) if p.tag == qname.text]

    def _qname(self, el: etree._Element) -> etree.QName:
        text = (el.text or "").strip()
        prefix, _, local = text.rpartition(":")
        ns = el.nsmap.get(prefix or None)
        if ns is None:
            raise InvalidArgument(f"cannot resolve the prefix of {text!r}", argument="ResourceProperty")
        return etree.QName(ns, local)

    @operation("GetResourceProperty")
    def get_resource_property(self, ctx, req):
        inst = self._instance(ctx)
        self._authorize(ctx, inst, "vm.inspect")
        resp = etree.Element(f"{{{RP}}}GetResourcePropertyResponse", nsmap={"wsrf-rp": RP})
        for p in self._property(inst, self._qname(req)):
            resp.append(p)
        return resp

    @operation("GetMultipleResourceProperties")
    def get_multiple_resource_properties(self, ctx, req):
        inst = self._instance(ctx)
        self._authorize(ctx, inst, "vm.inspect")
        resp = etree.Element(f"{{{RP}}}GetMultipleResourcePropertiesResponse", nsmap={"wsrf-rp": RP})
        for el in req.iterfind("wsrf-rp:ResourceProperty", NS):
            for p in self._property(inst, self._qname(el)):
                resp.append(p)
        return resp

    @operation("Subscribe")
    def subscribe(self, ctx, req):
        inst = self._instance(ctx)
        self._authorize(ctx, inst, "vm.inspect")
        states.check(inst.state_enum, "subscribe")
        consumer = (req.findtext("wsnt:ConsumerReference/wsa:Address", namespaces=NS) or "").strip()
        if not consumer.startswith(("https://", "http://")):
            raise InvalidArgument("the consumer reference needs an http(s) address", argument="ConsumerReference")
        expires = inst.termination
        initial = req.findtext("wsnt:InitialTerminationTime", namespaces=NS)
        if initial:
            try:
                expires = min(expires, _parse_time(initial))
            except ValueError as exc:
                raise InvalidArgument(str(exc), argument="InitialTerminationTime") from None
        sub_key = "sub-" + uuid.uuid4().hex
        self.store.subscribe(sub_key, inst.key, consumer, ctx.dn, expires)
        resp = etree.Element(f"{{{WSNT}}}SubscribeResponse", nsmap={"wsnt": WSNT, "wsa": WSA, "vmm": VMM_NS})
        ref = etree.SubElement(resp, f"{{{WSNT}}}SubscriptionReference")
        etree.SubElement(ref, f"{{{WSA}}}Address").text = self.service_url
        params = etree.SubElement(ref, f"{{{WSA}}}ReferenceParameters")
        etree.SubElement(params, f"{{{VMM_NS}}}SubscriptionKey").text = sub_key
        etree.SubElement(resp, f"{{{WSNT}}}CurrentTime").text = utc(time.time())
        etree.SubElement(resp, f"{{{WSNT}}}TerminationTime").text = utc(expires)
        return resp

    # -- lifetimes, VMM events, recovery --------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        """Destroy the instances whose termination time has passed; returns their keys."""
        expired = self.store.expired(time.time() if now is None else now)
        for key in expired:
            try:
                self._destroy(key, "its termination time passed")
            except Exception:
                self.log.exception("could not destroy expired instance %s", key)
        return expired

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.config.sweep_interval):
            try:
                self.sweep()
            except Exception:
                self.log.exception("lifetime sweep failed")

    def _on_vmm_event(self, event: LifecycleEvent) -> None:
        # runs on libvirt's event thread: hand over, never call the VMM here
        if event.kind in (LifecycleEventKind.STOPPED, LifecycleEventKind.CRASHED):
            threading.Thread(target=self._guest_stopped, args=(event,), daemon=True).start()

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
        domains = {i.name: i for i in self.vmm.list_instances()}
        live = {i.key: i for i in self.store.list(None, live_only=True)}
        for key, inst in live.items():
            state = inst.state_enum
            dom = domains.get(key)
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
            if state == State.SAVED and dom.state == InstanceState.SHUTOFF and (self._dir(key) / "state.save").exists():
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
        for d in self.instances_dir.iterdir():
            if d.name not in live_now:
                shutil.rmtree(d, ignore_errors=True)
                report["dirs_removed"] += 1
        report.update(self.cache.reconcile())
        try:
            self.authz.reconcile(sorted(live_now))
        except VMGridFault as exc:
            self.log.warning("could not reconcile instance slots with the Authorization service: %s", exc.description)
        return report
