"""The VMManager on the wire: its namespace and headers, the instance's resource properties (one class
each, served generically by :data:`INSTANCE_PROPERTIES` and read back by the client with the same
classes), requests turned into the core's typed values and results into response elements.

Adding a resource property: one class below and one entry in :data:`INSTANCE_PROPERTIES` (and its
element in wsdl/vmmanager.xsd if it is to appear in an Instance element too; otherwise ``in_instance = False``).
"""
from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict

from lxml import etree

from services.common.xsdtime import format_datetime
from services.faults import InvalidArgument
from services.descriptor import WS, Descriptor, check_descriptor
from services.vmmanager.values import DeployRequest, InstanceView
from services.vmmanager.states import State
from services.wsrf.epr import EndpointReference
from services.wsrf.lifetime import CurrentTime, TerminationTime
from services.wsrf.namespaces import NS as WSRF_NS
from services.wsrf.namespaces import RL
from services.wsrf.notification import notify_envelope
from services.wsrf.properties import PropertySet, ResourceProperty, element, sub

VMM_NS = "http://vmgrid.org/ns/vmmanager/1"
NS = {"vmm": VMM_NS, "ws": WS, **WSRF_NS}
KEY_HEADER = f"{{{VMM_NS}}}InstanceKey"
SUBSCRIPTION_KEY = f"{{{VMM_NS}}}SubscriptionKey"


def q(local: str) -> str:
    return f"{{{VMM_NS}}}{local}"


# -- the instance's resource properties, in the order of vmm:InstanceType ------------------------------------
class _Simple(ResourceProperty[InstanceView]):
    prefix = "vmm"
    attribute = ""
    in_instance = True      # also part of a vmm:Instance element (vmm:InstanceType)

    def value(self, v: InstanceView):
        return getattr(v.inst, self.attribute)


class Identifier(_Simple):
    qname, attribute = q("Identifier"), "identifier"


class StateProperty(_Simple):
    qname, attribute = q("State"), "state"


class Node(ResourceProperty[InstanceView]):
    qname, prefix = q("Node"), "vmm"

    def value(self, v):
        return v.node


class Owner(_Simple):
    qname, attribute = q("Owner"), "owner"


class Image(ResourceProperty[InstanceView]):
    qname, prefix = q("Image"), "vmm"

    def elements(self, v):
        el = element(self.qname, None, "vmm")
        i = v.inst
        for name, value in (("imageId", i.image_id), ("name", i.image_name), ("vo", i.vo), ("sha256", i.sha256),
                            ("size", i.size)):
            sub(el, q(name), value)
        return [el]


class Hardware(ResourceProperty[InstanceView]):
    qname, prefix = q("Hardware"), "vmm"

    def elements(self, v):
        el = element(self.qname, None, "vmm")
        sub(el, q("memory"), v.inst.memory)
        sub(el, q("vcpus"), v.inst.vcpus)
        return [el]


class Address(_Simple):
    qname, attribute = q("Address"), "address"


class Mac(ResourceProperty[InstanceView]):
    qname, prefix = q("Mac"), "vmm"

    def value(self, v):
        return v.inst.mac if v.inst.address else None


class Created(ResourceProperty[InstanceView]):
    qname, prefix = q("Created"), "vmm"

    def value(self, v):
        return format_datetime(v.inst.created)


class PhaseTimings(ResourceProperty[InstanceView]):
    qname, prefix = q("PhaseTimings"), "vmm"

    def elements(self, v):
        el = element(self.qname, None, "vmm")
        self.add_phases(el, v.inst.phase_list())
        return [el]

    @staticmethod
    def add_phases(parent, phases) -> None:
        """A vmm:phase (name, seconds) under ``parent`` for each of ``phases``."""
        for name, seconds in phases:
            p = sub(parent, q("phase"))
            sub(p, q("name"), name)
            sub(p, q("seconds"), repr(float(seconds)))

    @classmethod
    def parse(cls, el):
        return [(p.findtext(q("name")), float(p.findtext(q("seconds")))) for p in el.iterfind(q("phase"))]


class EarlierPhaseTimings(ResourceProperty[InstanceView]):
    """The phases of the instance's earlier operations on this node (a PhaseTimings each, oldest first): its
    deployment's, or an earlier migration's, kept when it came back here by migration (trial16 T3: `vmgrid report`
    lost a migrated instance's deployment). Absent when there were none."""

    qname, prefix = q("EarlierPhaseTimings"), "vmm"

    def elements(self, v):
        groups = v.inst.earlier_phase_lists()
        if not groups:
            return []
        el = element(self.qname, None, "vmm")
        for group in groups:
            PhaseTimings.add_phases(sub(el, PhaseTimings.qname), group)
        return [el]

    @classmethod
    def parse(cls, el):
        return [PhaseTimings.parse(t) for t in el.iterfind(PhaseTimings.qname)]


