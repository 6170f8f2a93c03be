"""Calling the Authorization service: :class:`AuthorizationClient` (typed calls, for the command line,
admins and tests) and :class:`ServicePolicyPoint`, the policy decision point an enforcing service
holds: signed SOAP with the service's host credential, permits cached briefly (never denials), and
fail closed: when the service cannot be reached, every decision is a ``ServiceUnavailable`` fault."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import requests

from services.soapclient import GridServiceClient, Unreachable
from security.pki import Credential
from security.tls import grid_session
from security.trust import TrustStore
from services.authz.pep import Decision, Slot, Subject
from services.authz.policy import Group, Limits, Rule
from services.authz.wire import (NS, StatusView, attributes_to_zeep, audit_from_xml, decision_from_xml,
                                 decision_request, el, group_from_xml, group_to_zeep, limits_from_xml, rule_from_xml,
                                 rule_to_zeep, slot_from_xml, status_from_xml, sub, subject_to_zeep, text)
from services.faults import AccessDenied, InternalFault, ServiceUnavailable, VMGridFault

log = logging.getLogger("vmgrid.authz.pep")
SERVICE_PATH = "/wsrf/services/AuthorizationService"
AUTHORIZE_MANY_MAX = 1000     # requests in one AuthorizeMany call (the schema's maxOccurs)


def connect(url: str, credential: Credential, trust: TrustStore, *, timeout: float | None = None,
            expected_host_dn: str | None = None) -> GridServiceClient:
    """A signed SOAP client for the service at ``url``; with ``timeout``, no call (nor the WSDL fetch) waits
    longer than that."""
    if timeout:
        try:  # bound the WSDL fetch: a service that accepts but never answers must not hang us
            grid_session(trust.cert_dir).get(url.split("?")[0] + "?wsdl", timeout=timeout).raise_for_status()
        except requests.exceptions.RequestException as exc:
            raise Unreachable(f"cannot fetch the WSDL of {url}: {_short(exc)}") from None
    client = GridServiceClient(url, credential, trust, expected_host_dn=expected_host_dn)
    if timeout:
        client.zeep.transport.operation_timeout = timeout
        client.zeep.transport.load_timeout = timeout
    return client


def _short(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "certificate verify failed", "timed out", "Read timed out"):
        if marker in text:
            return marker
    return text[:300]


class AuthorizationClient:
    """The Authorization service's operations with vmgrid's types (wsdl/authz.wsdl)."""

    def __init__(self, service: GridServiceClient):
        self.service = service
        self._answers_ahead: bool | None = None
        self._takes_known: dict[tuple[str, str], bool] = {}

    @classmethod
    def connect(cls, url: str, credential: Credential, trust: TrustStore, *, timeout: float | None = None,
                expected_host_dn: str | None = None) -> "AuthorizationClient":
        return cls(connect(url, credential, trust, timeout=timeout, expected_host_dn=expected_host_dn))

    # -- decisions ---------------------------------------------------------------------------------
    def authorize(self, subject: Subject, action: str, resource: Mapping[str, object] | None = None,
                  context: Mapping[str, object] | None = None) -> tuple[Decision, list[str]]:
        """The decision and the subject's groups."""
        resp = self.service.call("Authorize", payload=decision_request("Authorize", subject, action, resource, context))
        return decision_from_xml(resp), [g.text for g in resp.iterfind("az:group", NS)]

    def authorize_many(self, subject: Subject, requests: Sequence[tuple[str, Mapping[str, object], Mapping[str, object]]]
                       ) -> tuple[list[Decision], list[str]]:
        """One decision per (action, resource, context) request, in order (at most 1000), and the subject's groups."""
        items = []
        for action, resource, context in requests:
            item: dict = {"action": action}
            if resource:
                item["resource"] = attributes_to_zeep(resource)
            if context:
                item["context"] = attributes_to_zeep(context)
            items.append(item)
        resp = self.service.call("AuthorizeMany", subject=subject_to_zeep(subject), request=items)
        version = text(resp, "policyVersion") or ""
        decisions = [replace(decision_from_xml(r), policy=version) for r in resp.iterfind("az:result", NS)]
        if len(decisions) != len(items):
            raise InternalFault(f"AuthorizeMany answered {len(decisions)} of {len(items)} requests")
        return decisions, [g.text for g in resp.iterfind("az:group", NS)]

    def groups(self, dn: str) -> tuple[list[str], list[str]]:
        """(the groups ``dn`` belongs to, those it administers)."""
        resp = self.service.call("GetGroups", dn=dn)
        groups = list(resp.iterfind("az:group", NS))
        return [g.text for g in groups], [g.text for g in groups if g.get("admin") in ("true", "1")]

    # -- slots -------------------------------------------------------------------------------------
    def claim_slot(self, subject: Subject, instance: str, resource: Mapping[str, object] | None = None,
                   context: Mapping[str, object] | None = None, action: str = "vm.deploy", node: str = ""
                   ) -> tuple[Decision, Slot, bool]:
        """(decision, slot, renewed); raises AccessDenied or LimitExceeded. ``node``: the claiming service's
        own identity (the slot is keyed by it and the credential)."""
        return self.claim_slot_ahead(subject, instance, resource, context, action, node)[:3]

    def claim_slot_ahead(self, subject: Subject, instance: str, resource: Mapping[str, object] | None = None,
                         context: Mapping[str, object] | None = None, action: str = "vm.deploy", node: str = "",
                         ahead: Sequence[tuple[str, Mapping[str, object], Mapping[str, object]]] = ()
                         ) -> tuple[Decision, Slot, bool, list[Decision]]:
        """:meth:`claim_slot` with up to 4 questions about the same subject decided in the same call (``ahead``,
        (action, resource, context) each): their decisions in order, or none when the policy changed between the
        claim and them (or the service's contract has no ahead questions: nothing is sent then)."""
        if ahead and not self.answers_ahead:
            ahead = ()
        resp = self.service.call("ClaimSlot", payload=decision_request("ClaimSlot", subject, action, resource, context,
                                                                       instance=instance, node=node, ahead=ahead))
        decision = decision_from_xml(resp)
        later = [replace(decision_from_xml(r), policy=decision.policy) for r in resp.iterfind("az:aheadResult", NS)]
        return (decision, slot_from_xml(resp.find("az:slot", NS)), text(resp, "renewed") in ("true", "1"),
                later if len(later) == len(ahead) else [])

    @property
    def answers_ahead(self) -> bool:
        """Whether the service's WSDL (as fetched) lets ClaimSlot carry questions asked ahead: an older service
        would refuse the element, so a newer enforcing service sends none to it."""
        if self._answers_ahead is None:
            self._answers_ahead = self._takes("ClaimSlot", "ahead")
        return self._answers_ahead

    def _takes(self, operation: str, child: str) -> bool:
        """Whether the service's WSDL (as fetched) has ``child`` in ``operation``'s request (False when it cannot
        be read: an optional element an older service would refuse is then not sent)."""
        known = self._takes_known.get((operation, child))
        if known is None:
            try:
                known = child in {name for name, _ in
                                  self.service.zeep.get_element(f"{{{NS['az']}}}{operation}").type.elements}
            except Exception:  # noqa: BLE001 - a contract we cannot read
                known = False
            self._takes_known[(operation, child)] = known
        return known

    def release_slot(self, instance: str, node: str = "") -> Slot | None:
        req = el("ReleaseSlot")
        sub(req, "instance", instance)
        if node and self._takes("ReleaseSlot", "node"):     # an older service's contract has no node here
            sub(req, "node", node)
        resp = self.service.call("ReleaseSlot", payload=req)
        slot = resp.find("az:slot", NS)
        return slot_from_xml(slot) if slot is not None else None

    def list_slots(self, subject: str | None = None, group: str | None = None) -> list[Slot]:
        kwargs = {k: v for k, v in (("subject", subject), ("group", group)) if v}
        return [slot_from_xml(s) for s in self.service.call("ListSlots", **kwargs).iterfind("az:slot", NS)]

    def reconcile_slots(self, instances: list[str], node: str = "") -> list[str]:
        resp = self.service.call("ReconcileSlots", instance=list(instances), **({"node": node} if node else {}))
        return [r.text for r in resp.iterfind("az:released", NS)]

    # -- administration ----------------------------------------------------------------------------
    def rules(self) -> tuple[StatusView, Limits, list[Rule]]:
        resp = self.service.call("ListRules")
        return (status_from_xml(resp.find("az:policy", NS)), limits_from_xml(resp.find("az:defaults", NS)),
                [rule_from_xml(r) for r in resp.iterfind("az:rule", NS)])

    def add_rule(self, rule: Rule, before: str | None = None) -> StatusView:
        kwargs: dict = {"rule": rule_to_zeep(rule)}
        if before:
            kwargs["before"] = before
        return status_from_xml(self.service.call("AddRule", **kwargs).find("az:policy", NS))

    def remove_rule(self, rule_id: str) -> StatusView:
        return status_from_xml(self.service.call("RemoveRule", id=rule_id).find("az:policy", NS))

    def list_groups(self) -> tuple[StatusView, list[Group]]:
        resp = self.service.call("ListGroups")
        return status_from_xml(resp.find("az:policy", NS)), [group_from_xml(g) for g in resp.iterfind("az:group", NS)]

    def add_group(self, group: Group) -> StatusView:
        return status_from_xml(self.service.call("AddGroup", group=group_to_zeep(group)).find("az:policy", NS))

    def remove_group(self, name: str) -> StatusView:
        return status_from_xml(self.service.call("RemoveGroup", name=name).find("az:policy", NS))

    def add_member(self, group: str, dn: str, admin: bool = False) -> StatusView:
        resp = self.service.call("AddMember", group=group, dn=dn, admin=admin)
        return status_from_xml(resp.find("az:policy", NS))

    def remove_member(self, group: str, dn: str) -> StatusView:
        return status_from_xml(self.service.call("RemoveMember", group=group, dn=dn).find("az:policy", NS))

    def reload(self) -> tuple[StatusView, bool]:
        resp = self.service.call("ReloadPolicy")
        return status_from_xml(resp.find("az:policy", NS)), text(resp, "changed") in ("true", "1")

    def audit(self, subject: str | None = None, event: str | None = None, limit: int = 100) -> list[dict]:
        kwargs: dict = {"limit": limit}
        if subject:
            kwargs["subject"] = subject
        if event:
            kwargs["event"] = event
        return [audit_from_xml(r) for r in self.service.call("ReadAudit", **kwargs).iterfind("az:record", NS)]


