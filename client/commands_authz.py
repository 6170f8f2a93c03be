"""`vmgrid authz …`: the Authorization service from the command line: check a decision, list and
change the policy's rules and VO groups (policy admins), read the audit log, write a new site's policy file
and validate one."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from client.cli import CLIError
from client.output import table
from services.common.errors import printable

DEFAULT_AUTHZ = "https://localhost:8443/wsrf/services/AuthorizationService"
EXIT_DENY = 3


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise CLIError(f"{what} {v!r}: expected NAME=VALUE")
        out[key.strip()] = value
    return out


def _multi(values: list[str] | None, what: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """NAME=PATTERN options; a name given twice is any of the patterns."""
    grouped: dict[str, list[str]] = {}
    for v in values or []:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise CLIError(f"{what} {v!r}: expected NAME=PATTERN")
        grouped.setdefault(key.strip(), []).append(value)
    return tuple((k, tuple(p)) for k, p in grouped.items())


def _limits(values: list[str] | None):
    from services.authz.policy import Limits, PolicyError

    raw = {}
    for k, v in _pairs(values, "--limit").items():
        raw[k] = int(v) if v.strip().isascii() and v.strip().isdigit() and len(v.strip()) <= 40 else v
    try:
        return Limits.parse(raw, "--limit", "command line", None, None)
    except PolicyError as exc:
        raise CLIError(exc.reason) from None


def register(subparsers) -> None:
    from client.commands_repo import add_grid_options

    authz = subparsers.add_parser("authz", help="the Authorization service: decisions, rules, VO groups",
                                  description="Ask the Authorization service for decisions, and administer its "
                                              "policy (rules and VO groups; policy admins). docs/authz.md")
    sub = authz.add_subparsers(dest="authz_command", metavar="COMMAND", required=True)

    p = sub.add_parser("check", help="the decision for SUBJECT doing ACTION on a resource",
                       description="Ask for the decision on SUBJECT (a DN, or 'me') doing ACTION (e.g. vm.deploy) on "
                                   "a resource given as NAME=VALUE attributes (type=image vo=bio owner=/O=...). "
                                   f"Exit status 0 for Permit, {EXIT_DENY} for Deny. Only policy admins and "
                                   "enforcement points may ask about other subjects.")
    p.add_argument("subject", help="a DN, or 'me' for your own")
    p.add_argument("action", help="image.register, image.query, vm.deploy, vm.migrate, ... (docs/authz.md)")
    p.add_argument("resource", nargs="*", default=[], metavar="NAME=VALUE",
                   help="resource attributes: type, vo, owner, name, id, node")
    p.add_argument("--context", "-C", action="append", metavar="NAME=VALUE",
                   help="request context: memory (MiB), vcpus, lifetime (s), node, source, ... (repeatable)")
    p.add_argument("--limited", action="store_true", help="as if the subject came through a limited proxy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("rules", help="the policy's rules, in the order they are tried (policy admins)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules)

    p = sub.add_parser("groups", help="the VO groups (policy admins), or the groups of one DN")
    p.add_argument("dn", nargs="?", help="a subject DN, or 'me'; without it: every group with its members")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_groups)

    add = sub.add_parser("add", help="add a rule, a group or a group member (policy admins)")
    add_sub = add.add_subparsers(dest="what", metavar="WHAT", required=True)
    p = add_sub.add_parser("rule", help="add a rule (at the end, or --before another: the first match wins)")
    p.add_argument("id", help="the rule's id (letters, digits, - and _)")
    p.add_argument("--effect", choices=("permit", "deny"), required=True)
    p.add_argument("--subject", "-s", action="append", required=True,
                   help="*, site-admin, group:NAME, admin:NAME or a DN (repeatable: any of them)")
    p.add_argument("--action", "-a", action="append", required=True, help="an action or pattern, e.g. vm.* "
                   "(repeatable)")
    p.add_argument("--resource", "-r", action="append", metavar="NAME=PATTERN",
                   help="e.g. owner=$subject, vo=$groups, type=image (repeatable)")
    p.add_argument("--context", "-C", action="append", metavar="NAME=PATTERN", help="e.g. source=local")
    p.add_argument("--limited", choices=("yes", "no"), help="match only limited proxies (yes) or only others (no)")
    p.add_argument("--limit", "-l", action="append", metavar="NAME=VALUE",
                   help="max_lifetime (s or 90m/24h/7d), max_memory (MiB), max_vcpus, max_instances_per_user, "
                        "max_instances_per_group")
    p.add_argument("--description", default="")
    p.add_argument("--before", metavar="RULE", help="insert before this rule")
    p.set_defaults(func=cmd_add_rule)
    p = add_sub.add_parser("group", help="add a VO group")
    p.add_argument("name")
    p.add_argument("--member", "-m", action="append", default=[], metavar="DN")
    p.add_argument("--admin", action="append", default=[], metavar="DN")
    p.add_argument("--gridmap", help="import members from this grid-mapfile (on the service's host, relative to "
                   "the policy file)")
    p.add_argument("--limit", "-l", action="append", metavar="NAME=VALUE")
    p.add_argument("--description", default="")
    p.set_defaults(func=cmd_add_group)
    p = add_sub.add_parser("member", help="add a DN to a VO group")
    p.add_argument("group")
    p.add_argument("dn")
    p.add_argument("--admin", action="store_true", help="as an admin of the group")
    p.set_defaults(func=cmd_add_member)

    rm = sub.add_parser("remove", help="remove a rule, a group or a group member (policy admins)")
    rm_sub = rm.add_subparsers(dest="what", metavar="WHAT", required=True)
    p = rm_sub.add_parser("rule", help="remove a rule")
    p.add_argument("id")
    p.set_defaults(func=cmd_remove_rule)
    p = rm_sub.add_parser("group", help="remove a VO group that no rule names")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove_group)
    p = rm_sub.add_parser("member", help="remove a DN from a VO group (members and admins)")
    p.add_argument("group")
    p.add_argument("dn")
    p.set_defaults(func=cmd_remove_member)

    p = sub.add_parser("reload", help="read the policy file again now (policy admins)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("audit", help="the newest records of the audit log (policy admins)")
    p.add_argument("--subject", help="only records about or by this DN")
    p.add_argument("--event", choices=("decision", "slot", "admin", "reload", "access", "start"))
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("slots", help="the instances counted against the concurrent-instance limits")
    p.add_argument("--subject")
    p.add_argument("--group")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_slots)

    for parser in (*sub.choices.values(), *add_sub.choices.values(), *rm_sub.choices.values()):
        if parser.get_default("func") is not None:
            add_grid_options(parser, "VMGRID_AUTHZ", DEFAULT_AUTHZ, "Authorization")

    p = sub.add_parser("init", help="write a new site's policy file: the default rules with its policy admins "
                       "(no service needed)")
    p.add_argument("file", type=Path)
    p.add_argument("--admin", action="append", required=True, metavar="DN",
                   help="a policy administrator's DN (repeatable); they add the VO groups through the service")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("validate", help="check a policy file without a service (exit 1 with file:line: reason)")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_validate)


# -- helpers --------------------------------------------------------------------------------------

def connect(args):
    from client.commands_repo import grid_client
    from services.authz.client import AuthorizationClient

    return AuthorizationClient(grid_client(args, "AuthorizationService"))


def _call(func, *args, **kwargs):
    from client.soap import ClientError
    from services.authz.faults import InvalidPolicy
    from services.faults import VMGridFault

    try:
        return func(*args, **kwargs)
    except InvalidPolicy as exc:
        where = f"{exc.file}" + (f":{exc.line}" if exc.line else "")
        raise CLIError(f"refused: {where}: " + (f"{exc.rule}: " if exc.rule else "") + f"{exc.reason} "
                       "(the policy in force is unchanged)") from None
    except VMGridFault as exc:
        raise CLIError(f"{type(exc).__name__}: {exc.description}") from None
    except ClientError as exc:
        raise CLIError(str(exc)) from None


def _me(args, dn: str) -> str:
    """A subject DN as given (/O=.../CN=...), or for `me` (or -) the caller's own identity. A short name (alice) is
    refused here, with the DN it would be under the caller's own OU: the service would take it for a DN, and
    refuse a question about another subject from anyone but an enforcement point, naming neither."""
    if dn.startswith("/") and "=" in dn:
        return dn
    if dn not in ("me", "-"):
        guess = ""
        if dn and "/" not in dn and "=" not in dn:
            try:
                base = _own_identity(args).rpartition("/CN=")[0]
            except CLIError:
                base = ""
            guess = f" (in your OU: {base}/CN={dn})" if base else ""
        raise CLIError(f"{dn!r} is not a DN: give a full DN, /O=.../CN=NAME{guess}, or `me` for your own")
    return _own_identity(args)


def _own_identity(args) -> str:
    from security.pki import PKIError, load_credential

    try:
        cred = load_credential(proxy=args.proxy) if args.proxy else load_credential()
    except (PKIError, OSError) as exc:
        raise CLIError(str(exc)) from None
    return cred.identity


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _status_line(status) -> str:
    line = printable(f"policy {status.version} ({status.file}): {_n(status.rules, 'rule')}, {_n(status.groups, 'group')}")
    if status.error is not None:
        line += "\nwarning: " + printable(f"the file changed into a policy that was refused at {status.error_at}: "
                                         f"{status.error}")
    return line


# -- commands -------------------------------------------------------------------------------------

def cmd_check(args) -> int:
    from services.authz.pep import REQUEST_LIMITS, Subject, enforce_obligations
    from services.faults import VMGridFault

    subject = Subject(_me(args, args.subject), args.limited)
    resource = _pairs(args.resource, "resource attribute")
    context = _pairs(args.context, "--context")
    for key, _, _ in REQUEST_LIMITS:       # asked amounts: a resource attribute of that name would be left unchecked
        if key in resource:
            raise CLIError(f"{key}={resource[key]} is an amount the request asks for, checked against the decision's "
                           f"limits, not a resource attribute: give it as -C {key}={resource[key]}")
    decision, groups = _call(connect(args).authorize, subject, args.action, resource, context)
    problem = None
    if decision.permit:
        try:
            enforce_obligations(decision, context)
        except VMGridFault as exc:
            problem = exc.description
    if args.json:
        json.dump({"decision": "Permit" if decision.permit else "Deny", "rule": decision.rule,
                   "decisionId": decision.decision_id, "policy": decision.policy,
                   "obligations": dict(decision.obligations), "groups": groups, "limitExceeded": problem},
                  sys.stdout, indent=2)
        print()
    else:
        # the service's text, escaped (a rule, an id, group names: nothing that moves the cursor or fakes a line)
        print(printable(f"{'Permit' if decision.permit else 'Deny'}  rule {decision.rule}  "
                        f"(decision {decision.decision_id}, policy {decision.policy})"))
        if decision.obligations:
            print(printable("obligations: " + " ".join(f"{k}={v}" for k, v in decision.obligations.items())))
        print(printable(f"groups of {subject.dn}: {', '.join(g or '' for g in groups) or '(none)'}"))
        if problem:
            print(printable(f"but: {problem}; the enforcing service refuses the request"))
    return 0 if decision.permit and not problem else EXIT_DENY


def cmd_rules(args) -> int:
    status, defaults, rules = _call(connect(args).rules)
    if args.json:
        json.dump({"policy": {"file": status.file, "version": status.version, "loaded": status.loaded,
                              "error": str(status.error) if status.error else None},
                   "limits": dict(defaults.items()),
                   "rules": [{"id": r.id, "effect": r.effect, "subjects": list(r.subjects),
                              "actions": list(r.actions), "resource": {k: list(v) for k, v in r.resource},
                              "context": {k: list(v) for k, v in r.context}, "limited": r.limited,
                              "limits": dict(r.limits.items()), "description": r.description, "line": r.line}
                             for r in rules]}, sys.stdout, indent=2)
        print()
        return 0
    print(_status_line(status))
    print("site limits: " + (" ".join(f"{k}={v}" for k, v in defaults.items()) or "(none)"))
    table(["#", "rule", "line", "effect", "subjects", "actions", "conditions"],
          [(i, r.id, r.line or "", r.effect, ",".join(r.subjects), ",".join(r.actions),
            " ".join(r.summary().split(" ")[3:])) for i, r in enumerate(rules, 1)])
    print("(first match wins; no match: deny)")
    return 0


def cmd_groups(args) -> int:
    client = connect(args)
    if args.dn:
        dn = _me(args, args.dn)
        member, admin = _call(client.groups, dn)
        if args.json:
            json.dump({"dn": dn, "groups": member, "admin": admin}, sys.stdout, indent=2)
            print()
        else:
            table(["group", "role"], [(g, "admin" if g in admin else "member") for g in member])
        return 0
    status, groups = _call(client.list_groups)
    if args.json:
        json.dump([{"name": g.name, "description": g.description, "members": list(g.members),
                    "admins": list(g.admins), "gridmap": g.gridmap, "gridmapMembers": list(g.imported),
                    "limits": dict(g.limits.items())} for g in groups], sys.stdout, indent=2)
        print()
        return 0
    print(_status_line(status))
    rows = []
    for g in groups:
        for dn in g.admins:
            rows.append((g.name, "admin", dn))
        for dn in g.members:
            rows.append((g.name, "member", dn))
        for dn in g.imported:
            if dn not in g.members:
                rows.append((g.name, f"member (grid-mapfile {g.gridmap})", dn))
        if g.limits.items():
            rows.append((g.name, "limits", " ".join(f"{k}={v}" for k, v in g.limits.items())))
    table(["group", "role", "dn"], rows)
    return 0


def cmd_add_rule(args) -> int:
    from services.authz.policy import Rule

    limited = None if args.limited is None else args.limited == "yes"
    rule = Rule(args.id, args.effect, tuple(args.subject), tuple(args.action), _multi(args.resource, "--resource"),
                _multi(args.context, "--context"), limited, _limits(args.limit), args.description)
    status = _call(connect(args).add_rule, rule, args.before)
    print(f"added rule {args.id}" + (f" before {args.before}" if args.before else " at the end"))
    print(_status_line(status))
    return 0


def cmd_add_group(args) -> int:
    from services.authz.policy import Group

    group = Group(args.name, tuple(args.member), tuple(args.admin), args.gridmap, (), _limits(args.limit),
                  args.description)
    print(f"added group {args.name}\n" + _status_line(_call(connect(args).add_group, group)))
    return 0


def cmd_add_member(args) -> int:
    status = _call(connect(args).add_member, args.group, args.dn, args.admin)
    print(f"added {args.dn} to {args.group}" + (" as an admin" if args.admin else "") + "\n" + _status_line(status))
    return 0


def cmd_remove_rule(args) -> int:
    print(f"removed rule {args.id}\n" + _status_line(_call(connect(args).remove_rule, args.id)))
    return 0


def cmd_remove_group(args) -> int:
    print(f"removed group {args.name}\n" + _status_line(_call(connect(args).remove_group, args.name)))
    return 0


def cmd_remove_member(args) -> int:
    status = _call(connect(args).remove_member, args.group, args.dn)
    print(f"removed {args.dn} from {args.group}\n" + _status_line(status))
    return 0


def cmd_reload(args) -> int:
    status, changed = _call(connect(args).reload)
    print(("reloaded: " if changed else "unchanged: ") + _status_line(status))
    return 0


def cmd_audit(args) -> int:
    records = _call(connect(args).audit, args.subject, args.event, args.limit)
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        print()
        return 0
    rows = []
    for r in records:
        what = r.get("action") or r.get("operation") or r.get("reason") or ""
        on = r.get("resource") or r.get("instance") or r.get("target") or ""
        if isinstance(on, dict):
            on = ",".join(f"{k}={v}" for k, v in on.items())
        rows.append((r.get("time", ""), r.get("event", ""), r.get("by", ""), r.get("subject", ""), what, on,
                     _audit_outcome(r), r.get("rule", ""), _audit_reason(r, what)))
    table(["time", "event", "by", "subject", "what", "on", "outcome", "rule", "reason"], rows)
    return 0


def _audit_outcome(r: dict) -> str:
    """A record's outcome; a count of refusals (``repeated``) as ``refused x4 (as #134, last 18:58:59)``:
    4 more refusals like record 134 (``since #134`` when some were for another reason), the last of them at
    18:58:59 (the day too when it is not the record's own)."""
    outcome = str(r.get("decision") or r.get("result") or "")
    if not r.get("repeated"):
        return outcome
    same = " as in record " in str(r.get("reason", ""))      # all for the reason of the record they repeat
    last = str(r.get("last") or "")
    if last[:10] == str(r.get("time", ""))[:10]:
        last = last[11:19]
    else:
        last = last[:19].replace("T", " ")
    return f"{outcome} x{r['repeated']} ({'as' if same else 'since'} #{r.get('since', '?')}" + \
        (f", last {last})" if last else ")")


def _audit_reason(r: dict, what: str) -> str:
    """Why: a refused caller's reason (a count's: how many for each reason), a refused change's or claim's
    error; "" when the WHAT column already shows it (a reload's cause)."""
    if r.get("repeated"):
        reasons, others = r.get("reasons") or {}, r.get("others") or 0
        if len(reasons) == 1 and not others:
            return str(next(iter(reasons)))
        parts = [f"{n} x {why}" for why, n in reasons.items()]
        return "; ".join(parts + ([f"{others} x for other reasons"] if others else []))
    reason = r.get("error") or r.get("reason") or ""
    return "" if reason == what else str(reason)


def cmd_slots(args) -> int:
    from services.authz.wire import xml_time

    slots = _call(connect(args).list_slots, args.subject, args.group)
    if args.json:
        json.dump([{"instance": s.instance, "subject": s.subject, "group": s.group, "claimant": s.claimant,
                    "claimed": xml_time(s.claimed), "expires": xml_time(s.expires) if s.expires else None}
                   for s in slots], sys.stdout, indent=2)
        print()
        return 0
    table(["instance", "subject", "group", "claimant", "claimed", "expires"],
          [(s.instance, s.subject, s.group or "", s.claimant, xml_time(s.claimed)[:19],
            xml_time(s.expires)[:19] if s.expires else "") for s in slots])
    return 0


def cmd_init(args) -> int:
    from services.authz.edit import site_policy, write_atomically
    from services.authz.policy import PolicyError, parse_policy

    if args.file.exists() and not args.force:
        raise CLIError(f"{args.file} exists (--force replaces it)")
    text = site_policy(admins=args.admin)
    try:
        policy = parse_policy(text, str(args.file))
    except PolicyError as exc:
        raise CLIError(f"invalid policy: {exc.reason}") from None
    try:
        args.file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.file, text)
    except OSError as exc:
        raise CLIError(f"cannot write {args.file}: {exc.strerror}") from None
    print(f"{args.file}: the default policy ({_n(len(policy.rules), 'rule')}), policy admins: {', '.join(args.admin)}")
    return 0


def cmd_validate(args) -> int:
    from services.authz.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        raise CLIError(f"invalid policy: {exc}") from None
    imported = sum(len(g.imported) for g in policy.groups.values())
    print(f"{args.file}: valid, version {policy.version}: {_n(len(policy.rules), 'rule')}, "
          f"{_n(len(policy.groups), 'group')}"
          + (f" ({imported} members from grid-mapfiles)" if imported else ""))
    return 0
