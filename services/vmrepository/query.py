"""Repository queries: structured criteria (AND within a group, OR between groups) evaluated over the
catalogue's indexed facts, and the WS-ResourceProperties XPath 1.0 dialect.

Every query runs on a CPU budget (:class:`Budget`, BadQuery reason "budget" when spent); ``matches`` uses
RE2, whose time is linear in the text whatever the expression (no catastrophic backtracking)."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import re2
from lxml import etree

from services.common.xsdtime import format_datetime, parse_datetime
from services.descriptor import NUMBER, TIME, VERSION, number_value, resolve_field, version_key
from services.faults import BadQuery

OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "contains", "matches")
ORDERED = ("<", "<=", ">", ">=")
# The value of an ordered comparison of a version field: a Debian version starts with a digit (wsdl/workspace.xsd's
# VersionType, which a descriptor's versions hold to, with a digit first; its 64 characters at most).
VERSION_VALUE = re.compile(r"[0-9][A-Za-z0-9.+:~_\-]{0,63}")
# Word forms of the comparison operators, for SOAP stacks and shells where < and > are awkward.
WORD_OPERATORS = {"eq": "=", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
ORDERABLE = {"name": "name", "vo": "vo", "owner": "owner", "created": "created", "updated": "updated",
             "memory": "memory", "ram": "memory", "vcpus": "vcpus", "size": "size", "id": "image_id"}
XPATH_DIALECT = "http://www.w3.org/TR/1999/REC-xpath-19991116"
MAX_XPATH = 4096
MAX_REGEX = 256
REGEX_MEMORY = 1 << 20          # RE2's memory for one compiled expression (bounds its size)
QUERY_CPU_SECONDS = 2.0         # CPU time one query may use before it is refused (BadQuery reason "budget")


class Budget:
    """The CPU time one query may still use, measured on the thread answering it (so a busy machine
    does not spend it, only the query's own work does). ``charge()`` raises BadQuery once it is spent."""

    def __init__(self, seconds: float = QUERY_CPU_SECONDS):
        self.seconds = seconds
        self.start = time.thread_time()

    @property
    def used(self) -> float:
        return time.thread_time() - self.start

    def charge(self) -> None:
        if self.used > self.seconds:
            raise BadQuery(f"the query used more than its budget of {self.seconds:g} s of CPU time; "
                           f"narrow it (fewer regular expressions, a simpler XPath expression)", reason="budget")


def _regex_options() -> re2.Options:
    o = re2.Options()
    o.log_errors = False
    o.max_mem = REGEX_MEMORY
    return o


@dataclass(frozen=True)
class Criterion:
    field: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.field} {self.op} {self.value}"


@dataclass
class Query:
    groups: list[list[Criterion]] = field(default_factory=list)  # OR of ANDs; [] matches all
    xpath: str | None = None
    namespaces: dict[str, str] = field(default_factory=dict)
    order_by: str = "name"
    descending: bool = False
    offset: int = 0
    limit: int = 20


# -- the command-line form ------------------------------------------------------------------

_CRITERION = re.compile(r"^\s*(?P<field>[A-Za-z][\w.+\-]*)(?:\s+(?P<lib>[A-Za-z0-9][\w.+\-]*))?\s*"
                        r"(?P<op>!=|<=|>=|=|<|>|\b(?:contains|matches|eq|ne|lt|le|gt|ge)\b)\s*(?P<value>.*?)\s*$")


def parse_criterion(text: str) -> Criterion:
    """``ram >= 512``, ``distribution = debian``, ``library emboss >= 6.6``, ``name matches ^deb``."""
    m = _CRITERION.match(text)
    if not m:
        hint = ""
        word = text.strip()
        if re.fullmatch(r"[A-Za-z0-9][\w.+\-]*", word):      # a bare word: what a search box would take
            hint = (f"; images with the library {word}: 'library = {word}'; "
                    f"images whose name has it: 'name contains {word}'")
        raise BadQuery(f"cannot read criterion {text!r}: expected FIELD OPERATOR VALUE "
                       f"(operators: {' '.join(OPERATORS)} {' '.join(WORD_OPERATORS)}){hint}", reason="syntax",
                       criterion=text)
    fieldname, lib, op, value = m.group("field"), m.group("lib"), m.group("op"), m.group("value")
    if op not in ("contains", "matches") and value[:1] in ("=", "<", ">", "!"):
        # 'ram > = 512', 'library emboss = >6.6': an operator split or doubled, not a value (quote one that is)
        joined = op + value[0]
        hint = (f"; did you mean {text[:m.start('op')].rstrip()} {joined} {value[1:].strip()!s}?"
                if joined in OPERATORS else "")
        raise BadQuery(f"cannot read criterion {text!r}: the value {value!r} starts with an operator character "
                       f"(quote it if it is a value){hint}", reason="syntax", criterion=text)
    if lib:
        if fieldname != "library":
            raise BadQuery(f"cannot read criterion {text!r}: only 'library NAME OP VERSION' takes a name",
                           reason="syntax", criterion=text)
        fieldname = f"library.{lib}"
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return Criterion(fieldname, op, value)


