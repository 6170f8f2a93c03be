"""Policy enforcement: what the VMRepository and VMManager call before every operation.

A :class:`PolicyDecisionPoint` answers (subject, action, resource, context) with a
:class:`Decision`; :class:`Enforcer` turns a denial into an ``AccessDenied`` fault and gives the
service the decision's obligations (limits) to apply. Deny is the default everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

from services.faults import AccessDenied


@dataclass(frozen=True)
class Subject:
    dn: str
    limited: bool = False


@dataclass(frozen=True)
class Decision:
    permit: bool
    rule: str
    obligations: Mapping[str, str] = field(default_factory=dict)


class PolicyDecisionPoint(Protocol):
    def decide(self, subject: Subject, action: str, resource: Mapping[str, str],
               context: Mapping[str, str]) -> Decision: ...

    def groups(self, subject: Subject) -> list[str]:
        """The VO groups the subject belongs to."""
        ...


def describe(resource: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(resource.items())) or "-"


class Enforcer:
    """The enforcement point a service holds: ``check`` before acting, or raise AccessDenied."""

    def __init__(self, pdp: PolicyDecisionPoint):
        self.pdp = pdp

    def check(self, caller, action: str, resource: Mapping[str, str] | None = None,
              context: Mapping[str, str] | None = None) -> Decision:
        subject = Subject(caller.dn, bool(getattr(caller, "limited", False)))
        decision = self.pdp.decide(subject, action, dict(resource or {}), dict(context or {}))
        if not decision.permit:
            raise AccessDenied(f"{subject.dn} may not {action} on {describe(resource or {})} (rule: {decision.rule})",
                               subject=subject.dn, action=action, resource=describe(resource or {}),
                               rule=decision.rule)
        return decision

    def groups(self, caller) -> list[str]:
        return self.pdp.groups(Subject(caller.dn, bool(getattr(caller, "limited", False))))


@dataclass
class StaticVOPolicy:
    """The repository's built-in policy until the Authorization service is configured: VO
    membership and VO admins from the configuration; deny by default.

    - a VO's members query, read, register into, duplicate and hold its images;
    - an image's owner and the VO's admins update and remove it;
    - ingest from a path on the repository host (``source=local``) only for repository admins.
    """

    vos: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # vo -> {"members": [...], "admins": [...]}
    admins: list[str] = field(default_factory=list)

    def groups(self, subject: Subject) -> list[str]:
        return sorted(vo for vo, m in self.vos.items()
                      if subject.dn in m.get("members", ()) or subject.dn in m.get("admins", ()))

    def decide(self, subject, action, resource, context) -> Decision:
        vo = resource.get("vo")
        member = vo is not None and vo in self.groups(subject)
        vo_admin = vo is not None and subject.dn in self.vos.get(vo, {}).get("admins", ())
        if action in ("image.query", "image.list-vos"):
            return Decision(True, "any authenticated subject; results limited to its VOs")
        if action == "image.register" and context.get("source") == "local" and subject.dn not in self.admins:
            return Decision(False, "local-path ingest is for repository admins")
        if action in ("image.read", "image.register", "image.duplicate", "image.hold") and member:
            return Decision(True, f"member of VO {vo}")
        if action in ("image.update", "image.remove") and (vo_admin or (member and resource.get("owner") == subject.dn)):
            return Decision(True, "owner" if resource.get("owner") == subject.dn else f"admin of VO {vo}")
        if action == "image.release" and resource.get("owner") == subject.dn:
            return Decision(True, "holder")
        return Decision(False, "default deny")