class StagingProgress(ResourceProperty[InstanceView]):
    qname, prefix = q("StagingProgress"), "vmm"

    def elements(self, v):
        done, total = v.progress if v.progress else (v.inst.staged_bytes, v.inst.size)
        el = element(self.qname, None, "vmm")
        sub(el, q("bytesDone"), done)
        sub(el, q("bytesTotal"), total)
        sub(el, q("cached"), "true" if v.inst.cached else "false")
        return [el]

    @classmethod
    def parse(cls, el):
        return (int(el.findtext(q("bytesDone"))), int(el.findtext(q("bytesTotal"))), el.findtext(q("cached")) == "true")


class GuestStatus(_Simple):
    qname, attribute = q("GuestStatus"), "guest_status"


class Failure(_Simple):
    qname, attribute = q("Failure"), "failure"

    def value(self, v):
        return v.inst.failure or None


class Lifetime(ResourceProperty[InstanceView]):
    """The instance's whole lifetime in seconds (creation to termination); not part of an Instance element."""

    qname, prefix, in_instance = q("Lifetime"), "vmm", False

    def value(self, v):
        return max(0, int(round(v.inst.termination - v.inst.created)))


class ConsoleLog(ResourceProperty[InstanceView]):
    """The last 4 KiB of the instance's first serial console log (a descriptor serialPort of type file),
    as text; absent while there is none."""

    qname, prefix, in_instance = q("ConsoleLog"), "vmm", False
    TAIL = 4096

    def value(self, v):
        path = v.home / "serial0.log" if v.home is not None else None
        if path is None or not path.is_file():
            return None
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - self.TAIL))
            text = f.read(self.TAIL).decode("utf-8", "replace")
        # XML 1.0 cannot carry most control characters: a guest's console may print anything
        return "".join(c if c in "\t\n\r" or ord(c) >= 0x20 else "\ufffd" for c in text)


class JobService(ResourceProperty[InstanceView]):
    """The job service of the instance's grid container (docs/jobs.md): its URL and the subject of the
    certificate the node issued to it; absent until guestd asked for one and the node delivered it."""

    qname, prefix, in_instance = q("JobService"), "vmm", False

    def elements(self, v):
        from services.vmmanager.guestcred import job_service

        record = job_service(v.home)
        if record is None or v.inst.state in ("Destroyed", "Failed"):
            return []
        el = element(self.qname, None, "vmm")
        for name in ("url", "dn", "gridftp", "notAfter"):
            if record.get(name):
                sub(el, q(name), record[name])
        return [el]

    @classmethod
    def parse(cls, el):
        return {name: el.findtext(q(name)) for name in ("url", "dn", "gridftp", "notAfter") if el.find(q(name)) is not None}


INSTANCE_PROPERTIES: PropertySet[InstanceView] = PropertySet(
    [Identifier(), StateProperty(), Node(), Owner(), Image(), Hardware(), Address(), Mac(), Created(),
     TerminationTime(lambda v: v.inst.termination), CurrentTime(), PhaseTimings(), StagingProgress(),
     GuestStatus(), Failure(), EarlierPhaseTimings(), Lifetime(), ConsoleLog(), JobService()],
    what="an instance")
NOT_IN_INSTANCE_ELEMENT = tuple(p.qname for p in INSTANCE_PROPERTIES.properties if not getattr(p, "in_instance", True))
ALL_PROPERTIES = tuple(etree.QName(n).localname for n in INSTANCE_PROPERTIES.names)


def property_qname(local: str) -> etree.QName:
    """The QName of an instance property by its local name (TerminationTime and CurrentTime are WS-RL's)."""
    return etree.QName(RL if local in ("TerminationTime", "CurrentTime") else VMM_NS, local)


# -- responses --------------------------------------------------------------------------------------------------
def instance_epr(address: str, key: str) -> EndpointReference:
    return EndpointReference.of(address, KEY_HEADER, key)


def instance_element(view: InstanceView, address: str) -> etree._Element:
    """vmm:Instance: the instance's EPR and its properties."""
    el = element(q("Instance"), None, "vmm")
    el.append(instance_epr(address, view.inst.key).to_element(nsmap={"vmm": VMM_NS}))
    el.extend(INSTANCE_PROPERTIES.all(view, skip=NOT_IN_INSTANCE_ELEMENT))
    return el


_CURRENT_TIME = CurrentTime.qname


