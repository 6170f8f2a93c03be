"""The Authorization grid service (``vmgrid serve authz``): decisions for the enforcement points,
VO groups, instance slots, and the administration of the policy file (policy admins only)."""
from __future__ import annotations

import logging
import shutil
import signal
import threading
from pathlib import Path

from lxml import etree

from services.authz.audit import AuditLog, RefusalRecorder
from services.authz.authority import PolicyAuthority
from services.authz.config import AuthzConfig
from services.authz.policy import PolicyError
from services.authz.slots import SlotLedger
from services.authz.store import PolicyFile
from services.authz.wire import (NS, ahead_from_xml, attributes_from_xml, audit_to_xml, el, group_from_xml,
                                 group_to_xml, limits_to_xml, obligations_to_xml, rule_from_xml, rule_to_xml,
                                 slot_to_xml, status_to_xml, sub, subject_from_xml, text)
from services.common.crash import crashpoint
from services.container.service import CallContext, SoapService, operation
from services.faults import AccessDenied, InvalidArgument

log = logging.getLogger("vmgrid.authz")
DEFAULT_POLICY = Path(__file__).with_name("default-policy.toml")


def policy_path(config: AuthzConfig, state_dir: Path) -> Path:
    """The policy file: the configured one, or ``<state_dir>/policy.toml`` made from the default policy."""
    if config.policy:
        return Path(config.policy)
    path = Path(state_dir) / "policy.toml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEFAULT_POLICY, path)
        log.warning("no [authz] policy configured: wrote the default policy to %s (no admins, no groups yet)", path)
    return path