class ServicePolicyPoint:
    """The PolicyDecisionPoint and SlotKeeper of an enforcing service (the VMRepository, a VMManager):
    asks the Authorization service at ``url`` as ``credential`` (the host credential).

    Permits are cached for ``permit_ttl`` seconds (a subject's groups too); denials never are, and the
    cache is emptied when the service reports a new policy version. Any failure to get an answer (the
    service down, a timeout, a refused signature, the service refusing this host as an enforcement point)
    is a ``ServiceUnavailable`` fault: the operation is refused. The next call tries again."""

    def __init__(self, url: str, credential: Credential, trust: TrustStore, *, permit_ttl: float = 5.0,
                 timeout: float = 5.0, expected_host_dn: str | None = None, cache_size: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.url = url.split("?")[0]
        self.credential = credential
        self.trust = trust
        self.permit_ttl = permit_ttl
        self.timeout = timeout
        self.expected_host_dn = expected_host_dn or None
        self.cache_size = cache_size
        self.clock = clock
        self._client: AuthorizationClient | None = None
        self._connect_lock = threading.Lock()
        self._lock = threading.Lock()
        self._permits: OrderedDict[tuple, tuple[float, Decision]] = OrderedDict()
        self._groups: dict[str, tuple[float, list[str]]] = {}
        self._version: str | None = None
        self._down: str | None = None

    # -- the connection ----------------------------------------------------------------------------
    def _unavailable(self, reason: str) -> ServiceUnavailable:
        if self._down is None:
            log.error("Authorization service %s unavailable, refusing operations: %s", self.url, reason)
        self._down = reason
        return ServiceUnavailable(f"the Authorization service at {self.url} cannot decide ({reason}); "
                                  "the operation is refused", service=self.url)

    def _call(self, operation: str, *args, **kwargs):
        try:
            with self._connect_lock:
                if self._client is None:
                    self._client = AuthorizationClient.connect(self.url, self.credential, self.trust,
                                                               timeout=self.timeout,
                                                               expected_host_dn=self.expected_host_dn)
            result = getattr(self._client, operation)(*args, **kwargs)
        except AccessDenied as exc:
            if exc.rule == "authz-service":
                raise self._unavailable(f"it refuses this service: {exc.description}") from None
            raise
        except (InternalFault, ServiceUnavailable) as exc:
            raise self._unavailable(exc.description) from None
        except VMGridFault:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever keeps us from an answer, the answer is no
            raise self._unavailable(str(exc) or type(exc).__name__) from None
        if self._down is not None:
            log.warning("Authorization service %s reachable again", self.url)
            self._down = None
        return result

    # -- PolicyDecisionPoint -----------------------------------------------------------------------
    def _note_version(self, version: str) -> None:
        if version and version != self._version:
            with self._lock:
                if self._version is not None:
                    self._permits.clear()
                    self._groups.clear()
                self._version = version

    def decide(self, subject: Subject, action: str, resource: Mapping[str, str],
               context: Mapping[str, str]) -> Decision:
        key = _cache_key(subject, action, resource, context)
        now = self.clock()
        with self._lock:
            hit = self._permits.get(key)
            if hit is not None:
                if hit[0] > now:
                    self._permits.move_to_end(key)
                    return hit[1]
                del self._permits[key]
        decision, groups = self._call("authorize", subject, action, resource, context)
        self._note_version(decision.policy)
        if self.permit_ttl > 0:
            with self._lock:
                self._groups[subject.dn] = (now + self.permit_ttl, groups)
                if decision.permit:
                    self._permits[key] = (now + self.permit_ttl, decision)
                    while len(self._permits) > self.cache_size:
                        self._permits.popitem(last=False)
        return decision

    def decide_many(self, subject: Subject, requests: Sequence[tuple[str, Mapping[str, str], Mapping[str, str]]]
                    ) -> list[Decision]:
        """:meth:`decide` for many requests: those not answered by a cached permit are asked in AuthorizeMany calls
        of up to 1000 (one round trip for a bulk import's batch instead of one per descriptor)."""
        keys = [_cache_key(subject, action, resource, context) for action, resource, context in requests]
        out: list[Decision | None] = [None] * len(requests)
        now = self.clock()
        with self._lock:
            for i, key in enumerate(keys):
                hit = self._permits.get(key)
                if hit is not None and hit[0] > now:
                    out[i] = hit[1]
        todo = [i for i, d in enumerate(out) if d is None]
        for first in range(0, len(todo), AUTHORIZE_MANY_MAX):
            chunk = todo[first:first + AUTHORIZE_MANY_MAX]
            decisions, groups = self._call("authorize_many", subject, [requests[i] for i in chunk])
            if decisions:
                self._note_version(decisions[0].policy)
            with self._lock:
                if self.permit_ttl > 0:
                    self._groups[subject.dn] = (now + self.permit_ttl, groups)
                for i, decision in zip(chunk, decisions):
                    out[i] = decision
                    if decision.permit and self.permit_ttl > 0:
                        self._permits[keys[i]] = (now + self.permit_ttl, decision)
                while len(self._permits) > self.cache_size:
                    self._permits.popitem(last=False)
        return out

    def groups(self, subject: Subject) -> list[str]:
        now = self.clock()
        with self._lock:
            hit = self._groups.get(subject.dn)
            if hit is not None and hit[0] > now:
                return list(hit[1])
        groups, _ = self._call("groups", subject.dn)
        if self.permit_ttl > 0:
            with self._lock:
                self._groups[subject.dn] = (now + self.permit_ttl, groups)
                if len(self._groups) > self.cache_size:
                    self._groups.clear()
        return groups

    # -- SlotKeeper --------------------------------------------------------------------------------
    def claim_slot(self, subject: Subject, action: str, instance: str, resource: Mapping[str, str],
                   context: Mapping[str, str], node: str = "", ahead: Sequence[tuple[str, Mapping[str, str],
                                                                                   Mapping[str, str]]] = ()
                   ) -> tuple[Decision, Slot]:
        """The claim; with ``ahead`` (and a permit cache), those questions decided in the same call and their
        permits cached exactly as :meth:`decide` caches an Authorize permit: keyed on every attribute asked
        about, for ``permit_ttl`` from before the call, dropped with the rest on a new policy version."""
        now = self.clock()
        ahead = list(ahead) if self.permit_ttl > 0 else []
        decision, slot, _, later = self._call("claim_slot_ahead", subject, instance, resource, context, action, node,
                                              ahead)
        self._note_version(decision.policy)
        if later:
            with self._lock:
                if self._version == decision.policy:     # not when an answer meanwhile named a newer policy
                    for (a_action, a_resource, a_context), d in zip(ahead, later):
                        if d.permit:
                            self._permits[_cache_key(subject, a_action, a_resource, a_context)] = \
                                (now + self.permit_ttl, d)
                    while len(self._permits) > self.cache_size:
                        self._permits.popitem(last=False)
        return decision, slot

    def release_slot(self, instance: str, node: str = "") -> bool:
        return self._call("release_slot", instance, node) is not None

    def reconcile_slots(self, instances: list[str], node: str = "") -> list[str]:
        return self._call("reconcile_slots", list(instances), node)

    def forget(self) -> None:
        """Drop every cached permit and group list (e.g. after an admin change made through this process)."""
        with self._lock:
            self._permits.clear()
            self._groups.clear()


def _cache_key(subject: Subject, action: str, resource: Mapping[str, str], context: Mapping[str, str]) -> tuple:
    """What a cached permit is kept under: everything the decision was asked about."""
    return (subject.dn, subject.limited, action, tuple(sorted((k, str(v)) for k, v in resource.items())),
            tuple(sorted((k, str(v)) for k, v in context.items())))
