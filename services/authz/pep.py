"""Policy enforcement: what the VMRepository and VMManager call before every operation.

A :class:`PolicyDecisionPoint` answers (subject, action, resource, context) with a
:class:`Decision`; :class:`Enforcer` turns a denial into an ``AccessDenied`` fault, applies the
decision's obligations to the request (too much RAM, too many vCPUs or too long a lifetime is a
``LimitExceeded`` fault) and, for a deployment, claims the instance's slot against the
concurrent-instance limits (:class:`SlotKeeper`). Deny is the default everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

from services.faults import AccessDenied, InvalidArgument, LimitExceeded, VMGridFault

# one authorization question of a batch: (action, resource, context)
Request = tuple[str, Mapping[str, str], Mapping[str, str]]


@dataclass(frozen=True)
class Subject:
    dn: str
    limited: bool = False


@dataclass(frozen=True)
class Decision:
    permit: bool
    rule: str
    obligations: Mapping[str, str] = field(default_factory=dict)
    decision_id: str = ""      # the Authorization service's id of this decision (in its audit log)
    policy: str = ""           # the version of the policy that decided


@dataclass(frozen=True)
class Slot:
    """One running instance counted against the concurrent-instance limits of its subject and group."""

    instance: str
    subject: str
    group: str | None
    claimant: str               # the enforcing service (host DN) that claimed it
    claimed: float              # epoch seconds
    expires: float | None       # when the slot frees itself if never released (lifetime + grace)
    user_count: int             # the subject's slots, this one included
    group_count: int | None     # the group's slots, this one included
    counted: bool = True        # False: the policy point keeps no counts (the built-in policy)


# Requested amounts in a request's context, and the obligation that limits each.
REQUEST_LIMITS = (("memory", "max_memory", "MiB"), ("vcpus", "max_vcpus", "vCPUs"),
                  ("lifetime", "max_lifetime", "s"))


def _amount(n: int, unit: str) -> str:
    """``n unit``; seconds also as a person reads them when that is shorter to grasp: 2592000 s (30 d)."""
    if unit != "s" or n < 120:
        return f"{n} {unit}"
    for size, name in ((86400, "d"), (3600, "h"), (60, "min")):
        if n >= size and n % size == 0 or n >= 2 * size:
            return f"{n} s ({n / size:.3g} {name})"
    return f"{n} s"


def enforce_obligations(decision: Decision, context: Mapping[str, str]) -> None:
    """Refuse a permitted request that asks for more than the decision's limits allow."""
    for key, limit, unit in REQUEST_LIMITS:
        if key not in context or limit not in decision.obligations:
            continue
        try:
            requested = int(str(context[key]).strip())
        except ValueError:
            raise InvalidArgument(f"{key} must be a whole number, not {context[key]!r}", argument=key) from None
        allowed = int(decision.obligations[limit])
        if requested > allowed:
            raise LimitExceeded(f"{key} {_amount(requested, unit)} exceeds the limit of {_amount(allowed, unit)} "
                                f"(rule {decision.rule})", limit=limit, allowed=str(allowed),
                                requested=str(requested))


class PolicyDecisionPoint(Protocol):
    def decide(self, subject: Subject, action: str, resource: Mapping[str, str],
               context: Mapping[str, str]) -> Decision: ...

    def groups(self, subject: Subject) -> list[str]:
        """The VO groups the subject belongs to."""
        ...


@runtime_checkable
class BatchDecisionPoint(Protocol):
    """A policy point that answers many questions of one subject at once (a bulk import's descriptors)."""

    def decide_many(self, subject: Subject, requests: Sequence[Request]) -> list[Decision]:
        """One decision per request, in order, each the one :meth:`decide` would give."""
        ...


@runtime_checkable
class SlotKeeper(Protocol):
    """A policy point that also counts running instances (the Authorization service)."""

    def claim_slot(self, subject: Subject, action: str, instance: str, resource: Mapping[str, str],
                   context: Mapping[str, str], node: str = "", ahead: Sequence[Request] = ()) -> tuple[Decision, Slot]:
        """Authorize ``action`` and count ``instance`` against the limits, atomically; raises AccessDenied or
        LimitExceeded. Claiming an instance that already has a slot renews it (same subject only). ``node``: the
        claiming service's own identity; with its credential it keys the slot. ``ahead``: questions about the
        same subject the caller expects to ask soon; a point that caches permits may have them decided with the
        claim (no message of their own) and answer the later :meth:`decide` from its cache; others ignore them."""
        ...

    def release_slot(self, instance: str, node: str = "") -> bool:
        """Free the instance's slot held by the caller as ``node``; False when it had none (or another holds it)."""
        ...

    def reconcile_slots(self, instances: list[str], node: str = "") -> list[str]:
        """Free the slots the caller claimed as ``node`` of instances not in ``instances`` (after a restart); the
        freed ones."""
        ...