class InstanceFragments:
    """vmm:Instance elements kept per instance while its record, node, address and staging progress stay the
    same (at most ``size``, the least recently listed dropped first): listing an instance again costs a copy of
    its element with CurrentTime set, not rendering every property. Reads no file and calls nobody."""

    def __init__(self, size: int = 2048):
        self.size = size
        self._kept: OrderedDict[str, tuple[tuple, etree._Element]] = OrderedDict()
        self._lock = threading.Lock()
        self.rendered = 0      # elements rendered afresh (the rest were copies): for tests and benches

    def element(self, view: InstanceView, address: str, now: str | None = None) -> etree._Element:
        """The instance's element; ``now``: its CurrentTime text (one for a whole answer), default the clock."""
        key = view.inst.key
        version = (tuple(vars(view.inst).values()), view.node, view.progress, address)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept[0] == version:
                self._kept.move_to_end(key)
                el = copy.deepcopy(kept[1])
                el.find(_CURRENT_TIME).text = now or format_datetime(time.time())
                return el
        el = instance_element(view, address)
        with self._lock:
            self.rendered += 1
            self._kept[key] = (version, copy.deepcopy(el))
            self._kept.move_to_end(key)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        return el


def list_response(page, address: str, fragments: InstanceFragments) -> etree._Element:
    """ListInstancesResponse: the page's instances, whether more remain and, if so, the next page's cursor."""
    resp = response("ListInstancesResponse")
    now = format_datetime(time.time())
    for view in page.views:
        resp.append(fragments.element(view, address, now))
    sub(resp, q("more"), "true" if page.more else "false")
    if page.more:
        sub(resp, q("cursor"), page.cursor)
    return resp


def response(name: str) -> etree._Element:
    return element(q(name), None, "vmm")


def state_response(name: str, state: State) -> etree._Element:
    resp = response(name)
    sub(resp, q("State"), state.value)
    return resp


def domains_response(census) -> etree._Element:
    """ListDomainsResponse: the node, its domains (with the instance each belongs to) and the missing ones."""
    resp = response("ListDomainsResponse")
    sub(resp, q("node"), census.node)
    for d in census.domains:
        el = sub(resp, q("domain"))
        for name, value in (("name", d.name), ("uuid", d.uuid), ("hypervisorState", d.hypervisor_state),
                            ("instance", d.instance), ("instanceState", d.instance_state)):
            if value is not None:
                sub(el, q(name), value)
    for key, state in census.missing:
        el = sub(resp, q("missingDomain"))
        sub(el, q("instance"), key)
        sub(el, q("instanceState"), state)
    return resp


CLEANUP_PENDING = f"{{{VMM_NS}}}CleanupPending"


def cleanup_pending_header(pending: list[str]) -> etree._Element:
    """The Destroy answer's header when releases at the central services are pending (no mustUnderstand:
    a stack that does not know it ignores it; the response's signature covers it like every header)."""
    el = element(q("CleanupPending"), None, "vmm")
    for kind in pending:
        sub(el, q("release"), kind)
    return el


# -- requests ---------------------------------------------------------------------------------------------------
def flag(req: etree._Element, name: str) -> bool:
    return (req.findtext(f"vmm:{name}", namespaces=NS) or "false").strip() in ("true", "1")


def parse_list(req: etree._Element) -> tuple[bool, int | None, str | None]:
    """ListInstances: (includeEnded, maxResults or None, cursor or None)."""
    limit = req.findtext("vmm:maxResults", namespaces=NS)
    cursor = req.findtext("vmm:cursor", namespaces=NS)
    try:
        limit = int(limit) if limit is not None else None
    except ValueError:
        raise InvalidArgument(f"maxResults must be a whole number, not {limit!r}", argument="maxResults") from None
    return flag(req, "includeEnded"), limit, cursor.strip() if cursor is not None else None


def parse_deploy(req: etree._Element) -> DeployRequest:
    ws = copy.deepcopy(req.find("ws:workspace", NS))
    check_descriptor(ws)
    return DeployRequest(descriptor=Descriptor(ws), descriptor_xml=etree.tostring(ws),
                         identifier=req.findtext("vmm:identifier", namespaces=NS).strip(),
                         lifetime=int(req.findtext("vmm:lifetime", namespaces=NS)),
                         initial_state=(req.findtext("vmm:initialState", namespaces=NS) or "Running").strip(),
                         wait=flag(req, "wait"))


# -- notifications ------------------------------------------------------------------------------------------------
def state_change_envelope(consumer: str, producer: str, key: str, identifier: str, old: str, new: str,
                          when: float) -> etree._Element:
    """A Notify about an instance's state change (topic vmm:StateChange)."""
    change = element(q("StateChangeNotification"), None, "vmm")
    for name, value in (("InstanceKey", key), ("Identifier", identifier), ("oldState", old), ("newState", new),
                        ("time", format_datetime(when))):
        sub(change, q(name), value)
    return notify_envelope(consumer, instance_epr(producer, key), "vmm:StateChange", change, {"vmm": VMM_NS})
