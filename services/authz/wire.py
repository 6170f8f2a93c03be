"""The Authorization service's messages (wsdl/authz.xsd) to and from vmgrid's records: lxml for what
the service writes and both sides read, zeep values for what the client sends."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Sequence

from lxml import etree

from services.authz.faults import AUTHZ_NS
from services.authz.pep import Decision, Request, Slot, Subject
from services.authz.policy import Group, Limits, Patterns, PolicyError, Rule
from services.common.xsdtime import format_datetime, parse_datetime
from services.faults import InvalidArgument

AZ = AUTHZ_NS
NS = {"az": AZ}
LIMIT_XML = (("max_lifetime", "maxLifetime"), ("max_memory", "maxMemory"), ("max_vcpus", "maxVcpus"),
             ("max_instances_per_user", "maxInstancesPerUser"), ("max_instances_per_group", "maxInstancesPerGroup"))


def q(name: str) -> str:
    return f"{{{AZ}}}{name}"


def el(name: str, text: object | None = None) -> etree._Element:
    e = etree.Element(q(name), nsmap={"az": AZ})
    if text is not None:
        e.text = str(text)
    return e


def sub(parent: etree._Element, tag: str, text: object | None = None, **attrs: str) -> etree._Element:
    e = etree.SubElement(parent, q(tag), attrib=attrs)
    if text is not None:
        e.text = str(text)
    return e


def text(parent: etree._Element, name: str) -> str | None:
    e = parent.find(f"az:{name}", NS)
    return e.text if e is not None else None


def boolean(value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    return value.strip() in ("true", "1")


def xml_time(epoch: float) -> str:
    return format_datetime(epoch)


def parse_time(value: str) -> float:
    return parse_datetime(value)


# -- subjects, attributes, limits -----------------------------------------------------------------

def subject_from_xml(e: etree._Element) -> Subject:
    """The subject as sent: a DN is taken character for character (``.../CN=alice `` is not alice, and a blank
    stripped here made it her for the decision while its owner attributes stayed its own)."""
    return Subject(text(e, "dn") or "", boolean(text(e, "limited")))


def subject_to_zeep(subject: Subject) -> dict:
    return {"dn": subject.dn, "limited": subject.limited}


MAX_VALUE = 1024          # characters of an attribute's value or pattern, and of a member's DN (authz.xsd)


def _bounded(text: str | None, what: str, least: int = 0) -> str:
    """An attribute's value or a member's DN within authz.xsd's bounds (ValueType, DNType), which the schema's
    AttributeType and MemberType leave to the service (they extend xs:string, for Axis 1.4): InvalidArgument."""
    text = text or ""
    if not least <= len(text) <= MAX_VALUE:
        raise InvalidArgument(f"{what} is {len(text)} characters: {least} to {MAX_VALUE}", argument=what)
    return text


def attributes_from_xml(e: etree._Element | None, what: str) -> dict[str, str]:
    """Resource or context attributes of a request; a name given twice, or a value over 1024 characters, is
    refused."""
    out: dict[str, str] = {}
    if e is None:
        return out
    for a in e.iterfind("az:attribute", NS):
        name = a.get("name")
        if name in out:
            raise InvalidArgument(f"{what} attribute {name!r} is given twice", argument=f"{what}.{name}")
        out[name] = _bounded(a.text, f"{what}.{name}")
    return out


def attributes_to_zeep(values: Mapping[str, object]) -> dict:
    return {"attribute": [{"_value_1": str(v), "name": k} for k, v in values.items()]}


def decision_request(operation: str, subject: Subject, action: str | None, resource: Mapping[str, object] | None,
                     context: Mapping[str, object] | None, *, instance: str | None = None,
                     node: str | None = None, ahead: Sequence[Request] = ()) -> etree._Element:
    """An Authorize or ClaimSlot request as lxml, in the schema's order (the client sends it without zeep
    rendering it: most of a decision call's time at the enforcing service). ``ahead``: ClaimSlot's questions
    decided ahead, (action, resource, context) each."""
    req = el(operation)
    who = sub(req, "subject")
    sub(who, "dn", subject.dn)
    sub(who, "limited", "true" if subject.limited else "false")
    if action is not None:
        sub(req, "action", action)
    if instance is not None:
        sub(req, "instance", instance)
    _attributes_to_xml(req, resource, context)
    if node:
        sub(req, "node", node)
    for a_action, a_resource, a_context in ahead:
        question = sub(req, "ahead")
        sub(question, "action", a_action)
        _attributes_to_xml(question, a_resource, a_context)
    return req


def _attributes_to_xml(parent: etree._Element, resource: Mapping | None, context: Mapping | None) -> None:
    """The resource and context attribute groups of a request or a question (each only when it has values)."""
    for name, values in (("resource", resource), ("context", context)):
        if values:
            group = sub(parent, name)
            for k, v in values.items():
                sub(group, "attribute", str(v), name=k)


def ahead_from_xml(req: etree._Element) -> list[Request]:
    """ClaimSlot's questions decided ahead, in order."""
    return [(text(q, "action").strip(), attributes_from_xml(q.find("az:resource", NS), "resource"),
             attributes_from_xml(q.find("az:context", NS), "context")) for q in req.iterfind("az:ahead", NS)]


