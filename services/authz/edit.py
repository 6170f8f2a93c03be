"""The admin operations' changes to the policy file: text edits of one block (a ``[[rule]]`` or a
``[groups.NAME]`` table) that leave the rest of the file as written, each checked by reading the
whole edited policy back before it is written (atomically) in place of the old one."""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

from services.authz.policy import _HEADER, Group, Policy, PolicyError, Rule, parse_policy

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


# -- rendering ------------------------------------------------------------------------------------

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_key(key: str) -> str:
    return key if _BARE.match(key) else json.dumps(key, ensure_ascii=False)


def _patterns(patterns) -> dict:
    return {k: (v[0] if len(v) == 1 else list(v)) for k, v in patterns}


def render_rule(rule: Rule) -> str:
    """A rule as a ``[[rule]]`` block."""
    lines = ["[[rule]]", f"id = {toml_value(rule.id)}"]
    if rule.description:
        lines.append(f"description = {toml_value(rule.description)}")
    lines += [f"effect = {toml_value(rule.effect)}", f"subjects = {toml_value(list(rule.subjects))}",
              f"actions = {toml_value(list(rule.actions))}"]
    if rule.resource:
        lines.append(f"resource = {toml_value(_patterns(rule.resource))}")
    if rule.context:
        lines.append(f"context = {toml_value(_patterns(rule.context))}")
    if rule.limited is not None:
        lines.append(f"limited = {toml_value(rule.limited)}")
    if rule.limits.items():
        lines.append(f"limits = {toml_value(dict(rule.limits.items()))}")
    return "\n".join(lines) + "\n"


def _dn_list(key: str, dns) -> list[str]:
    if not dns:
        return [f"{key} = []"]
    return [f"{key} = ["] + [f"  {toml_value(d)}," for d in dns] + ["]"]


def render_group(group: Group) -> str:
    """A group as a ``[groups.NAME]`` table (its members as written, not those a grid-mapfile adds)."""
    lines = [f"[groups.{toml_key(group.name)}]"]
    if group.description:
        lines.append(f"description = {toml_value(group.description)}")
    lines += _dn_list("members", group.members)
    lines += _dn_list("admins", group.admins)
    if group.gridmap:
        lines.append(f"gridmap = {toml_value(group.gridmap)}")
    if group.gridmap_accounts:
        lines.append(f"gridmap_accounts = {toml_value(list(group.gridmap_accounts))}")
    if group.limits.items():
        lines.append(f"limits = {toml_value(dict(group.limits.items()))}")
    return "\n".join(lines) + "\n"


# -- finding blocks -------------------------------------------------------------------------------

def _headers(lines: list[str]) -> list[tuple[int, str, bool]]:
    out = []
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            name = ".".join(p.strip().strip('"').strip("'") for p in m.group(1).split("."))
            out.append((i, name, line.lstrip().startswith("[[")))
    return out


def _attached_start(lines: list[str], header: int) -> int:
    """The first line of the comment lines directly above a header (no blank line between)."""
    start = header
    while start > 0 and lines[start - 1].strip().startswith("#"):
        start -= 1
    return start


def _span(lines: list[str], headers: list[tuple[int, str, bool]], k: int,
          belongs: Callable[[str, bool], bool] = lambda name, arr: False) -> tuple[int, int]:
    """Lines [start, end) of the block of headers[k]: its attached comments, its body, and the
    following headers that ``belongs`` to it (a group's sub-tables), up to the next block's comments."""
    start = _attached_start(lines, headers[k][0])
    j = k + 1
    while j < len(headers) and belongs(headers[j][1], headers[j][2]):
        j += 1
    end = _attached_start(lines, headers[j][0]) if j < len(headers) else len(lines)
    # blank lines and comment paragraphs after the body belong to what follows
    while end > headers[k][0] + 1 and (not lines[end - 1].strip() or lines[end - 1].strip().startswith("#")):
        end -= 1
    return start, end


def _cut(lines: list[str], start: int, end: int) -> list[str]:
    """``lines`` without [start, end), and without a blank line left doubled by the cut."""
    if 0 < start and end < len(lines) and not lines[start - 1].strip() and not lines[end].strip():
        end += 1
    return lines[:start] + lines[end:]


def _rule_index(lines: list[str], headers, rule: Rule, policy: Policy) -> int:
    position = [r.id for r in policy.rules].index(rule.id)
    arrays = [k for k, (_, name, arr) in enumerate(headers) if name == "rule" and arr]
    if len(arrays) != len(policy.rules):
        raise PolicyError(policy.source, "the rules are not all written as [[rule]] tables; edit the file by hand")
    return arrays[position]


def _group_index(headers, name: str, policy: Policy) -> int:
    for k, (_, h, arr) in enumerate(headers):
        if h == f"groups.{name}" and not arr:
            return k
    raise PolicyError(policy.source, f"group {name!r} is not written as a [groups.{name}] table; edit the file by hand",
                      rule=name)