def describe(resource: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(resource.items())) or "-"


# what a denial shows of another subject's resource: what the caller named (its kind, key, name), nothing of
# what the service looked up about it (owner, VO, image, node), which the audit log keeps
SHOWN_TO_STRANGERS = ("type", "id", "name")


def denial(subject: Subject, action: str, resource: Mapping[str, str], rule: str) -> AccessDenied:
    """The AccessDenied for a denied request. A resource owned by someone else is described by its kind and key
    only: a stranger who learned an instance's key must not learn its owner, VO, image and node from the refusal."""
    owner = resource.get("owner")
    if owner is not None and owner != subject.dn:
        resource = {k: v for k, v in resource.items() if k in SHOWN_TO_STRANGERS}
    what = describe(resource)
    return AccessDenied(f"{subject.dn} may not {action} on {what} (rule: {rule})", subject=subject.dn, action=action,
                        resource=what, rule=rule)


class Enforcer:
    """The enforcement point a service holds: ``check`` before acting, or raise AccessDenied."""

    def __init__(self, pdp: PolicyDecisionPoint, identity: str = ""):
        self.pdp = pdp
        self.identity = identity    # the enforcing service's own identity (a node name): it keys its slots

    def check(self, caller, action: str, resource: Mapping[str, str] | None = None,
              context: Mapping[str, str] | None = None) -> Decision:
        """Authorize, then apply the obligations to the requested amounts in ``context`` (memory in MiB,
        vcpus, lifetime in seconds): raises AccessDenied, LimitExceeded or ServiceUnavailable."""
        subject = _subject(caller)
        context = dict(context or {})
        decision = self.pdp.decide(subject, action, dict(resource or {}), context)
        if not decision.permit:
            raise denial(subject, action, resource or {}, decision.rule)
        enforce_obligations(decision, context)
        return decision

    def check_many(self, caller, requests: Sequence[Request]) -> list[Decision | VMGridFault]:
        """:meth:`check` for many requests of one caller: per request its Decision, or the fault ``check`` would
        raise for it (AccessDenied, LimitExceeded, InvalidArgument); one denied request does not stop the others.
        A policy point that answers batches (:class:`BatchDecisionPoint`) is asked once."""
        subject = _subject(caller)
        requests = [(action, dict(resource or {}), dict(context or {})) for action, resource, context in requests]
        if isinstance(self.pdp, BatchDecisionPoint):
            decisions = self.pdp.decide_many(subject, requests)
        else:
            decisions = [self.pdp.decide(subject, action, resource, context)
                         for action, resource, context in requests]
        out: list[Decision | VMGridFault] = []
        for (action, resource, context), decision in zip(requests, decisions, strict=True):
            if not decision.permit:
                out.append(denial(subject, action, resource, decision.rule))
                continue
            try:
                enforce_obligations(decision, context)
            except VMGridFault as exc:
                out.append(exc)
                continue
            out.append(decision)
        return out

    def groups(self, caller) -> list[str]:
        return self.pdp.groups(_subject(caller))

    def claim(self, caller, instance: str, resource: Mapping[str, str] | None = None,
              context: Mapping[str, str] | None = None, action: str = "vm.deploy",
              ahead: Sequence[Request] = ()) -> tuple[Decision, Slot]:
        """Authorize a deployment and count the new instance against the concurrent-instance limits in one
        atomic step (20 concurrent deploys cannot overshoot). Release the slot when the instance is gone.
        ``ahead``: the caller's questions expected soon (:meth:`SlotKeeper.claim_slot`); each is still checked
        with :meth:`check` when its operation comes."""
        subject = _subject(caller)
        context = dict(context or {})
        if isinstance(self.pdp, SlotKeeper):
            decision, slot = self.pdp.claim_slot(subject, action, instance, dict(resource or {}), context,
                                                 self.identity, ahead=ahead)
            enforce_obligations(decision, context)
            return decision, slot
        decision = self.check(caller, action, resource, context)
        return decision, Slot(instance, subject.dn, (resource or {}).get("vo"), "", 0.0, None, 0, None,
                              counted=False)

    def release(self, instance: str) -> bool:
        """Free an instance's slot (destroyed, expired, or its deployment failed)."""
        return self.pdp.release_slot(instance, self.identity) if isinstance(self.pdp, SlotKeeper) else False

    def reconcile(self, instances: list[str]) -> list[str]:
        """After a restart: free the slots this service claimed for instances it no longer has."""
        return self.pdp.reconcile_slots(list(instances), self.identity) if isinstance(self.pdp, SlotKeeper) else []


def _subject(caller) -> Subject:
    if isinstance(caller, Subject):
        return caller
    return Subject(caller.dn, bool(getattr(caller, "limited", False)))
