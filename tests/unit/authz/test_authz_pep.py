"""The enforcement point: denials become AccessDenied, obligations are applied to the request, and
the interim built-in policy keeps working behind the same interface."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.authz.engine import site_policy_point
from services.authz.pep import Decision, Enforcer, Subject, enforce_obligations
from services.faults import AccessDenied, InvalidArgument, LimitExceeded

OBLIGED = Decision(True, "r", {"max_memory": "1024", "max_vcpus": "2", "max_lifetime": "3600"})


@pytest.mark.parametrize("context, limit", [({"memory": "1025"}, "max_memory"), ({"vcpus": "3"}, "max_vcpus"),
                                            ({"lifetime": "3601"}, "max_lifetime")])
def test_obligations_refuse_too_much(context, limit):
    with pytest.raises(LimitExceeded) as info:
        enforce_obligations(OBLIGED, context)
    assert info.value.limit == limit and "exceeds the limit" in info.value.description


def test_obligations_allow_up_to_the_limit_and_ignore_what_they_do_not_limit():
    enforce_obligations(OBLIGED, {"memory": "1024", "vcpus": "2", "lifetime": "3600", "node": "n1"})
    enforce_obligations(Decision(True, "r"), {"memory": "999999"})


def test_a_requested_amount_must_be_a_number():
    with pytest.raises(InvalidArgument, match="whole number"):
        enforce_obligations(OBLIGED, {"memory": "lots"})


class Fixed:
    def __init__(self, decision):
        self.decision = decision

    def decide(self, subject, action, resource, context):
        return self.decision

    def groups(self, subject):
        return ["bio"]


def test_enforcer_check_raises_access_denied_with_the_rule_and_applies_limits():
    caller = SimpleNamespace(dn="/O=Grid/CN=alice", limited=False)
    with pytest.raises(AccessDenied) as info:
        Enforcer(Fixed(Decision(False, "default-deny"))).check(caller, "vm.deploy", {"vo": "bio"})
    assert (info.value.rule, info.value.action, info.value.resource) == ("default-deny", "vm.deploy", "vo=bio")
    with pytest.raises(LimitExceeded):
        Enforcer(Fixed(OBLIGED)).check(caller, "vm.deploy", {"vo": "bio"}, {"memory": "4096"})
    assert Enforcer(Fixed(OBLIGED)).check(caller, "vm.deploy", {"vo": "bio"}, {"memory": "512"}) is OBLIGED


def test_the_built_in_policy_still_works_and_counts_nothing():
    policy = site_policy_point(vos={"bio": {"members": ["/O=Grid/CN=alice"], "admins": []}})
    enforcer = Enforcer(policy)
    alice = Subject("/O=Grid/CN=alice")
    assert enforcer.groups(alice) == ["bio"]
    decision, slot = enforcer.claim(alice, "i-1", {"type": "image", "vo": "bio"}, action="image.read")
    assert decision.permit and not slot.counted
    assert enforcer.release("i-1") is False and enforcer.reconcile(["i-1"]) == []