def _join(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


# -- the edits ------------------------------------------------------------------------------------

def add_rule(text: str, policy: Policy, rule: Rule, before: str | None = None) -> str:
    if policy.rule(rule.id):
        raise PolicyError(policy.source, f"a rule {rule.id!r} already exists", rule=rule.id)
    lines = text.splitlines()
    headers = _headers(lines)
    block = render_rule(rule).splitlines()
    if before is not None:
        target = policy.rule(before)
        if target is None:
            raise PolicyError(policy.source, f"there is no rule {before!r} to add {rule.id!r} before", rule=before)
        start, _ = _span(lines, headers, _rule_index(lines, headers, target, policy))
        return _join(lines[:start] + block + [""] + lines[start:])
    if policy.rules:
        _, end = _span(lines, headers, _rule_index(lines, headers, policy.rules[-1], policy))
        return _join(lines[:end] + [""] + block + lines[end:])
    while lines and not lines[-1].strip():
        lines.pop()
    return _join(lines + [""] + block)


def remove_rule(text: str, policy: Policy, rule_id: str) -> str:
    rule = policy.rule(rule_id)
    if rule is None:
        raise PolicyError(policy.source, f"there is no rule {rule_id!r}", rule=rule_id)
    lines = text.splitlines()
    headers = _headers(lines)
    start, end = _span(lines, headers, _rule_index(lines, headers, rule, policy))
    return _join(_cut(lines, start, end))


def put_group(text: str, policy: Policy, group: Group) -> str:
    """Replace the group's table with ``group`` (comments inside it go), or add it after the last group."""
    lines = text.splitlines()
    headers = _headers(lines)
    block = render_group(group).splitlines()
    prefix = f"groups.{group.name}."
    if group.name in policy.groups:
        k = _group_index(headers, group.name, policy)
        start, end = _span(lines, headers, k, lambda name, arr: name.startswith(prefix))
        header = headers[k][0]  # comments above the table stay
        return _join(lines[:header] + block + lines[end:])
    group_blocks = [k for k, (_, h, arr) in enumerate(headers) if h.startswith("groups.") and not arr]
    if group_blocks:
        k = group_blocks[-1]
        name = headers[k][1].split(".")[1]
        _, end = _span(lines, headers, k, lambda n, arr: n.startswith(f"groups.{name}."))
        return _join(lines[:end] + [""] + block + lines[end:])
    rule_blocks = [k for k, (_, h, arr) in enumerate(headers) if h == "rule" and arr]
    if rule_blocks:
        start = _attached_start(lines, headers[rule_blocks[0]][0])
        # keep the comment paragraph that introduces the rules with them
        if start > 1 and not lines[start - 1].strip() and lines[start - 2].strip().startswith("#"):
            start = _attached_start(lines, start - 1)
        return _join(lines[:start] + block + [""] + lines[start:])
    while lines and not lines[-1].strip():
        lines.pop()
    return _join(lines + [""] + block)


def remove_group(text: str, policy: Policy, name: str) -> str:
    if name not in policy.groups:
        raise PolicyError(policy.source, f"there is no group {name!r}", rule=name)
    users = [r.id for r in policy.rules if f"group:{name}" in r.subjects or f"admin:{name}" in r.subjects]
    if users:
        raise PolicyError(policy.source, f"group {name!r} is named by rule(s) {', '.join(users)}; remove or change "
                          "them first", rule=name)
    lines = text.splitlines()
    headers = _headers(lines)
    k = _group_index(headers, name, policy)
    start, end = _span(lines, headers, k, lambda n, arr: n.startswith(f"groups.{name}."))
    return _join(_cut(lines, start, end))


# -- checking and writing -------------------------------------------------------------------------

def _plain_rule(r: Rule) -> Rule:
    return replace(r, line=None)


def _plain_group(g: Group) -> Group:
    return replace(g, line=None)


def check_edit(old: Policy, new: Policy, *, rules: list[Rule] | None = None,
               groups: dict[str, Group] | None = None) -> None:
    """The edited file must hold exactly the intended rules and groups and nothing else changed."""
    want_rules = [_plain_rule(r) for r in (rules if rules is not None else old.rules)]
    want_groups = {k: _plain_group(g) for k, g in (groups if groups is not None else old.groups).items()}
    got_rules = [_plain_rule(r) for r in new.rules]
    got_groups = {k: _plain_group(g) for k, g in new.groups.items()}
    same_head = (old.admins, old.enforcement_points, old.guests, old.actions, old.defaults, old.description) == \
                (new.admins, new.enforcement_points, new.guests, new.actions, new.defaults, new.description)
    if got_rules != want_rules or got_groups != want_groups or not same_head:
        raise PolicyError(old.source, "the file's layout is not one the admin operations can edit safely "
                          "(the edit would change more than intended); edit it by hand")


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a temporary file beside it, fsynced, renamed over it, directory fsynced."""
    path = Path(path)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(str(path.parent), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def reparse(text: str, old: Policy) -> Policy:
    return parse_policy(text, old.source, base_dir=Path(old.source).resolve().parent)




# -- a new site's policy --------------------------------------------------------------------------------
DEFAULT_POLICY = Path(__file__).with_name("default-policy.toml")


def site_policy(*, admins: Iterable[str] = (), groups: Iterable[Group] = (),
                limits: Mapping[str, int | str] | None = None) -> str:
    """The default policy (default-policy.toml) with its policy admins, VO groups and site limits filled
    in: a new site's first policy file (the main job and the tests start from it)."""
    text = DEFAULT_POLICY.read_text()
    text = text.replace("admins = []\n", f"admins = {toml_value(list(admins))}\n", 1)
    if limits:
        start = text.index("[limits]\n")
        end = text.index("\n\n", start)
        text = text[:start] + "[limits]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in limits.items()) \
            + text[end:]
    blocks = "".join(render_group(g) + "\n" for g in groups)
    marker = "# Rules, in order."
    return text.replace(marker, blocks + marker, 1)