def parse_cli(args: list[str]) -> list[list[Criterion]]:
    """Positional criteria; a lone ``or`` starts a new group."""
    groups: list[list[Criterion]] = [[]]
    for a in args:
        if a.strip().lower() == "or":
            groups.append([])
        else:
            groups[-1].append(parse_criterion(a))
    if any(not g for g in groups) and len(groups) > 1:
        raise BadQuery("'or' needs criteria on both sides", reason="syntax")
    return [g for g in groups if g]


# -- checking criteria -----------------------------------------------------------------------

def _time_value(text: str) -> str:
    try:
        ts = parse_datetime(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date/time") from None
    return format_datetime(ts, fraction=False)


@dataclass(frozen=True)
class Prepared:
    """A checked criterion: canonical field path, kind, operator and comparison key."""

    path: str
    kind: str
    op: str
    key: object
    text: str
    regex: object | None = None      # a compiled RE2 expression for "matches"


def prepare(c: Criterion) -> Prepared:
    """Check a criterion (field, operator, value) and compute its comparison key, or raise BadQuery."""
    resolved = resolve_field(c.field)
    if resolved is None:
        raise BadQuery(f"unknown field {c.field!r} (see docs/query.md for the fields)",
                       reason="unknown field", criterion=str(c))
    path, kind = resolved
    c = Criterion(c.field, WORD_OPERATORS.get(c.op, c.op), c.value)
    if c.op not in OPERATORS:
        raise BadQuery(f"unknown operator {c.op!r}", reason="unknown operator", criterion=str(c))
    if c.op == "contains":
        return Prepared(path, kind, c.op, c.value.lower(), c.value)
    if c.op == "matches":
        if len(c.value) > MAX_REGEX:
            raise BadQuery(f"regular expression longer than {MAX_REGEX}", reason="bad regex", criterion=str(c))
        try:
            rx = re2.compile(c.value, _regex_options())
        except re2.error as exc:
            why = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            raise BadQuery(f"bad regular expression {c.value!r}: {why} (RE2 syntax: no backreferences or "
                           f"lookaround)", reason="bad regex", criterion=str(c)) from None
        return Prepared(path, kind, c.op, None, c.value, rx)
    try:
        if kind == NUMBER:
            key: object = number_value(path, c.value)
        elif kind == VERSION:
            if c.op in ORDERED and not VERSION_VALUE.fullmatch(c.value):
                # 'library emboss >= six' matched every image: letters sort below numbers (1.0rc1 < 1.0.1)
                raise ValueError(f"{c.value!r} is not a version: a version starts with a digit and holds letters, "
                                 f"digits and . + : ~ _ - (6.6, 6.6.0-1, 2.6.9-42.EL, 1:6.6.0)")
            key = version_key(c.value)
        elif kind == TIME:
            key = _time_value(c.value)
        else:
            key = c.value
    except ValueError as exc:
        raise BadQuery(f"{c}: {exc}", reason="bad value", criterion=str(c)) from None
    return Prepared(path, kind, c.op, key, c.value)


def prepare_groups(groups: list[list[Criterion]]) -> list[list[Prepared]]:
    return [[prepare(c) for c in g] for g in groups]


def order_column(order_by: str) -> str:
    col = ORDERABLE.get(order_by)
    if col is None:
        raise BadQuery(f"cannot order by {order_by!r}; one of: {', '.join(sorted(ORDERABLE))}",
                       reason="bad order", criterion=order_by)
    return col


# -- XPath ------------------------------------------------------------------------------------

def compile_xpath(expression: str, namespaces: dict[str, str]) -> "XPathQuery":
    """Check an XPath expression; the result carries the query's CPU budget, started now."""
    if len(expression) > MAX_XPATH:
        raise BadQuery(f"XPath expression longer than {MAX_XPATH} characters", reason="xpath too long")
    ns = {"ws": "http://vmgrid.org/ns/workspace/1", **{k: v for k, v in namespaces.items() if k}}
    try:
        etree.XPath(expression, namespaces=ns, smart_strings=False)
    except etree.XPathSyntaxError as exc:
        raise BadQuery(f"bad XPath expression {expression!r}: {exc}", reason="xpath syntax") from None
    return XPathQuery(expression, ns, Budget())


@dataclass
class XPathQuery:
    """A checked XPath expression and the budget of the query it belongs to."""

    expression: str
    namespaces: dict[str, str]
    budget: Budget
