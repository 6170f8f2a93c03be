"""The authorization policy: VO groups, ordered rules and limits, read from one human-edited TOML file
(docs/authz.md), and the decisions it gives: the first rule that matches decides; deny by default."""
from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from gridftp.gridmap import dn_key
from security.pki import dn_parts
from services.authz.actions import ACTION_PATTERN, KNOWN_ACTIONS, matching
from services.authz.faults import InvalidPolicy
from services.authz.gridmap import GridmapError, read_gridmap
from services.authz.pep import Decision, Subject

DEFAULT_DENY = "default-deny"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ATTRIBUTE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
VARIABLES = ("$subject", "$groups", "$admin-groups")
EFFECTS = ("permit", "deny")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class PolicyError(ValueError):
    """A policy that cannot be used: ``file`` and ``line`` say where, ``rule`` which rule or group, ``reason`` why."""

    def __init__(self, file: str, reason: str, *, line: int | None = None, rule: str | None = None):
        self.file, self.reason, self.line, self.rule = str(file), reason, line, rule
        where = self.file + (f":{line}" if line else "")
        what = f" {rule}:" if rule else ""
        super().__init__(f"{where}:{what} {reason}")

    def fault(self) -> InvalidPolicy:
        return InvalidPolicy(f"invalid policy, the previous one stays in force: {self}", file=self.file,
                             line=self.line, rule=self.rule, reason=self.reason)