def patterns_from_xml(e: etree._Element | None) -> Patterns:
    grouped: dict[str, list[str]] = {}
    if e is not None:
        where = e.tag.rpartition("}")[2]
        for a in e.iterfind("az:attribute", NS):
            name = a.get("name")
            grouped.setdefault(name, []).append(_bounded(a.text, f"{where}.{name}"))
    return tuple((k, tuple(v)) for k, v in grouped.items())


def patterns_to_xml(parent: etree._Element, name: str, patterns: Patterns) -> None:
    if not patterns:
        return
    e = sub(parent, name)
    for key, pats in patterns:
        for p in pats:
            sub(e, "attribute", p, name=key)


def patterns_to_zeep(patterns: Patterns) -> dict:
    return {"attribute": [{"_value_1": p, "name": k} for k, pats in patterns for p in pats]}


def limits_to_xml(parent: etree._Element, name: str, limits: Limits) -> etree._Element:
    e = sub(parent, name)
    for key, xml in LIMIT_XML:
        value = getattr(limits, key)
        if value is not None:
            sub(e, xml, value)
    return e


def limits_from_xml(e: etree._Element | None) -> Limits:
    if e is None:
        return Limits()
    return Limits(**{key: int(text(e, xml)) for key, xml in LIMIT_XML if text(e, xml) is not None})


def limits_to_zeep(limits: Limits) -> dict:
    return {xml: getattr(limits, key) for key, xml in LIMIT_XML if getattr(limits, key) is not None}


def obligations_to_xml(parent: etree._Element, obligations: Mapping[str, str]) -> None:
    e = sub(parent, "obligations")
    for key, xml in LIMIT_XML:
        if key in obligations:
            sub(e, xml, obligations[key])
    if obligations.get("group"):
        sub(e, "group", obligations["group"])


def obligations_from_xml(e: etree._Element | None) -> dict[str, str]:
    if e is None:
        return {}
    out = {key: text(e, xml).strip() for key, xml in LIMIT_XML if text(e, xml) is not None}
    if text(e, "group"):
        out["group"] = text(e, "group").strip()
    return out


def decision_from_xml(resp: etree._Element) -> Decision:
    permit = text(resp, "decision") == "Permit" if resp.find("az:decision", NS) is not None else True
    return Decision(permit, text(resp, "rule") or "", obligations_from_xml(resp.find("az:obligations", NS)),
                    text(resp, "decisionId") or "", text(resp, "policyVersion") or "")


# -- rules and groups -----------------------------------------------------------------------------

def rule_to_xml(parent: etree._Element, rule: Rule) -> None:
    e = sub(parent, "rule")
    sub(e, "id", rule.id)
    if rule.description:
        sub(e, "description", rule.description)
    sub(e, "effect", rule.effect)
    for s in rule.subjects:
        sub(e, "subject", s)
    for a in rule.actions:
        sub(e, "action", a)
    patterns_to_xml(e, "resource", rule.resource)
    patterns_to_xml(e, "context", rule.context)
    if rule.limited is not None:
        sub(e, "limited", "true" if rule.limited else "false")
    if rule.limits.items():
        limits_to_xml(e, "limits", rule.limits)
    if rule.line:
        sub(e, "line", rule.line)


def rule_from_xml(e: etree._Element) -> Rule:
    limited = text(e, "limited")
    line = text(e, "line")
    return Rule(text(e, "id").strip(), text(e, "effect").strip(),
                tuple((s.text or "").strip() for s in e.iterfind("az:subject", NS)),
                tuple((a.text or "").strip() for a in e.iterfind("az:action", NS)),
                patterns_from_xml(e.find("az:resource", NS)), patterns_from_xml(e.find("az:context", NS)),
                None if limited is None else boolean(limited), limits_from_xml(e.find("az:limits", NS)),
                text(e, "description") or "", int(line) if line else None)


