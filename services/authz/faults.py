"""The Authorization service's own fault: a policy that cannot be used (on reload or an admin
change), with where and why; the previous policy stays in force."""
from __future__ import annotations

from services.faults import VMGridFault, register

AUTHZ_NS = "http://vmgrid.org/ns/authz/1"


@register
class InvalidPolicy(VMGridFault):
    """``file`` and ``line`` locate the problem, ``rule`` names the rule or group, ``reason`` says what is wrong."""

    element = "InvalidPolicyFault"
    namespace = AUTHZ_NS
    fields = ("file", "line", "rule", "reason")