# -- limits ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Limits a permit carries as obligations; None = no limit at this level."""

    max_lifetime: int | None = None             # seconds of an instance's lifetime (or an image hold)
    max_memory: int | None = None               # MiB of RAM of one instance
    max_vcpus: int | None = None                # virtual CPUs of one instance
    max_instances_per_user: int | None = None   # concurrent instances of one subject
    max_instances_per_group: int | None = None  # concurrent instances charged to one VO group

    def items(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def tighten(self, other: "Limits | None") -> "Limits":
        """The stricter of each limit of ``self`` and ``other``."""
        if other is None:
            return self
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = b if a is None else a if b is None else min(a, b)
        return Limits(**out)

    def obligations(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.items()}

    @classmethod
    def parse(cls, data: Any, where: str, file: str, line: int | None, rule: str | None) -> "Limits":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PolicyError(file, f"{where} must be a table of limits", line=line, rule=rule)
        known = [f.name for f in fields(cls)]
        values = {}
        for key, value in data.items():
            if key not in known:
                raise PolicyError(file, f"unknown limit {key!r} in {where}; known: {', '.join(known)}",
                                  line=line, rule=rule)
            values[key] = _limit_value(key, value, file, line, rule)
        return cls(**values)


def _limit_value(key: str, value: Any, file: str, line: int | None, rule: str | None) -> int:
    if key == "max_lifetime" and isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise PolicyError(file, f"max_lifetime {value!r} is not a duration (e.g. 3600, \"90m\", \"24h\", \"7d\")",
                              line=line, rule=rule)
        return int(m.group(1)) * _UNITS[m.group(2)]
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(file, f"{key} must be a whole number, not {value!r}", line=line, rule=rule)
    if value < 0:
        raise PolicyError(file, f"{key} must not be negative ({value})", line=line, rule=rule)
    return value


# -- the model ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """A VO group: members and admins by DN (admins are members), optionally imported from a grid-mapfile."""

    name: str
    members: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()
    gridmap: str | None = None                   # as written in the policy (relative to the policy file)
    gridmap_accounts: tuple[str, ...] = ()       # import only DNs mapped to these accounts ("" = all)
    limits: Limits = Limits()
    description: str = ""
    line: int | None = None
    imported: tuple[str, ...] = ()               # DNs read from the grid-mapfile

    @property
    def everyone(self) -> frozenset[str]:
        return frozenset(self.members) | frozenset(self.admins) | frozenset(self.imported)


Patterns = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Rule:
    """One rule: if the subject, the action, the resource and the context all match, ``effect`` decides."""

    id: str
    effect: str
    subjects: tuple[str, ...]
    actions: tuple[str, ...]
    resource: Patterns = ()
    context: Patterns = ()
    limited: bool | None = None
    limits: Limits = Limits()
    description: str = ""
    line: int | None = None

    @property
    def permit(self) -> bool:
        return self.effect == "permit"

    def summary(self) -> str:
        """One line, for listings: ``permit group:bio vm.* owner=$subject``."""
        parts = [self.effect, ",".join(self.subjects), ",".join(self.actions)]
        for key, pats in self.resource:
            parts.append(f"{key}={'|'.join(pats)}")
        for key, pats in self.context:
            parts.append(f"context.{key}={'|'.join(pats)}")
        if self.limited is not None:
            parts.append(f"limited={'yes' if self.limited else 'no'}")
        parts += [f"{k}={v}" for k, v in self.limits.items()]
        return " ".join(parts)


@dataclass(frozen=True)
class SubjectView:
    """What rules see of a subject: its DN, whether it came through a limited proxy, its groups."""

    dn: str
    limited: bool
    groups: frozenset[str]
    admin_groups: frozenset[str]
    site_admin: bool


# The certificates nodes issue to the grid containers in guests (docs/jobs.md, "In a guest") carry host DNs,
# /O=Grid/OU=<[vmmanager] guest_ou>/CN=host/<leased address>, from a CA the services may trust (the main job's
# site CA): without this, the key in a guest (whose owner is root there) passed "/O=Grid/*/CN=host/*" as a node
# and an enforcement point (any VO's images, anyone's slots).
DEFAULT_GUESTS = ("/O=Grid/OU=vmgrid-guests/*",)
GUESTS_RULE = "guests-are-not-grid-identities"


@dataclass(frozen=True)
class Policy:
    source: str
    version: str                                  # sha256 (12 hex) of the file and the grid-mapfiles it imports
    admins: tuple[str, ...] = ()                  # policy (site) admins: the admin operations, subject "site-admin"
    enforcement_points: tuple[str, ...] = ()      # DN patterns of services that may ask about any subject
    actions: tuple[str, ...] = ()                 # action names beyond the built-in vocabulary
    defaults: Limits = Limits()                   # site-wide limits, [limits]
    groups: Mapping[str, Group] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    description: str = ""
    files: tuple[str, ...] = ()                   # the policy file and its grid-mapfiles (watched for changes)
    _members: Mapping[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)
    _admins: Mapping[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)
    # DN patterns of guest containers' certificates (a node issues them host DNs, [vmmanager] guest_ou): denied
    # everything, never enforcement points, whatever the rules and enforcement_points say
    guests: tuple[str, ...] = DEFAULT_GUESTS
    # groups by the dn_key of the DNs their grid-mapfiles name: matched as Globus matches a grid-mapfile's DN
    _imported: Mapping[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def known_actions(self) -> tuple[str, ...]:
        return KNOWN_ACTIONS + tuple(a for a in self.actions if a not in KNOWN_ACTIONS)

    def groups_of(self, dn: str) -> list[str]:
        """The groups ``dn`` belongs to (as member, admin or from a grid-mapfile), sorted."""
        return sorted(self._groups_of(dn))

    def _groups_of(self, dn: str) -> frozenset[str]:
        # a DN written in the policy is matched exactly; one a grid-mapfile names as Globus matches it (dn_key:
        # ASCII case ignored, /UID= as /USERID=, /E= and /Email= as /emailAddress=), as a Globus server would map it
        return self._members.get(dn, frozenset()) | self._imported.get(dn_key(dn), frozenset())

    def admin_groups_of(self, dn: str) -> list[str]:
        return sorted(self._admins.get(dn, ()))

    def is_admin(self, dn: str) -> bool:
        return dn in self.admins

    def is_guest(self, dn: str) -> bool:
        return any(dn_matches(p, dn) for p in self.guests)

    def is_enforcement_point(self, dn: str) -> bool:
        return any(dn_matches(p, dn) for p in self.enforcement_points) and not self.is_guest(dn)

    def rule(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)

    def attributes_read(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The resource keys and context keys a decision of this policy can depend on: those its rules name,
        and the resource's ``vo`` (its group's limits become obligations). Two requests of one subject for one
        action that agree on these get the same decision."""
        resource = {"vo"} | {key for rule in self.rules for key, _ in rule.resource}
        context = {key for rule in self.rules for key, _ in rule.context}
        return tuple(sorted(resource)), tuple(sorted(context))

    def view(self, subject: Subject) -> SubjectView:
        return SubjectView(subject.dn, subject.limited, self._groups_of(subject.dn),
                           self._admins.get(subject.dn, frozenset()), self.is_admin(subject.dn))

    # -- decisions --------------------------------------------------------------------------------
    def decide(self, subject: Subject, action: str, resource: Mapping[str, str],
               context: Mapping[str, str]) -> Decision:
        """The first rule matching (subject, action, resource, context) decides; none matching is a denial.
        A permit carries the limits of the site, of the resource's VO group and of the rule, tightest first."""
        if self.is_guest(subject.dn):
            return Decision(False, GUESTS_RULE)
        view = self.view(subject)
        for rule in self.rules:
            if matches(rule, view, action, resource, context):
                if not rule.permit:
                    return Decision(False, rule.id)
                return Decision(True, rule.id, self.obligations(rule, resource))
        return Decision(False, DEFAULT_DENY)

    def obligations(self, rule: Rule | None, resource: Mapping[str, str]) -> dict[str, str]:
        limits = self.defaults
        group = self.groups.get(resource.get("vo", "")) if resource.get("vo") else None
        if group is not None:
            limits = limits.tighten(group.limits)
        if rule is not None:
            limits = limits.tighten(rule.limits)
        out = limits.obligations()
        if group is not None:
            out["group"] = group.name
        return out


def matches(rule: Rule, subject: SubjectView, action: str, resource: Mapping[str, str],
            context: Mapping[str, str]) -> bool:
    if rule.limited is not None and rule.limited != subject.limited:
        return False
    if not any(fnmatchcase(action, p) for p in rule.actions):
        return False
    if not any(subject_matches(p, subject) for p in rule.subjects):
        return False
    for key, patterns in rule.resource:
        if not any(value_matches(p, resource.get(key), subject) for p in patterns):
            return False
    for key, patterns in rule.context:
        if not any(value_matches(p, context.get(key), subject) for p in patterns):
            return False
    return True


def subject_matches(pattern: str, s: SubjectView) -> bool:
    if pattern == "*":
        return True
    if pattern == "site-admin":
        return s.site_admin
    if pattern.startswith("group:"):
        name = pattern[6:]
        return bool(s.groups) if name == "*" else name in s.groups
    if pattern.startswith("admin:"):
        name = pattern[6:]
        return bool(s.admin_groups) if name == "*" else name in s.admin_groups
    return dn_matches(pattern, s.dn)


# -- DN patterns: compared name part by name part, never as strings -------------------------------

_PATTERN_SPLIT = re.compile(r"(?<!\\)/(?=[A-Za-z][A-Za-z0-9.]*=|\*(?:/|$))")


@lru_cache(maxsize=4096)
def _pattern_parts(pattern: str) -> tuple | None:
    """``/O=Grid/*/CN=host/*`` as (("O", "Grid"), "*", ("CN", "host"), "*"); None if it is no DN pattern."""
    if not pattern.startswith("/"):
        return None
    out: list = []
    for token in _PATTERN_SPLIT.split(pattern[1:]):
        if token == "*":
            out.append("*")
            continue
        try:
            (part,) = dn_parts("/" + token)
        except ValueError:
            return None
        out.append(part)
    return tuple(out)


@lru_cache(maxsize=4096)
def _name_parts(dn: str) -> tuple | None:
    try:
        return tuple(dn_parts(dn))
    except ValueError:
        return None


def dn_matches(pattern: str, dn: str) -> bool:
    """Whether the subject ``dn`` matches a policy DN ``pattern``, compared on parsed names (a value containing
    ``/CN=host/...`` stays one value and never matches a host pattern). Keys compare exactly; a value is a glob
    within that one value; a ``*`` standing alone between slashes is exactly one name part; a trailing ``/*`` is
    one or more further parts, or the rest of the last value after a '/' (``CN=host/*`` matches ``CN=host/node1``)."""
    if pattern == "*":
        return True
    tokens, parts = _pattern_parts(pattern), _name_parts(dn)
    if tokens is None or parts is None:
        return False
    n, m = len(tokens), len(parts)

    def match(ti: int, ri: int) -> bool:
        if ti == n:
            return ri == m
        token = tokens[ti]
        if token == "*":
            return ri < m if ti == n - 1 else ri < m and match(ti + 1, ri + 1)
        if ri >= m or parts[ri][0] != token[0]:
            return False
        value = parts[ri][1]
        if fnmatchcase(value, token[1]) and match(ti + 1, ri + 1):
            return True
        return ti == n - 2 and tokens[-1] == "*" and ri == m - 1 and fnmatchcase(value, token[1] + "/*")

    return match(0, 0)


def value_matches(pattern: str, value: str | None, s: SubjectView) -> bool:
    """``$subject``, ``$groups``, ``$admin-groups``, a glob, or any of these negated with a leading ``!``;
    ``\\`` before a leading ``!`` or ``$`` makes it literal. A missing attribute matches only negations."""
    negate = pattern.startswith("!")
    p = pattern[1:] if negate else pattern
    if value is None:
        hit = False
    elif p == "$subject":
        hit = value == s.dn
    elif p == "$groups":
        hit = value in s.groups
    elif p == "$admin-groups":
        hit = value in s.admin_groups
    else:
        if p.startswith("\\"):
            p = p[1:]
        hit = fnmatchcase(value, p)
    return hit != negate


# -- reading the file -----------------------------------------------------------------------------

_TOML_LINE = re.compile(r"at line (\d+)")
_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _header_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, dotted table name without quotes, is an array table) of every table header."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            name = ".".join(part.strip().strip('"').strip("'") for part in m.group(1).split("."))
            out.append((n, name, line.lstrip().startswith("[[")))
    return out


def _strings(value: Any, what: str, file: str, line: int | None, rule: str | None, *,
             allow_single: bool = True, allow_empty: bool = True) -> tuple[str, ...]:
    if isinstance(value, str) and allow_single:
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(file, f"{what} must be a list of strings", line=line, rule=rule)
    if not value and not allow_empty:
        raise PolicyError(file, f"{what} must not be empty", line=line, rule=rule)
    return tuple(value)


def _check_keys(data: dict, allowed: tuple[str, ...], what: str, file: str, line: int | None,
                rule: str | None) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise PolicyError(file, f"unknown key(s) {', '.join(unknown)} in {what}; known: {', '.join(allowed)}",
                          line=line, rule=rule)


def _dn(value: str, what: str, file: str, line: int | None, rule: str | None) -> str:
    if not value.startswith("/") or "=" not in value:
        raise PolicyError(file, f"{what} {value!r} is not a DN in /O=.../CN=... form", line=line, rule=rule)
    return value


def _patterns(data: Any, what: str, file: str, line: int | None, rule: str) -> Patterns:
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise PolicyError(file, f"{what} must be a table of attribute = pattern(s)", line=line, rule=rule)
    out = []
    for key, value in data.items():
        if not ATTRIBUTE.match(key):
            raise PolicyError(file, f"{what}: bad attribute name {key!r}", line=line, rule=rule)
        pats = _strings(value, f"{what}.{key}", file, line, rule, allow_empty=False)
        for p in pats:
            bare = p[1:] if p.startswith("!") else p
            if bare.startswith("$") and bare not in VARIABLES:
                raise PolicyError(file, f"{what}.{key}: unknown variable {bare!r}; known: {', '.join(VARIABLES)} "
                                  "(write \\$ for a literal $)", line=line, rule=rule)
        out.append((key, pats))
    return tuple(out)


def _subject_pattern(p: str, groups: Mapping[str, Any], file: str, line: int | None, rule: str) -> str:
    if p in ("*", "site-admin"):
        return p
    for prefix in ("group:", "admin:"):
        if p.startswith(prefix):
            name = p[len(prefix):]
            if name != "*" and name not in groups:
                raise PolicyError(file, f"subject {p!r} names an unknown group {name!r}"
                                  + (f"; groups: {', '.join(sorted(groups))}" if groups else "; no groups are defined"),
                                  line=line, rule=rule)
            return p
    if p.startswith("/") and "=" in p and _pattern_parts(p) is not None:
        return p
    raise PolicyError(file, f"subject {p!r}: expected *, site-admin, group:NAME, admin:NAME or a DN (/O=.../CN=...)",
                      line=line, rule=rule)


def parse_policy(text: str, source: str = "policy.toml", *, base_dir: Path | None = None) -> Policy:
    """Read and check a whole policy; raise :class:`PolicyError` naming the file, line and rule at fault."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_LINE.search(str(exc))
        raise PolicyError(source, f"not valid TOML: {exc}", line=int(m.group(1)) if m else None) from None
    if not data:
        raise PolicyError(source, "the policy file is empty (no [policy], groups, limits or rules): refused, "
                                  "since it would deny everyone, policy admins included; a file caught half "
                                  "written? write one (`vmgrid authz init FILE --admin DN`) and reload")
    headers = _header_lines(text)

    def header_line(name: str, array_index: int | None = None) -> int | None:
        hits = [n for n, h, is_array in headers if h == name and (array_index is None or is_array)]
        if array_index is None:
            return hits[0] if hits else None
        return hits[array_index] if array_index < len(hits) else None

    _check_keys(data, ("policy", "limits", "groups", "rule"), "the policy file", source, None, None)
    digest = hashlib.sha256(text.encode())
    files = [source]

    head = data.get("policy", {})
    head_line = header_line("policy")
    if not isinstance(head, dict):
        raise PolicyError(source, "[policy] must be a table", line=head_line)
    _check_keys(head, ("admins", "enforcement_points", "guests", "actions", "description"), "[policy]", source,
                head_line, None)
    admins = tuple(_dn(d, "admin", source, head_line, None)
                   for d in _strings(head.get("admins", []), "[policy] admins", source, head_line, None))
    eps = _strings(head.get("enforcement_points", []), "[policy] enforcement_points", source, head_line, None)
    for p in eps:
        if p != "*" and _pattern_parts(p) is None:
            raise PolicyError(source, f"enforcement point {p!r} is not a DN pattern (/O=Grid/*/CN=host/*)",
                              line=head_line)
    guests = tuple(_strings(head.get("guests", list(DEFAULT_GUESTS)), "[policy] guests", source, head_line, None))
    for p in guests:
        if _pattern_parts(p) is None:
            raise PolicyError(source, f"guest pattern {p!r} is not a DN pattern (/O=Grid/OU=vmgrid-guests/*)",
                              line=head_line)
    extra = _strings(head.get("actions", []), "[policy] actions", source, head_line, None)
    for a in extra:
        if not re.match(r"^[a-z][a-z0-9-]*(\.[a-z0-9-]+)+$", a):
            raise PolicyError(source, f"action name {a!r} must look like service.verb", line=head_line)
    description = head.get("description", "")
    if not isinstance(description, str):
        raise PolicyError(source, "[policy] description must be a string", line=head_line)

    defaults = Limits.parse(data.get("limits"), "[limits]", source, header_line("limits"), None)

    raw_groups = data.get("groups", {})
    if not isinstance(raw_groups, dict):
        raise PolicyError(source, "groups must be tables: [groups.NAME]", line=header_line("groups"))
    groups: dict[str, Group] = {}
    base = base_dir if base_dir is not None else Path(source).resolve().parent
    for name, g in raw_groups.items():
        line = header_line(f"groups.{name}")
        where = f"group {name!r}"
        if not NAME.match(name):
            raise PolicyError(source, f"bad group name {name!r}: letters, digits, - and _ only", line=line)
        if not isinstance(g, dict):
            raise PolicyError(source, f"{where} must be a table", line=line)
        _check_keys(g, ("members", "admins", "gridmap", "gridmap_accounts", "limits", "description"),
                    where, source, line, name)
        members = tuple(_dn(d, "member", source, line, name)
                        for d in _strings(g.get("members", []), "members", source, line, name))
        gadmins = tuple(_dn(d, "admin", source, line, name)
                        for d in _strings(g.get("admins", []), "admins", source, line, name))
        gridmap = g.get("gridmap")
        accounts = _strings(g.get("gridmap_accounts", []), "gridmap_accounts", source, line, name)
        imported: tuple[str, ...] = ()
        if gridmap is not None:
            if not isinstance(gridmap, str) or not gridmap:
                raise PolicyError(source, "gridmap must be the path of a grid-mapfile", line=line, rule=name)
            gpath = (base / gridmap) if not Path(gridmap).is_absolute() else Path(gridmap)
            try:
                entries = read_gridmap(gpath)
                digest.update(gpath.read_bytes())
            except FileNotFoundError:
                raise PolicyError(source, f"grid-mapfile {gpath} does not exist", line=line, rule=name) from None
            except OSError as exc:
                raise PolicyError(source, f"cannot read grid-mapfile {gpath}: {exc.strerror}", line=line,
                                  rule=name) from None
            except GridmapError as exc:
                raise PolicyError(exc.path, exc.reason, line=exc.line or None, rule=name) from None
            files.append(str(gpath))
            imported = tuple(dict.fromkeys(e.dn for e in entries
                                           if not accounts or set(e.accounts) & set(accounts)))
        gdesc = g.get("description", "")
        if not isinstance(gdesc, str):
            raise PolicyError(source, "description must be a string", line=line, rule=name)
        groups[name] = Group(name, members, gadmins, gridmap, accounts,
                             Limits.parse(g.get("limits"), f"{where} limits", source, line, name),
                             gdesc, line, imported)

    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PolicyError(source, "rules are written as [[rule]] tables", line=header_line("rule"))
    known = KNOWN_ACTIONS + tuple(a for a in extra if a not in KNOWN_ACTIONS)
    rules: list[Rule] = []
    seen: dict[str, int | None] = {}
    for i, r in enumerate(raw_rules):
        line = header_line("rule", i)
        label = f"rule #{i + 1}"
        if not isinstance(r, dict):
            raise PolicyError(source, f"{label} must be a table", line=line)
        rid = r.get("id")
        if not isinstance(rid, str) or not NAME.match(rid):
            raise PolicyError(source, f"{label} needs an id of letters, digits, - and _ (got {rid!r})", line=line)
        label = f"rule {rid!r}"
        if rid in seen:
            raise PolicyError(source, f"{label} is defined twice (first at line {seen[rid]})", line=line, rule=rid)
        seen[rid] = line
        _check_keys(r, ("id", "description", "effect", "subjects", "actions", "resource", "context", "limited",
                        "limits"), label, source, line, rid)
        effect = r.get("effect")
        if effect not in EFFECTS:
            raise PolicyError(source, f"effect must be \"permit\" or \"deny\", not {effect!r}", line=line, rule=rid)
        if "subjects" not in r:
            raise PolicyError(source, "subjects is missing (use [\"*\"] for every authenticated subject)",
                              line=line, rule=rid)
        subjects = tuple(_subject_pattern(p, groups, source, line, rid)
                         for p in _strings(r["subjects"], "subjects", source, line, rid, allow_empty=False))
        if "actions" not in r:
            raise PolicyError(source, "actions is missing", line=line, rule=rid)
        acts = _strings(r["actions"], "actions", source, line, rid, allow_empty=False)
        for a in acts:
            if not ACTION_PATTERN.match(a):
                raise PolicyError(source, f"bad action pattern {a!r}", line=line, rule=rid)
            if not matching(a, known):
                families = sorted({k.split(".")[0] + ".*" for k in known})
                raise PolicyError(source, f"action {a!r} matches no known action (families: {', '.join(families)}; "
                                  "new names go in [policy] actions)", line=line, rule=rid)
        limited = r.get("limited")
        if limited is not None and not isinstance(limited, bool):
            raise PolicyError(source, "limited must be true or false", line=line, rule=rid)
        limits = Limits.parse(r.get("limits"), "limits", source, line, rid)
        if effect == "deny" and limits.items():
            raise PolicyError(source, "a deny rule cannot carry limits", line=line, rule=rid)
        rdesc = r.get("description", "")
        if not isinstance(rdesc, str):
            raise PolicyError(source, "description must be a string", line=line, rule=rid)
        rules.append(Rule(rid, effect, subjects, acts, _patterns(r.get("resource"), "resource", source, line, rid),
                          _patterns(r.get("context"), "context", source, line, rid), limited, limits, rdesc, line))

    members: dict[str, set[str]] = {}
    admins_of: dict[str, set[str]] = {}
    imported_of: dict[str, set[str]] = {}
    for g in groups.values():
        for dn in (*g.members, *g.admins):
            members.setdefault(dn, set()).add(g.name)
        for dn in g.imported:
            imported_of.setdefault(dn_key(dn), set()).add(g.name)
        for dn in g.admins:
            admins_of.setdefault(dn, set()).add(g.name)
    return Policy(source, digest.hexdigest()[:12], admins, eps, extra, defaults, groups, tuple(rules), description,
                  tuple(files), {k: frozenset(v) for k, v in members.items()},
                  {k: frozenset(v) for k, v in admins_of.items()}, guests,
                  {k: frozenset(v) for k, v in imported_of.items()})


def load_policy(path: str | Path) -> Policy:
    """The policy in ``path`` (grid-mapfiles relative to its directory)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(str(path), "the policy file does not exist") from None
    except UnicodeDecodeError:
        raise PolicyError(str(path), "the policy file is not UTF-8 text") from None
    except OSError as exc:
        raise PolicyError(str(path), f"cannot read the policy file: {exc.strerror}") from None
    return parse_policy(text, str(path), base_dir=path.resolve().parent)