class AuthorizationService(SoapService):
    name = "AuthorizationService"
    wsdl = "authz.wsdl"

    def __init__(self, state_dir: Path, config: AuthzConfig | None = None):
        super().__init__(state_dir)
        self.config = config or AuthzConfig()
        audit = AuditLog(Path(self.config.audit_log) if self.config.audit_log else self.state_dir / "audit.log",
                         fsync=self.config.audit_fsync)
        try:
            policy = PolicyFile(policy_path(self.config, self.state_dir), audit=audit)
        except PolicyError:
            audit.close()
            raise
        self.authority = PolicyAuthority(policy, SlotLedger(self.state_dir / "slots.sqlite"), audit,
                                         slot_grace=self.config.slot_grace)
        audit.record("start", sync=True, policy=policy.current.version, file=str(policy.path))
        self.refusals = RefusalRecorder(audit)
        self._previous_hup = None

    def start(self) -> None:
        self.authority.policy.start_watching(self.config.reload_interval)
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, lambda signum, frame: self.authority.policy.wake())

    def close(self) -> None:
        if self._previous_hup is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._previous_hup)
        self.refusals.close()
        self.authority.close()

    # -- who may ask -------------------------------------------------------------------------------
    @property
    def policy(self):
        return self.authority.policy.current

    def _refuse(self, ctx: CallContext, why: str) -> AccessDenied:
        self.refusals.refused(ctx.dn, ctx.operation, why)
        return AccessDenied(f"{ctx.dn} may not call {ctx.operation}: {why}", subject=ctx.dn,
                            action=f"authz.{ctx.operation}", resource=self.name, rule="authz-service")

    def _enforcement_point(self, ctx: CallContext, *, or_admin: bool = False) -> None:
        p = self.policy
        if p.is_enforcement_point(ctx.dn) or (or_admin and p.is_admin(ctx.dn) and not ctx.caller.limited):
            return
        raise self._refuse(ctx, "not an enforcement point of this policy ([policy] enforcement_points)"
                           + (" nor a policy admin" if or_admin else ""))

    def _admin(self, ctx: CallContext) -> None:
        if not self.policy.is_admin(ctx.dn):
            raise self._refuse(ctx, "not a policy admin")
        if ctx.caller.limited:
            raise self._refuse(ctx, "policy administration needs a full proxy, not a limited one")

    def _subject(self, ctx: CallContext, req: etree._Element):
        """The subject asked about: anyone for enforcement points and policy admins; oneself otherwise (and a
        limited proxy stays limited)."""
        subject = subject_from_xml(req.find("az:subject", NS))
        p = self.policy
        if p.is_enforcement_point(ctx.dn) or p.is_admin(ctx.dn):
            return subject
        if subject.dn != ctx.dn:
            raise self._refuse(ctx, "only enforcement points ([policy] enforcement_points) and policy admins ask "
                                    "about other subjects")
        if ctx.caller.limited and not subject.limited:
            subject = type(subject)(subject.dn, True)
        return subject

    # -- decisions ---------------------------------------------------------------------------------
    @operation("Authorize")
    def authorize(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        subject = self._subject(ctx, req)
        decision, groups = self.authority.authorize(
            subject, text(req, "action").strip(), attributes_from_xml(req.find("az:resource", NS), "resource"),
            attributes_from_xml(req.find("az:context", NS), "context"), requester=ctx.dn)
        resp = el("AuthorizeResponse")
        sub(resp, "decision", "Permit" if decision.permit else "Deny")
        sub(resp, "rule", decision.rule)
        sub(resp, "decisionId", decision.decision_id)
        sub(resp, "policyVersion", decision.policy)
        if decision.permit:
            obligations_to_xml(resp, decision.obligations)
        for g in groups:
            sub(resp, "group", g)
        return resp

    @operation("AuthorizeMany")
    def authorize_many(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        subject = self._subject(ctx, req)
        requests = [(text(r, "action").strip(), attributes_from_xml(r.find("az:resource", NS), "resource"),
                     attributes_from_xml(r.find("az:context", NS), "context")) for r in req.iterfind("az:request", NS)]
        decisions, groups, version = self.authority.authorize_many(subject, requests, requester=ctx.dn)
        resp = el("AuthorizeManyResponse")
        sub(resp, "policyVersion", version)
        for decision in decisions:
            _decision_to_xml(resp, "result", decision)
        for g in groups:
            sub(resp, "group", g)
        return resp

    @operation("GetGroups")
    def get_groups(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        dn = text(req, "dn") or ""        # as sent, never stripped: a DN with an edge blank is another subject
        p = self.policy
        if dn != ctx.dn and not (p.is_enforcement_point(ctx.dn) or p.is_admin(ctx.dn)):
            raise self._refuse(ctx, "only enforcement points ([policy] enforcement_points) and policy admins ask "
                                    "about other subjects")
        member, admin = self.authority.groups(dn)
        resp = el("GetGroupsResponse")
        for g in member:
            sub(resp, "group", g, **({"admin": "true"} if g in admin else {}))
        return resp

    # -- slots -------------------------------------------------------------------------------------
    @operation("ClaimSlot")
    def claim_slot(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._enforcement_point(ctx)
        subject = subject_from_xml(req.find("az:subject", NS))
        ahead = ahead_from_xml(req)
        self.authority.check_actions(action for action, _, _ in ahead)   # before anything is claimed
        decision, slot, renewed = self.authority.claim(
            subject, (text(req, "action") or "vm.deploy").strip(), text(req, "instance").strip(),
            attributes_from_xml(req.find("az:resource", NS), "resource"),
            attributes_from_xml(req.find("az:context", NS), "context"), requester=ctx.dn,
            node=(text(req, "node") or "").strip())
        crashpoint("slot.claimed")     # fault tests: the slot recorded, its answer never sent
        later = self.authority.decide_ahead(subject, ahead, version=decision.policy, requester=ctx.dn,
                                            claim=decision.decision_id) if ahead else []
        resp = el("ClaimSlotResponse")
        sub(resp, "rule", decision.rule)
        sub(resp, "decisionId", decision.decision_id)
        sub(resp, "policyVersion", decision.policy)
        obligations_to_xml(resp, decision.obligations)
        slot_to_xml(resp, slot)
        sub(resp, "renewed", "true" if renewed else "false")
        for d in later:
            _decision_to_xml(resp, "aheadResult", d)
        return resp

    @operation("ReleaseSlot")
    def release_slot(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._enforcement_point(ctx)
        slot = self.authority.release(text(req, "instance").strip(), requester=ctx.dn,
                                      node=(text(req, "node") or "").strip())
        resp = el("ReleaseSlotResponse")
        sub(resp, "released", "true" if slot else "false")
        if slot:
            slot_to_xml(resp, slot)
        return resp

    @operation("ListSlots")
    def list_slots(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._enforcement_point(ctx, or_admin=True)
        resp = el("ListSlotsResponse")
        for slot in self.authority.slots(subject=text(req, "subject"), group=text(req, "group")):
            slot_to_xml(resp, slot)
        return resp

    @operation("ReconcileSlots")
    def reconcile_slots(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._enforcement_point(ctx)
        instances = [(i.text or "").strip() for i in req.iterfind("az:instance", NS)]
        resp = el("ReconcileSlotsResponse")
        for instance in self.authority.reconcile(instances, requester=ctx.dn, node=(text(req, "node") or "").strip()):
            sub(resp, "released", instance)
        return resp

    # -- administration ----------------------------------------------------------------------------
    def _status(self, name: str) -> etree._Element:
        resp = el(name)
        status_to_xml(resp, self.authority.policy.status())
        return resp

    def _edit(self, func, *args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PolicyError as exc:
            raise exc.fault() from None

    @operation("ListRules")
    def list_rules(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        policy = self.policy
        resp = self._status("ListRulesResponse")
        limits_to_xml(resp, "defaults", policy.defaults)
        for rule in policy.rules:
            rule_to_xml(resp, rule)
        return resp

    @operation("AddRule")
    def add_rule(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        rule = rule_from_xml(req.find("az:rule", NS))
        self._edit(self.authority.add_rule, rule, before=text(req, "before"), by=ctx.dn)
        return self._status("AddRuleResponse")

    @operation("RemoveRule")
    def remove_rule(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        self._edit(self.authority.remove_rule, text(req, "id").strip(), by=ctx.dn)
        return self._status("RemoveRuleResponse")

    @operation("ListGroups")
    def list_groups(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        resp = self._status("ListGroupsResponse")
        for group in self.policy.groups.values():
            group_to_xml(resp, group)
        return resp

    @operation("AddGroup")
    def add_group(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        group = group_from_xml(req.find("az:group", NS))
        if group.imported:
            raise InvalidArgument("members from a grid-mapfile are not given; name the file in gridmap",
                                  argument="group.member")
        self._edit(self.authority.add_group, group, by=ctx.dn)
        return self._status("AddGroupResponse")

    @operation("RemoveGroup")
    def remove_group(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        self._edit(self.authority.remove_group, text(req, "name").strip(), by=ctx.dn)
        return self._status("RemoveGroupResponse")

    @operation("AddMember")
    def add_member(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        self._edit(self.authority.add_member, text(req, "group").strip(), text(req, "dn").strip(),
                   admin=(text(req, "admin") or "false").strip() in ("true", "1"), by=ctx.dn)
        return self._status("AddMemberResponse")

    @operation("RemoveMember")
    def remove_member(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        self._edit(self.authority.remove_member, text(req, "group").strip(), text(req, "dn").strip(), by=ctx.dn)
        return self._status("RemoveMemberResponse")

    @operation("ReloadPolicy")
    def reload_policy(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        changed = self._edit(self.authority.reload, by=ctx.dn)
        resp = self._status("ReloadPolicyResponse")
        sub(resp, "changed", "true" if changed else "false")
        return resp

    @operation("ReadAudit")
    def read_audit(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self._admin(ctx)
        limit = int(text(req, "limit") or 100)
        resp = el("ReadAuditResponse")
        for record in self.authority.audit.read(subject=text(req, "subject"), event=text(req, "event"), limit=limit):
            audit_to_xml(resp, record)
        return resp


def _decision_to_xml(parent: etree._Element, name: str, decision) -> None:
    """One decision as AuthorizeMany's result or ClaimSlot's aheadResult: Permit/Deny, rule, id, obligations."""
    r = sub(parent, name)
    sub(r, "decision", "Permit" if decision.permit else "Deny")
    sub(r, "rule", decision.rule)
    sub(r, "decisionId", decision.decision_id)
    if decision.permit:
        obligations_to_xml(r, decision.obligations)
