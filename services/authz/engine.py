"""The policy engine (services.authz.policy) as a service's in-process decision point, for a container
that has no Authorization service configured: the default site policy with the [policy] section's
admins and VO groups. One engine decides everywhere; this point keeps no instance counts (the
Authorization service does)."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from services.authz.edit import site_policy
from services.authz.pep import Decision, Request, Subject
from services.authz.policy import Group, Policy, parse_policy


class PolicyEnginePoint:
    """A PolicyDecisionPoint over one parsed :class:`Policy` (no audit log, no slots)."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def decide(self, subject: Subject, action: str, resource: Mapping[str, str],
               context: Mapping[str, str]) -> Decision:
        return self.policy.decide(subject, action, resource, context)

    def decide_many(self, subject: Subject, requests: Sequence[Request]) -> list[Decision]:
        """Each request's decision; requests that agree on every attribute the policy reads (the action, the
        resource and context keys its rules name, the resource's VO for the group limits) share one evaluation:
        a bulk import of a thousand descriptors in one VO is then a few evaluations, each exact."""
        policy = self.policy
        resource_keys, context_keys = policy.attributes_read()
        memo: dict[tuple, Decision] = {}
        out = []
        for action, resource, context in requests:
            key = (action, tuple(resource.get(k) for k in resource_keys), tuple(context.get(k) for k in context_keys))
            decision = memo.get(key)
            if decision is None:
                decision = memo[key] = policy.decide(subject, action, resource, context)
            out.append(decision)
        return out

    def groups(self, subject: Subject) -> list[str]:
        return self.policy.groups_of(subject.dn)


def site_policy_point(admins: Iterable[str] = (), vos: Mapping[str, Mapping[str, Iterable[str]]] | None = None
                      ) -> PolicyEnginePoint:
    """The default site policy with ``admins`` as policy admins and ``vos`` (name -> members, admins) as groups."""
    groups = [Group(name=name, members=tuple(m.get("members", ())), admins=tuple(m.get("admins", ())))
              for name, m in (vos or {}).items()]
    return PolicyEnginePoint(parse_policy(site_policy(admins=list(admins), groups=groups), "built-in site policy"))
