"""The Authorization service's work, without SOAP: decisions (each one audited), VO groups, instance
slots against the concurrent-instance limits, and administration of the policy file. The grid service
(service.py) puts a signed SOAP face on it; :class:`LocalPolicyPoint` lets a service in the same
process (or a test) use it directly as its policy decision point."""
from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Mapping, Sequence

from services.authz.audit import AuditLog
from services.authz.edit import add_rule, put_group, remove_group, remove_rule, render_group
from services.authz.pep import Decision, Request, Slot, Subject, denial, enforce_obligations
from services.authz.policy import Group, Policy, PolicyError, Rule, parse_policy
from services.authz.slots import NotTheClaimant, SlotLedger
from services.authz.store import PolicyFile
from services.faults import InvalidArgument, LimitExceeded


def claimant(requester: str, node: str = "") -> str:
    """Who holds a slot: the enforcing service's credential (DN) and its own identity (a node name), so nodes
    sharing a host certificate never reconcile each other's slots away."""
    return f"{requester}#{node}" if node else requester


def new_decision_id() -> str:
    return "d-" + uuid.uuid4().hex[:16]


def _known(policy, actions) -> None:
    """InvalidArgument unless every one of ``actions`` is in ``policy``'s vocabulary."""
    for action in actions:
        if action not in policy.known_actions:
            raise InvalidArgument(f"unknown action {action!r}; known: {', '.join(policy.known_actions)}",
                                  argument="action")


