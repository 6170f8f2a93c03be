"""Admin changes are edits of one block of the policy file: everything else (comments, order, layout)
stays as written, and an edit that would change more than intended is refused."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from services.authz.edit import (add_rule, check_edit, put_group, remove_group, remove_rule, render_group,
                                 render_rule, reparse, write_atomically)
from services.authz.policy import Group, Limits, PolicyError, Rule, parse_policy
from tests.unit.authz.authz_support import policy_text

ALICE, CAROL = "/O=Grid/OU=vmgrid/CN=alice", "/O=Grid/OU=vmgrid/CN=carol"
NEW = Rule("no-pause", "deny", ("group:bio",), ("vm.pause",), (("owner", ("!$subject",)),), (), None, Limits(),
           'say "no"')


def comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip().startswith("#")]


@pytest.fixture
def text() -> str:
    return policy_text(groups={"bio": {"members": [ALICE]}})


def apply(text, edit, *args, rules=None, groups=None):
    old = parse_policy(text, "p.toml")
    new_text = edit(text, old, *args)
    new = reparse(new_text, old)
    check_edit(old, new, rules=rules, groups=groups)
    return old, new, new_text


def test_rendered_rules_and_groups_read_back_the_same():
    rule = Rule("r", "permit", ("*", "/O=Grid/CN=odd \"quote\""), ("vm.*",), (("vo", ("$groups", "x*")),),
                (("source", ("local",)),), True, Limits(max_memory=1, max_lifetime=60), "d\u00e9j\u00e0 \\ vu")
    group = Group("g-1", (ALICE,), (CAROL,), None, (), Limits(max_instances_per_group=2), "a group")
    policy = parse_policy(render_group(group) + "\n" + render_rule(rule), "p.toml")
    assert replace(policy.rules[0], line=None) == rule
    assert replace(policy.groups["g-1"], line=None) == group


def test_add_rule_at_the_end_keeps_every_comment(text):
    old, new, new_text = apply(text, add_rule, NEW, None, rules=None or [*parse_policy(text, "p").rules, NEW])
    assert new.rules[-1].id == "no-pause" and len(new.rules) == len(old.rules) + 1
    assert comments(new_text) == comments(text)
    assert new_text.startswith(text.rstrip("\n").rsplit("\n[[rule]]", 1)[0])


def test_add_rule_before_another(text):
    rules = list(parse_policy(text, "p").rules)
    rules.insert(1, NEW)
    old, new, new_text = apply(text, add_rule, NEW, "site-admins", rules=rules)
    assert [r.id for r in new.rules][:3] == ["limited-proxy-no-deploy", "no-pause", "site-admins"]
    assert comments(new_text) == comments(text)


def test_add_rule_refuses_duplicates_and_unknown_anchors(text):
    old = parse_policy(text, "p.toml")
    with pytest.raises(PolicyError, match="already exists"):
        add_rule(text, old, replace(NEW, id="catalogue"))
    with pytest.raises(PolicyError, match="no rule 'nope'"):
        add_rule(text, old, NEW, "nope")


def test_remove_rule_takes_its_attached_comments_only(text):
    text = text.replace('[[rule]]\nid = "catalogue"', '# why: the catalogue is public\n[[rule]]\nid = "catalogue"')
    old = parse_policy(text, "p.toml")
    _, new, new_text = apply(text, remove_rule, "catalogue", rules=[r for r in old.rules if r.id != "catalogue"])
    assert "catalogue" not in [r.id for r in new.rules]
    assert "# why: the catalogue is public" not in new_text
    assert comments(new_text) == [c for c in comments(text) if "why:" not in c]
    with pytest.raises(PolicyError, match="no rule"):
        remove_rule(new_text, new, "catalogue")


def test_put_group_adds_after_the_last_group_and_changes_one_in_place(text):
    text = text.replace("\n[groups.bio]\n", "\n# the bio VO\n[groups.bio]\n")
    old = parse_policy(text, "p.toml")
    hep = Group("hep", (CAROL,))
    _, new, new_text = apply(text, put_group, hep, groups={**old.groups, "hep": hep})
    assert new_text.index("\n[groups.hep]") > new_text.index("\n[groups.bio]")
    assert new_text.index("[groups.hep]") < new_text.index("[[rule]]")
    bio = replace(old.groups["bio"], members=(ALICE, CAROL), limits=Limits(max_memory=512))
    _, newer, newer_text = apply(new_text, put_group, bio, groups={**new.groups, "bio": bio})
    assert newer.groups["bio"].members == (ALICE, CAROL) and newer.groups["hep"].members == (CAROL,)
    assert "# the bio VO\n[groups.bio]" in newer_text
    assert comments(newer_text) == comments(text)


def test_the_first_group_goes_before_the_rules_paragraph():
    text = policy_text()
    old = parse_policy(text, "p.toml")
    bio = Group("bio", (ALICE,))
    _, new, new_text = apply(text, put_group, bio, groups={"bio": bio})
    assert new_text.index("[groups.bio]") < new_text.index("# Rules, in order.")
    assert comments(new_text) == comments(text)
    assert [r.id for r in old.rules] == [r.id for r in new.rules]


def test_remove_group_refused_while_a_rule_names_it(text):
    text = text + '\n[[rule]]\nid = "bio-only"\neffect = "permit"\nsubjects = ["group:bio"]\nactions = ["vm.*"]\n'
    old = parse_policy(text, "p.toml")
    with pytest.raises(PolicyError, match="named by rule\\(s\\) bio-only"):
        remove_group(text, old, "bio")
    text2 = remove_rule(text, old, "bio-only")
    _, new, new_text = apply(text2, remove_group, "bio", groups={})
    assert new.groups == {} and "\n[groups.bio]" not in new_text


def test_layouts_the_edits_cannot_handle_are_refused():
    inline_group = policy_text().replace("# Rules, in order.", '[groups]\nbio = { members = [] }\n\n# Rules, in order.')
    old = parse_policy(inline_group, "p.toml")
    with pytest.raises(PolicyError, match="not written as a \\[groups.bio\\] table"):
        put_group(inline_group, old, Group("bio", (ALICE,)))
    inline_rules = 'rule = [ { id = "a", effect = "permit", subjects = ["*"], actions = ["vm.*"] } ]\n'
    old = parse_policy(inline_rules, "p.toml")
    with pytest.raises(PolicyError, match="not all written as \\[\\[rule\\]\\]"):
        remove_rule(inline_rules, old, "a")


def test_check_edit_refuses_an_edit_that_changed_more_than_intended(text):
    old = parse_policy(text, "p.toml")
    sneaky = text.replace('max_memory = 8192', 'max_memory = 99999')
    new = reparse(add_rule(sneaky, old, NEW), old)
    with pytest.raises(PolicyError, match="edit it by hand"):
        check_edit(old, new, rules=[*old.rules, NEW])


def test_write_atomically_keeps_the_mode_and_leaves_no_temporary_file(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text("old\n")
    os.chmod(path, 0o600)
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n" and (path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.toml"]
