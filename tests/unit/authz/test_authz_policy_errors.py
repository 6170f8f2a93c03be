"""An unusable policy is refused with the file, the line and the rule or group at fault, and why."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.authz.policy import PolicyError, load_policy, parse_policy
from tests.unit.authz.authz_support import policy_text

GOOD_RULE = """
[[rule]]
id = "ok"
effect = "permit"
subjects = ["*"]
actions = ["vm.inspect"]
"""


def refused(text: str, source: str = "p.toml") -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source)
    return info.value


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(needle))


@pytest.mark.parametrize("rule_body, reason", [
    ('id = "x"\neffect = "allow"\nsubjects = ["*"]\nactions = ["vm.inspect"]', 'effect must be "permit" or "deny"'),
    ('id = "x"\neffect = "permit"\nactions = ["vm.inspect"]', "subjects is missing"),
    ('id = "x"\neffect = "permit"\nsubjects = ["*"]', "actions is missing"),
    ('id = "x"\neffect = "permit"\nsubjects = ["*"]\nactions = ["vm.deplyo"]', "matches no known action"),
    ('id = "x"\neffect = "permit"\nsubjects = ["*"]\nactions = ["VM.*"]', "bad action pattern"),
    ('id = "x"\neffect = "permit"\nsubjects = ["group:physics"]\nactions = ["vm.*"]', "unknown group 'physics'"),
    ('id = "x"\neffect = "permit"\nsubjects = ["alice"]\nactions = ["vm.*"]', "expected *, site-admin"),
    ('id = "x"\neffect = "permit"\nsubjects = ["*"]\nactions = ["vm.*"]\nresource = { owner = "$user" }',
     "unknown variable '$user'"),
    ('id = "x"\neffect = "permit"\nsubjects = ["*"]\nactions = ["vm.*"]\nlimits = { max_ram = 1 }',
     "unknown limit 'max_ram'"),
    ('id = "x"\neffect = "permit"\nsubjects = ["*"]\nactions = ["vm.*"]\nlimits = { max_memory = -1 }',
     "must not be negative"),
    ('id = "x"\neffect = "permit"\nsubjects = ["*"]\nactions = ["vm.*"]\nlimits = { max_lifetime = "soon" }',
     "is not a duration"),
    ('id = "x"\neffect = "deny"\nsubjects = ["*"]\nactions = ["vm.*"]\nlimits = { max_memory = 1 }',
     "a deny rule cannot carry limits"),
    ('id = "x"\neffect = "permit"\nsubjects = ["*"]\nactions = ["vm.*"]\nlimited = "yes"', "limited must be true or false"),
    ('id = "x"\neffect = "permit"\nsubjects = ["*"]\nactions = ["vm.*"]\nwhen = 1', "unknown key(s) when"),
    ('id = "x y"\neffect = "permit"\nsubjects = ["*"]\nactions = ["vm.*"]', "needs an id"),
    ('id = "x"\neffect = "permit"\nsubjects = []\nactions = ["vm.*"]', "subjects must not be empty"),
])
def test_a_bad_rule_is_named_with_its_line(rule_body, reason):
    text = policy_text() + "\n[[rule]]\n" + rule_body + "\n" + GOOD_RULE
    err = refused(text)
    assert reason in err.reason
    assert err.line == len(policy_text().splitlines()) + 2      # the bad rule's [[rule]] header
    assert err.file == "p.toml"
    assert str(err).startswith(f"p.toml:{err.line}:")
    if "needs an id" not in reason:
        assert err.rule == "x"


def test_a_rule_defined_twice():
    text = policy_text() + GOOD_RULE + GOOD_RULE
    err = refused(text)
    assert err.rule == "ok" and "defined twice" in err.reason
    assert err.line == len(text.splitlines()) - 4


def test_toml_syntax_errors_carry_the_line():
    text = policy_text() + '\n[[rule]]\nid = "broken\n'
    err = refused(text)
    assert err.line == len(text.splitlines()) and "not valid TOML" in err.reason


@pytest.mark.parametrize("snippet, reason, rule", [
    ('[groups.bio]\nmembers = ["alice"]', "is not a DN", "bio"),
    ('[groups.bio]\nmember = []', "unknown key(s) member", "bio"),
    ('[groups.bio]\ngridmap = "missing.gridmap"', "does not exist", "bio"),
    ('[groups."b i o"]\nmembers = []', "bad group name", None),
    ('[groups.bio]\nlimits = { max_memory = "lots" }', "whole number", "bio"),
])
def test_a_bad_group_is_named_with_its_line(tmp_path: Path, snippet, reason, rule):
    text = policy_text().replace("# Rules, in order.", snippet + "\n\n# Rules, in order.")
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    err = info.value
    assert reason in err.reason and err.rule == rule
    assert err.line == line_of(text, snippet.splitlines()[0])


@pytest.mark.parametrize("head, reason", [
    ('[policy]\nadmins = 3', "admins must be a list of strings"),
    ('[policy]\nadmins = ["root"]', "is not a DN"),
    ('[policy]\nenforcement_points = ["host"]', "is not a DN pattern"),
    ('[policy]\nactions = ["Deploy"]', "must look like service.verb"),
    ('[policy]\nadmin = []', "unknown key(s) admin"),
    ('[limits]\nmax_ram = 1', "unknown limit 'max_ram'"),
    ('colour = "blue"', "unknown key(s) colour"),
])
def test_bad_heads(head, reason):
    err = refused(head + "\n")
    assert reason in err.reason


def test_new_action_names_are_declared_in_the_policy():
    rule = '[[rule]]\nid = "x"\neffect = "permit"\nsubjects = ["*"]\nactions = ["gridftp.*"]\n'
    assert "matches no known action" in refused(rule).reason
    policy = parse_policy('[policy]\nactions = ["gridftp.read"]\n' + rule, "p.toml")
    assert "gridftp.read" in policy.known_actions


def test_missing_and_unreadable_files(tmp_path: Path):
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "nope.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"# caf\xe9\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(bad)


def test_the_fault_carries_the_location():
    err = refused(policy_text() + '\n[[rule]]\nid = "x"\neffect = "maybe"\nsubjects = ["*"]\nactions = ["vm.*"]\n')
    fault = err.fault()
    assert (fault.file, fault.line, fault.rule) == ("p.toml", err.line, "x")
    assert "previous one stays in force" in fault.description