class PolicyAuthority:
    def __init__(self, policy: PolicyFile, ledger: SlotLedger, audit: AuditLog, *, slot_grace: int = 600):
        self.policy = policy
        self.ledger = ledger
        self.audit = audit
        self.slot_grace = slot_grace

    # -- decisions ---------------------------------------------------------------------------------
    def authorize(self, subject: Subject, action: str, resource: Mapping[str, str], context: Mapping[str, str],
                  *, requester: str) -> tuple[Decision, list[str]]:
        """The decision for (subject, action, resource, context), audited; and the subject's groups."""
        policy = self.policy.current
        _known(policy, [action])
        return self._decided(policy, subject, action, resource, context, requester), policy.groups_of(subject.dn)

    def _decided(self, policy, subject: Subject, action: str, resource: Mapping[str, str],
                 context: Mapping[str, str], requester: str, **audit) -> Decision:
        """``policy``'s decision with a fresh id and its version, audited (``audit``: more fields of the record)."""
        decision = replace(policy.decide(subject, action, resource, context), decision_id=new_decision_id(),
                           policy=policy.version)
        self.audit.record("decision", id=decision.decision_id, by=requester, subject=subject.dn,
                          limited=subject.limited or None, action=action, resource=dict(resource),
                          context=dict(context) or None, decision="permit" if decision.permit else "deny",
                          rule=decision.rule, obligations=dict(decision.obligations) or None, policy=policy.version,
                          **audit)
        return decision

    def authorize_many(self, subject: Subject, requests: list[tuple[str, Mapping[str, str], Mapping[str, str]]],
                       *, requester: str) -> tuple[list[Decision], list[str], str]:
        """:meth:`authorize` for many requests of one subject, under one policy version: each decision audited;
        with the subject's groups and that version."""
        policy = self.policy.current
        _known(policy, [action for action, _, _ in requests])
        decisions = [self._decided(policy, subject, action, resource, context, requester)
                     for action, resource, context in requests]
        return decisions, policy.groups_of(subject.dn), policy.version

    def check_actions(self, actions) -> None:
        """InvalidArgument unless every one of ``actions`` is in the policy's vocabulary."""
        _known(self.policy.current, actions)

    def decide_ahead(self, subject: Subject, requests: Sequence[Request], *, version: str, requester: str,
                     claim: str) -> list[Decision]:
        """ClaimSlot's questions asked ahead (the claiming service expects to ask them soon): each decided and
        audited as :meth:`authorize` does, the record naming the ``claim`` decision it came with. Decided only
        under the claim's policy ``version``: when the policy changed since, none (the service asks later)."""
        policy = self.policy.current
        if policy.version != version:
            return []
        return [self._decided(policy, subject, action, resource, context, requester, ahead_of=claim)
                for action, resource, context in requests]

    def groups(self, dn: str) -> tuple[list[str], list[str]]:
        """(the groups ``dn`` belongs to, the groups it administers)."""
        policy = self.policy.current
        return policy.groups_of(dn), policy.admin_groups_of(dn)

    # -- instance slots ----------------------------------------------------------------------------
    def claim(self, subject: Subject, action: str, instance: str, resource: Mapping[str, str],
              context: Mapping[str, str], *, requester: str, node: str = "") -> tuple[Decision, Slot, bool]:
        """Authorize, apply the obligations to the request, and count the instance, as one step. For
        ``vm.deploy`` the slot is the subject's; for another action on an existing instance (``vm.set-lifetime``,
        ``vm.migrate``) the instance's slot is renewed whoever is authorized, or counted for its ``owner``. The
        slot's claimant is the requester's credential and its ``node`` identity (:func:`claimant`)."""
        decision, _ = self.authorize(subject, action, resource, context, requester=requester)
        if not decision.permit:
            raise denial(subject, action, resource, decision.rule)
        ob = decision.obligations
        try:
            enforce_obligations(decision, context)
            lifetime = int(context["lifetime"]) if context.get("lifetime") else None
            deploy = action == "vm.deploy"
            owner = subject.dn if deploy else resource.get("owner") or subject.dn
            slot, new = self.ledger.claim(
                instance, owner, ob.get("group"), claimant(requester, node), renew_any=not deploy,
                max_per_user=int(ob["max_instances_per_user"]) if "max_instances_per_user" in ob else None,
                max_per_group=int(ob["max_instances_per_group"]) if "max_instances_per_group" in ob else None,
                lifetime=lifetime, grace=self.slot_grace)
        except (LimitExceeded, InvalidArgument) as exc:
            self.audit.record("slot", id=decision.decision_id, by=requester, subject=subject.dn, action=action,
                              instance=instance, result="refused", limit=getattr(exc, "limit", None),
                              error=exc.description)
            raise
        self.audit.record("slot", id=decision.decision_id, by=requester, subject=subject.dn, action=action,
                          instance=instance, group=slot.group, result="claimed" if new else "renewed",
                          user_count=slot.user_count, group_count=slot.group_count)
        return decision, slot, not new

    def release(self, instance: str, *, requester: str, node: str = "") -> Slot | None:
        """Free the instance's slot when ``requester`` (as ``node``) holds it: the claimant itself, a claim made
        under the credential alone, or any identity of the credential when no ``node`` is given (an enforcing
        service that sends none). Another service's slot stays (None, audited as refused)."""
        held = claimant(requester, node)

        def holds(c: str) -> bool:
            return c in (held, requester) or (not node and c.partition("#")[0] == requester)
        try:
            slot = self.ledger.release(instance, holds)
        except NotTheClaimant as exc:
            self.audit.record("slot", by=requester, node=node or None, instance=instance,
                              result="not released: claimed by another service", claimant=exc.claimant)
            return None
        self.audit.record("slot", by=requester, node=node or None, instance=instance,
                          result="released" if slot else "not held",
                          subject=slot.subject if slot else None, group=slot.group if slot else None)
        return slot

    def reconcile(self, instances: list[str], *, requester: str, node: str = "") -> list[str]:
        """Free the slots ``requester`` claimed as ``node`` for instances not in ``instances``."""
        gone = self.ledger.reconcile(claimant(requester, node), instances)
        self.audit.record("slot", by=requester, node=node or None, result="reconciled", kept=len(instances),
                          released=gone or None)
        return gone

    def slots(self, *, subject: str | None = None, group: str | None = None) -> list[Slot]:
        return self.ledger.list(subject=subject, group=group)

    # -- administration ----------------------------------------------------------------------------
    def add_rule(self, rule: Rule, *, before: str | None, by: str) -> Policy:
        def change(text: str, old: Policy):
            rules = list(old.rules)
            index = len(rules) if before is None else next((i for i, r in enumerate(rules) if r.id == before),
                                                           len(rules))
            rules.insert(index, rule)
            return add_rule(text, old, rule, before), rules, dict(old.groups)

        return self.policy.edit(change, by=by, operation="AddRule", target=rule.id)[1]

    def remove_rule(self, rule_id: str, *, by: str) -> Policy:
        def change(text: str, old: Policy):
            return remove_rule(text, old, rule_id), [r for r in old.rules if r.id != rule_id], dict(old.groups)

        return self.policy.edit(change, by=by, operation="RemoveRule", target=rule_id)[1]

    def add_group(self, group: Group, *, by: str) -> Policy:
        def change(text: str, old: Policy):
            if group.name in old.groups:
                raise PolicyError(old.source, f"group {group.name!r} already exists; add members to it instead",
                                  rule=group.name)
            return put_group(text, old, group), list(old.rules), {**old.groups, group.name: _expected(group, old)}

        return self.policy.edit(change, by=by, operation="AddGroup", target=group.name)[1]

    def remove_group(self, name: str, *, by: str) -> Policy:
        def change(text: str, old: Policy):
            groups = {k: g for k, g in old.groups.items() if k != name}
            return remove_group(text, old, name), list(old.rules), groups

        return self.policy.edit(change, by=by, operation="RemoveGroup", target=name)[1]

    def add_member(self, group: str, dn: str, *, admin: bool, by: str) -> Policy:
        def change(text: str, old: Policy):
            g = _group(old, group)
            if admin:
                new = replace(g, admins=g.admins + (() if dn in g.admins else (dn,)))
            else:
                new = replace(g, members=g.members + (() if dn in g.members else (dn,)))
            return put_group(text, old, new), list(old.rules), {**old.groups, group: new}

        return self.policy.edit(change, by=by, operation="AddMember", target=f"{group} {dn}")[1]

    def remove_member(self, group: str, dn: str, *, by: str) -> Policy:
        def change(text: str, old: Policy):
            g = _group(old, group)
            if dn not in g.members and dn not in g.admins:
                raise PolicyError(old.source, f"{dn} is not written in group {group!r}"
                                  + (" (it comes from the grid-mapfile)" if dn in g.imported else ""), rule=group)
            new = replace(g, members=tuple(m for m in g.members if m != dn),
                          admins=tuple(a for a in g.admins if a != dn))
            return put_group(text, old, new), list(old.rules), {**old.groups, group: new}

        return self.policy.edit(change, by=by, operation="RemoveMember", target=f"{group} {dn}")[1]

    def reload(self, *, by: str) -> bool:
        return self.policy.reload("ReloadPolicy", by=by)

    def close(self) -> None:
        self.policy.stop()
        self.ledger.close()
        self.audit.close()


