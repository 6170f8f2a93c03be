"""A VMManager from a scientist's side: deploy a descriptor for a lifetime, then control and inspect
the instance through its EndpointReference (the InstanceKey travels as a signed SOAP header)."""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from lxml import etree
from zeep.plugins import Plugin

from client.soap import GridServiceClient
from security.delegation import DEFAULT_LIFETIME, delegate
from services.vmmanager import migration_wire
from services.common.xsdtime import format_duration, to_datetime
from services.vmmanager import wire
from services.vmmanager.values import DomainRow, NodeDomains
from services.vmmanager.wire import ALL_PROPERTIES, KEY_HEADER, NS, property_qname
from services.wsrf.epr import EndpointReference
from services.wsrf.namespaces import RL


VMM = wire.VMM_NS
FINAL_STATES = ("Destroyed", "Failed")
WALK_PAGE = 200         # instances per ListInstances call when all of them are listed


@dataclass(frozen=True)
class InstanceRef:
    """An instance's EndpointReference: the VMManager's address and the InstanceKey."""

    address: str
    key: str

    @classmethod
    def from_epr(cls, epr: etree._Element) -> "InstanceRef":
        ref = EndpointReference.from_element(epr)
        return cls(ref.address, ref.parameter(KEY_HEADER))

    def header(self) -> etree._Element:
        return EndpointReference.of(self.address, KEY_HEADER, self.key).headers()[0]


_time = to_datetime


def _children(el: etree._Element) -> dict[str, etree._Element]:
    """An element's child elements by tag (the first of each)."""
    out: dict[str, etree._Element] = {}
    for c in el:
        out.setdefault(c.tag, c)
    return out


@functools.lru_cache(maxsize=None)
def _clark(path: str) -> str:
    """``vmm:Image/vmm:name`` in Clark notation: found without resolving prefixes on every call (a listing
    reads twenty paths per instance)."""
    return "/".join(f"{{{NS[p]}}}{local}" for p, _, local in (step.rpartition(":") for step in path.split("/")))


@dataclass
class InstanceInfo:
    """An instance as its resource properties describe it."""

    ref: InstanceRef | None
    identifier: str = ""
    state: str = ""
    node: str = ""
    owner: str = ""
    image_id: str = ""
    image_name: str = ""
    vo: str = ""
    sha256: str = ""
    size: int = 0
    memory: int = 0
    vcpus: int = 0
    address: str | None = None
    mac: str | None = None
    created: datetime | None = None
    termination: datetime | None = None
    current: datetime | None = None
    phases: list[tuple[str, float]] = field(default_factory=list)
    staged: tuple[int, int, bool] = (0, 0, False)
    guest_status: str = ""
    failure: str | None = None
    job_service: dict | None = None     # the grid container's job service: url, dn (docs/jobs.md)
    # the phases of its earlier operations on this node, oldest first (EarlierPhaseTimings: its deployment's, an
    # earlier migration's, when it came back by migration); ``phases`` are its latest operation's
    earlier_phases: list[list[tuple[str, float]]] = field(default_factory=list)

    @classmethod
    def from_properties(cls, ref: InstanceRef | None, props: etree._Element) -> "InstanceInfo":
        children = _children(props)     # one pass over the elements, not a path search per property

        nested: dict[str, dict] = {}

        def t(name: str) -> str | None:
            first, _, rest = name.partition("/")
            el = children.get(_clark(first))
            if el is not None and rest:
                if first not in nested:
                    nested[first] = _children(el)
                el = nested[first].get(_clark(rest))
            return el.text if el is not None else None

        info = cls(ref)
        info.identifier = t("vmm:Identifier") or ""
        info.state = t("vmm:State") or ""
        info.node = t("vmm:Node") or ""
        info.owner = t("vmm:Owner") or ""
        info.image_id = t("vmm:Image/vmm:imageId") or ""
        info.image_name = t("vmm:Image/vmm:name") or ""
        info.vo = t("vmm:Image/vmm:vo") or ""
        info.sha256 = t("vmm:Image/vmm:sha256") or ""
        info.size = int(t("vmm:Image/vmm:size") or 0)
        info.memory = int(t("vmm:Hardware/vmm:memory") or 0)
        info.vcpus = int(t("vmm:Hardware/vmm:vcpus") or 0)
        info.address, info.mac = t("vmm:Address"), t("vmm:Mac")
        info.created = _time(t("vmm:Created"))
        info.termination = _time(t("wsrf-rl:TerminationTime"))
        info.current = _time(t("wsrf-rl:CurrentTime"))
        timings = children.get(_clark("vmm:PhaseTimings"))
        info.phases = [(c.get(_clark("vmm:name")).text, float(c.get(_clark("vmm:seconds")).text))
                       for c in (_children(p) for p in (timings if timings is not None else ())
                                 if p.tag == _clark("vmm:phase"))]
        if _clark("vmm:StagingProgress") in children:
            info.staged = (int(t("vmm:StagingProgress/vmm:bytesDone")), int(t("vmm:StagingProgress/vmm:bytesTotal")),
                           t("vmm:StagingProgress/vmm:cached") == "true")
        info.guest_status = t("vmm:GuestStatus") or ""
        info.failure = t("vmm:Failure")
        el = children.get(_clark("vmm:JobService"))
        if el is not None:
            info.job_service = wire.JobService.parse(el)
        el = children.get(_clark("vmm:EarlierPhaseTimings"))
        if el is not None:
            info.earlier_phases = wire.EarlierPhaseTimings.parse(el)
        return info

    @classmethod
    def from_instance(cls, el: etree._Element) -> "InstanceInfo":
        return cls.from_properties(InstanceRef.from_epr(el.find("wsa:EndpointReference", NS)), el)

    @property
    def lifetime_left(self) -> float | None:
        if self.termination is None or self.current is None:
            return None
        return (self.termination - self.current).total_seconds()


_SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


class _ListingReadWithLxml(Plugin):
    """ListInstances' answer is read with lxml (:meth:`InstanceInfo.from_instance`) from the envelope the client
    kept once its signature was verified, never in zeep's object form: zeep, which builds that form after
    both, gets the answer without its instances (building it was most of the call at a hundred instances).
    A fault passes unchanged."""

    def ingress(self, envelope, http_headers, operation):
        if getattr(operation, "name", "") != "ListInstances":
            return None
        root = envelope.getroot() if isinstance(envelope, etree._ElementTree) else envelope
        body = root.find(f"{{{_SOAP_ENV}}}Body")
        payload = next((c for c in body if isinstance(c.tag, str)), None) if body is not None else None
        if payload is None or payload.tag != f"{{{VMM}}}ListInstancesResponse":
            return None
        bare = etree.Element(root.tag, nsmap=root.nsmap)
        etree.SubElement(bare, body.tag).append(etree.Element(payload.tag, nsmap={"vmm": VMM}))
        return bare, http_headers


# the instance properties a node of an earlier version does not have: `status` asks again without one it refuses
# (InvalidArgument naming it), and no more of that node (a new client against an older node)
NEWER_PROPERTIES = ("EarlierPhaseTimings",)


class VMManagerClient:
    def __init__(self, service: GridServiceClient):
        self.service = service
        self._unknown: set[str] = set()       # NEWER_PROPERTIES this node refused
        plugins = getattr(getattr(service, "zeep", None), "plugins", None)   # after the client's own, which
        if plugins is not None and not any(isinstance(p, _ListingReadWithLxml) for p in plugins):   # keeps the envelope
            plugins.append(_ListingReadWithLxml())

    # -- the factory ----------------------------------------------------------------------------------
    def deploy(self, descriptor: etree._Element, identifier: str, lifetime: int, *, paused: bool = False,
               wait: bool = False) -> InstanceInfo:
        """Deploy a descriptor (as the repository gave it) for ``lifetime`` seconds. Without ``wait`` the
        answer comes once the instance is registered (then watch it); with it, once it runs."""
        # built as lxml in the schema's order and sent without zeep rendering it: zeep would first read the whole
        # descriptor into its object form and then write it out again (most of the client's CPU per deploy)
        req = self.service.new_request(f"{{{VMM}}}Deploy", {"vmm": VMM})
        req.append(copy.deepcopy(descriptor))
        for name, value in (("identifier", identifier), ("lifetime", str(int(lifetime))),
                            ("initialState", "Paused" if paused else None), ("wait", "true" if wait else None)):
            if value is not None:
                etree.SubElement(req, f"{{{VMM}}}{name}").text = value
        resp = self.service.call("Deploy", payload=req)
        return InstanceInfo.from_instance(resp.find("vmm:Instance", NS))

    def list(self, include_ended: bool = False, *, page_size: int | None = WALK_PAGE) -> list[InstanceInfo]:
        """All of the caller's instances on the node: every page of ListInstances, following the cursor, in pages
        of ``page_size`` (None: the node's default page; the larger the page, the fewer signed round trips)."""
        infos, cursor = self.list_page(include_ended, max_results=page_size)
        while cursor is not None:
            more, cursor = self.list_page(include_ended, max_results=page_size, cursor=cursor)
            infos += more
        return infos

    def list_page(self, include_ended: bool = False, *, max_results: int | None = None,
                  cursor: str | None = None) -> tuple[list[InstanceInfo], str | None]:
        """One page of ListInstances: its instances and the next page's cursor (None: it was the last)."""
        kwargs = {"includeEnded": True} if include_ended else {}
        if max_results is not None:
            kwargs["maxResults"] = max_results
        if cursor is not None:
            kwargs["cursor"] = cursor
        resp = self.service.call("ListInstances", **kwargs)
        nxt = resp.findtext("vmm:cursor", namespaces=NS) if resp.findtext("vmm:more", namespaces=NS) == "true" else None
        return [InstanceInfo.from_instance(el) for el in resp.iterfind("vmm:Instance", NS)], nxt

    def domains(self) -> NodeDomains:
        """Site admins: the node's hypervisor domains beside its instance records (ListDomains)."""
        resp = self.service.call("ListDomains")
        rows = tuple(DomainRow(d.findtext("vmm:name", namespaces=NS), d.findtext("vmm:uuid", namespaces=NS),
                               d.findtext("vmm:hypervisorState", namespaces=NS),
                               d.findtext("vmm:instance", namespaces=NS), d.findtext("vmm:instanceState", namespaces=NS))
                     for d in resp.iterfind("vmm:domain", NS))
        missing = tuple((m.findtext("vmm:instance", namespaces=NS), m.findtext("vmm:instanceState", namespaces=NS))
                        for m in resp.iterfind("vmm:missingDomain", NS))
        return NodeDomains(resp.findtext("vmm:node", namespaces=NS), rows, missing)

    # -- an instance --------------------------------------------------------------------------------------
    def _on(self, ref: InstanceRef, operation: str, *args, **kwargs) -> etree._Element:
        return self.service.call(operation, *args, _soapheaders=[ref.header()], **kwargs)

    def _on_bare(self, ref: InstanceRef, operation: str, tag: str) -> etree._Element:
        """``operation`` whose request is the empty element ``tag``, built as lxml with the instance's key in the
        Header and sent without zeep rendering anything (the cheapest signed call)."""
        req = self.service.new_request(tag)
        req.getparent().getparent()[0].append(ref.header())
        return self.service.call(operation, payload=req)

    def _state(self, ref: InstanceRef, operation: str, **kwargs) -> str:
        return self._on(ref, operation, **kwargs).findtext("vmm:State", namespaces=NS)

    def start(self, ref: InstanceRef) -> str:
        return self._state(ref, "Start")

    def pause(self, ref: InstanceRef) -> str:
        return self._state(ref, "Pause")

    def resume(self, ref: InstanceRef) -> str:
        return self._state(ref, "Resume")

    def save(self, ref: InstanceRef) -> str:
        return self._state(ref, "Save")

    def restore(self, ref: InstanceRef, paused: bool = False) -> str:
        return self._state(ref, "Restore", **({"paused": True} if paused else {}))

    def shutdown(self, ref: InstanceRef, mode: str = "Normal", timeout: int | None = None) -> str:
        return self._state(ref, "Shutdown", mode=mode, **({"timeout": timeout} if timeout else {}))

    def destroy(self, ref: InstanceRef) -> list[str]:
        """Destroy the instance. Returns the releases at the central services still pending (the answer's
        signed vmm:CleanupPending header: the node retries them), empty when everything was given back."""
        self._on_bare(ref, "Destroy", f"{{{RL}}}Destroy")
        pending = self.service.response_header(wire.CLEANUP_PENDING)
        return [] if pending is None else [r.text for r in pending.iterfind("vmm:release", NS)]

    def set_termination_time(self, ref: InstanceRef, when: datetime | None = None,
                             seconds: float | None = None) -> tuple[datetime, datetime]:
        """Move the termination time to ``when``, or to ``seconds`` from now; returns (new, current time)."""
        if when is not None:
            kwargs = {"RequestedTerminationTime": when.astimezone(timezone.utc)}
        else:
            kwargs = {"RequestedLifetimeDuration": format_duration(int(seconds))}
        resp = self._on(ref, "SetTerminationTime", **kwargs)
        return (_time(resp.findtext("wsrf-rl:NewTerminationTime", namespaces=NS)),
                _time(resp.findtext("wsrf-rl:CurrentTime", namespaces=NS)))

    def properties(self, ref: InstanceRef, *names: str) -> etree._Element:
        """GetMultipleResourceProperties: the response element holding the asked properties."""
        qnames = [property_qname(n) for n in names]
        return self._on(ref, "GetMultipleResourceProperties", ResourceProperty=qnames)

    def property(self, ref: InstanceRef, name: str) -> list[etree._Element]:
        """GetResourceProperty: the elements of one property."""
        qname = property_qname(name)
        return list(self._on(ref, "GetResourceProperty", qname))

    def status(self, ref: InstanceRef) -> InstanceInfo:
        """Every resource property of the instance, read at once. A node of an earlier version refuses one of
        NEWER_PROPERTIES (InvalidArgument naming it): asked again without it, and never again of this node; the
        instance then reads as the property's absence."""
        from services.faults import InvalidArgument

        while True:
            names = [n for n in ALL_PROPERTIES if n not in self._unknown]
            try:
                return InstanceInfo.from_properties(ref, self.properties(ref, *names))
            except InvalidArgument as exc:
                refused = {n for n in NEWER_PROPERTIES if n not in self._unknown and n in str(exc)}
                if not refused:
                    raise
                self._unknown |= refused

    def node_certificate(self, ref: InstanceRef):
        """The certificate the node signs its answers with (its host certificate), read from a signed answer."""
        self.property(ref, "State")
        signer = self.service.zeep.wsse.last_signer
        if signer is None:
            raise RuntimeError("the node's answer carried no verified signer")
        return signer.chain[0]

    def migrate(self, ref: InstanceRef, target: str, *, lifetime=DEFAULT_LIFETIME, mode: str = "Cold") -> InstanceInfo:
        """Move the instance to the VMManager at ``target``: a short-lived proxy of this client's credential is
        delegated to the node (issued for the node's own host key, as GT4's delegation service did), which acts as
        the user at the target. Returns the instance on the target (its new EPR and the phase timings)."""
        proxy = delegate(self.service.credential, self.node_certificate(ref), lifetime=lifetime)
        resp = self._on(ref, "Migrate", **migration_wire.migrate_request(target, proxy, mode))
        return InstanceInfo.from_instance(resp.find("vmm:Instance", NS))

    def subscribe(self, ref: InstanceRef, consumer_url: str) -> str:
        resp = self._on(ref, "Subscribe", ConsumerReference={"Address": consumer_url})
        return resp.findtext("wsnt:SubscriptionReference/wsa:ReferenceParameters/vmm:SubscriptionKey",
                             namespaces=NS)

    def wait_for(self, ref: InstanceRef, states: tuple[str, ...], timeout: float = 600,
                 on_update: Callable[[InstanceInfo], None] | None = None, interval: float = 0.2) -> InstanceInfo:
        """Poll the instance until it reaches one of ``states`` (or a final state)."""
        deadline = time.monotonic() + timeout
        while True:
            props = self.properties(ref, "State", "StagingProgress", "PhaseTimings")
            info = InstanceInfo.from_properties(ref, props)
            if on_update:
                on_update(info)
            if info.state in states or info.state in FINAL_STATES:
                return self.status(ref) if info.state != "Destroyed" else info
            if time.monotonic() > deadline:
                raise TimeoutError(f"instance {ref.key} still {info.state} after {timeout:.0f} s")
            time.sleep(interval)