def rule_to_zeep(rule: Rule) -> dict:
    out: dict = {"id": rule.id, "effect": rule.effect, "subject": list(rule.subjects), "action": list(rule.actions)}
    if rule.description:
        out["description"] = rule.description
    if rule.resource:
        out["resource"] = patterns_to_zeep(rule.resource)
    if rule.context:
        out["context"] = patterns_to_zeep(rule.context)
    if rule.limited is not None:
        out["limited"] = rule.limited
    if rule.limits.items():
        out["limits"] = limits_to_zeep(rule.limits)
    return out


def group_to_xml(parent: etree._Element, group: Group) -> None:
    e = sub(parent, "group")
    sub(e, "name", group.name)
    if group.description:
        sub(e, "description", group.description)
    for dn in group.members:
        sub(e, "member", dn)
    for dn in group.imported:
        if dn not in group.members:
            sub(e, "member", dn, source="gridmap")
    for dn in group.admins:
        sub(e, "admin", dn)
    if group.gridmap:
        sub(e, "gridmap", group.gridmap)
    if group.limits.items():
        limits_to_xml(e, "limits", group.limits)


def group_from_xml(e: etree._Element) -> Group:
    members = tuple(_bounded(m.text, "member", 1).strip() for m in e.iterfind("az:member", NS)
                    if m.get("source", "policy") == "policy")
    imported = tuple(_bounded(m.text, "member", 1).strip() for m in e.iterfind("az:member", NS)
                     if m.get("source") == "gridmap")
    return Group(text(e, "name").strip(), members, tuple((a.text or "").strip() for a in e.iterfind("az:admin", NS)),
                 text(e, "gridmap"), (), limits_from_xml(e.find("az:limits", NS)), text(e, "description") or "",
                 None, imported)


def group_to_zeep(group: Group) -> dict:
    out: dict = {"name": group.name, "member": list(group.members), "admin": list(group.admins)}
    if group.description:
        out["description"] = group.description
    if group.gridmap:
        out["gridmap"] = group.gridmap
    if group.limits.items():
        out["limits"] = limits_to_zeep(group.limits)
    return out


# -- status, slots, audit -------------------------------------------------------------------------

@dataclass(frozen=True)
class StatusView:
    """The policy in force as the service reports it."""

    file: str
    version: str
    loaded: str
    rules: int
    groups: int
    error: PolicyError | None
    error_at: str | None


def status_to_xml(parent: etree._Element, status) -> None:
    e = sub(parent, "policy")
    sub(e, "file", status.file)
    sub(e, "version", status.version)
    sub(e, "loaded", xml_time(status.loaded))
    sub(e, "rules", status.rules)
    sub(e, "groups", status.groups)
    if status.error is not None:
        err = sub(e, "lastError")
        sub(err, "file", status.error.file)
        if status.error.line:
            sub(err, "line", status.error.line)
        if status.error.rule:
            sub(err, "rule", status.error.rule)
        sub(err, "reason", status.error.reason)
        sub(err, "at", xml_time(status.error_at))


def status_from_xml(e: etree._Element) -> StatusView:
    err = e.find("az:lastError", NS)
    error = error_at = None
    if err is not None:
        line = text(err, "line")
        error = PolicyError(text(err, "file"), text(err, "reason"), line=int(line) if line else None,
                            rule=text(err, "rule"))
        error_at = text(err, "at")
    return StatusView(text(e, "file"), text(e, "version"), text(e, "loaded"), int(text(e, "rules")),
                      int(text(e, "groups")), error, error_at)


def slot_to_xml(parent: etree._Element, slot: Slot) -> None:
    e = sub(parent, "slot")
    sub(e, "instance", slot.instance)
    sub(e, "subject", slot.subject)
    if slot.group:
        sub(e, "group", slot.group)
    sub(e, "claimant", slot.claimant)
    sub(e, "claimed", xml_time(slot.claimed))
    if slot.expires is not None:
        sub(e, "expires", xml_time(slot.expires))
    sub(e, "userCount", slot.user_count)
    if slot.group_count is not None:
        sub(e, "groupCount", slot.group_count)


def slot_from_xml(e: etree._Element) -> Slot:
    expires = text(e, "expires")
    group_count = text(e, "groupCount")
    return Slot(text(e, "instance"), text(e, "subject"), text(e, "group"), text(e, "claimant"),
                parse_time(text(e, "claimed")), parse_time(expires) if expires else None,
                int(text(e, "userCount")), int(group_count) if group_count is not None else None)


def audit_to_xml(parent: etree._Element, record: dict) -> None:
    e = sub(parent, "record")
    sub(e, "seq", record.get("seq", 0))
    sub(e, "time", record.get("time"))
    sub(e, "event", record.get("event", ""))
    sub(e, "record", json.dumps(record, separators=(",", ":"), ensure_ascii=False))


def audit_from_xml(e: etree._Element) -> dict:
    return json.loads(text(e, "record"))