def _group(policy: Policy, name: str) -> Group:
    g = policy.groups.get(name)
    if g is None:
        raise PolicyError(policy.source, f"there is no group {name!r}", rule=name)
    return g


def _expected(group: Group, policy: Policy) -> Group:
    """How a new group reads back: the grid-mapfile import is filled in by the parser."""
    if not group.gridmap:
        return group
    probe = parse_policy(render_group(group), policy.source)
    return probe.groups[group.name]


class LocalPolicyPoint:
    """A :class:`PolicyAuthority` used in-process as a service's PolicyDecisionPoint and SlotKeeper, asking as
    ``requester`` (the service's DN in the audit log)."""

    def __init__(self, authority: PolicyAuthority, requester: str = "local"):
        self.authority = authority
        self.requester = requester

    def decide(self, subject: Subject, action: str, resource: Mapping[str, str],
               context: Mapping[str, str]) -> Decision:
        return self.authority.authorize(subject, action, resource, context, requester=self.requester)[0]

    def groups(self, subject: Subject) -> list[str]:
        return self.authority.groups(subject.dn)[0]

    def claim_slot(self, subject: Subject, action: str, instance: str, resource: Mapping[str, str],
                   context: Mapping[str, str], node: str = "", ahead: Sequence[Request] = ()) -> tuple[Decision, Slot]:
        # ``ahead`` ignored: an in-process decision costs no message, so nothing is gained by deciding it early
        decision, slot, _ = self.authority.claim(subject, action, instance, resource, context,
                                                 requester=self.requester, node=node)
        return decision, slot

    def release_slot(self, instance: str, node: str = "") -> bool:
        return self.authority.release(instance, requester=self.requester, node=node) is not None

    def reconcile_slots(self, instances: list[str], node: str = "") -> list[str]:
        return self.authority.reconcile(instances, requester=self.requester, node=node)
