"""The policy model: how rules match (subjects, action patterns, resource and context patterns with
$subject / $groups / $admin-groups and negation, limited proxies), first match wins, deny by default,
and which limits a permit carries."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.authz.pep import Subject
from services.authz.policy import DEFAULT_DENY, Limits, load_policy, parse_policy
from tests.unit.authz.authz_support import DEFAULT_POLICY, policy_text

ALICE, BOB, CAROL, ADMIN = (f"/O=Grid/OU=vmgrid/CN={n}" for n in ("alice", "bob", "carol", "admin"))


@pytest.fixture(scope="module")
def site():
    text = policy_text(admins=[ADMIN], groups={
        "bio": {"members": [ALICE], "admins": [CAROL], "limits": {"max_memory": 4096, "max_instances_per_group": 3}},
        "hep": {"members": [BOB]},
    })
    return parse_policy(text, "site.toml")


def image(vo: str, owner: str, name: str = "img") -> dict:
    return {"type": "image", "vo": vo, "owner": owner, "name": name, "id": "img-1"}


def instance(vo: str, owner: str) -> dict:
    return {"type": "instance", "vo": vo, "owner": owner, "node": "node1", "id": "i-1"}


def test_the_shipped_default_policy_loads_and_denies_by_default():
    policy = load_policy(DEFAULT_POLICY)
    assert policy.groups == {} and policy.admins == ()
    d = policy.decide(Subject(ALICE), "vm.inspect", instance("bio", BOB), {})
    assert (d.permit, d.rule) == (False, DEFAULT_DENY)
    assert policy.defaults == Limits(86400, 8192, 8, 10, 50)


@pytest.mark.parametrize("who, action, resource, context, permit, rule", [
    # a VO's members see its images; others do not
    (ALICE, "image.read", image("bio", BOB), {}, True, "vo-members-use-images"),
    (BOB, "image.read", image("bio", ALICE), {}, False, DEFAULT_DENY),
    (ALICE, "image.query", {"type": "catalogue"}, {}, True, "catalogue"),
    (ALICE, "image.upload", {"type": "catalogue"}, {}, True, "vo-members-upload"),
    ("/O=Grid/CN=nobody", "image.upload", {"type": "catalogue"}, {}, False, DEFAULT_DENY),
    # an image's owner edits it; another member does not; the VO admin does
    (ALICE, "image.update", image("bio", ALICE), {}, True, "owner-edits-image"),
    (ALICE, "image.remove", image("bio", CAROL), {}, False, DEFAULT_DENY),
    (CAROL, "image.remove", image("bio", ALICE), {}, True, "vo-admins"),
    (CAROL, "image.remove", image("hep", BOB), {}, False, DEFAULT_DENY),
    # ingest from the repository host is for site admins only
    (ALICE, "image.register", image("bio", ALICE), {"source": "local"}, False, "local-ingest-admins-only"),
    (ALICE, "image.register", image("bio", ALICE), {"source": "upload"}, True, "vo-members-use-images"),
    (ADMIN, "image.register", image("bio", ALICE), {"source": "local"}, True, "site-admins"),
    (CAROL, "image.register-for-other", image("bio", ALICE), {}, True, "vo-admins-register-for-others"),
    (ALICE, "image.register-for-other", image("bio", BOB), {}, False, DEFAULT_DENY),
    # only an instance's owner or a VO admin acts on it
    (ALICE, "vm.pause", instance("bio", ALICE), {}, True, "owner-acts-on-instance"),
    (BOB, "vm.destroy", instance("bio", ALICE), {}, False, DEFAULT_DENY),
    (CAROL, "vm.destroy", instance("bio", ALICE), {}, True, "vo-admins"),
    (CAROL, "vm.destroy", instance("hep", BOB), {}, False, DEFAULT_DENY),
    # members deploy their VO's images
    (ALICE, "vm.deploy", image("bio", CAROL), {}, True, "vo-members-use-images"),
    (BOB, "vm.deploy", image("bio", CAROL), {}, False, DEFAULT_DENY),
    (ADMIN, "admin.node", {"type": "node", "node": "node1"}, {}, True, "site-admins"),
    (CAROL, "admin.node", {"type": "node", "node": "node1"}, {}, False, DEFAULT_DENY),
])
def test_site_expectations(site, who, action, resource, context, permit, rule):
    d = site.decide(Subject(who), action, resource, context)
    assert (d.permit, d.rule) == (permit, rule)
    assert bool(d.obligations) == permit


@pytest.mark.parametrize("action", ["vm.deploy", "vm.migrate"])
def test_limited_proxies_cannot_deploy_or_migrate_even_as_site_admin(site, action):
    for who, resource in ((ALICE, image("bio", ALICE) if action == "vm.deploy" else instance("bio", ALICE)),
                          (ADMIN, instance("bio", ALICE))):
        d = site.decide(Subject(who, limited=True), action, resource, {})
        assert (d.permit, d.rule) == (False, "limited-proxy-no-deploy")
    # other operations stay possible with a limited proxy
    assert site.decide(Subject(ALICE, limited=True), "vm.inspect", instance("bio", ALICE), {}).permit


def test_a_permit_carries_the_tightest_of_site_group_and_rule_limits():
    text = policy_text(groups={"bio": {"members": [ALICE], "limits": {"max_memory": 4096, "max_vcpus": 16}}},
                       rules_first="""
[[rule]]
id = "short-lived-big"
effect = "permit"
subjects = ["group:bio"]
actions = ["vm.deploy"]
resource = { name = "bigmem*", vo = "$groups" }
limits = { max_lifetime = "2h", max_memory = 6000 }
""")
    policy = parse_policy(text, "p.toml")
    big = policy.decide(Subject(ALICE), "vm.deploy", image("bio", ALICE, "bigmem-emboss"), {})
    assert big.rule == "short-lived-big"
    assert big.obligations == {"max_lifetime": "7200", "max_memory": "4096", "max_vcpus": "8",
                               "max_instances_per_user": "10", "max_instances_per_group": "50", "group": "bio"}
    small = policy.decide(Subject(ALICE), "vm.deploy", image("bio", ALICE, "emboss"), {})
    assert small.rule == "vo-members-use-images" and small.obligations["max_lifetime"] == "86400"


def test_first_matching_rule_wins_over_a_later_permit():
    text = policy_text(groups={"bio": {"members": [ALICE, BOB]}}, rules_first=f"""
[[rule]]
id = "bob-suspended"
effect = "deny"
subjects = ["{BOB}"]
actions = ["vm.*", "image.*"]
""")
    policy = parse_policy(text, "p.toml")
    assert not policy.decide(Subject(BOB), "image.read", image("bio", ALICE), {}).permit
    assert policy.decide(Subject(ALICE), "image.read", image("bio", BOB), {}).permit


def test_patterns_globs_negation_and_dn_globs():
    text = policy_text(rules_first="""
[[rule]]
id = "not-on-node9"
effect = "deny"
subjects = ["/O=Grid/OU=vmgrid/*"]
actions = ["vm.dep*", "vm.migrate"]
context = { node = ["node9", "node9.*"] }

[[rule]]
id = "others-instances"
effect = "deny"
subjects = ["*"]
actions = ["vm.inspect"]
resource = { owner = "!$subject" }

[[rule]]
id = "literal-bang"
effect = "permit"
subjects = ["*"]
actions = ["vm.inspect"]
resource = { tag = "\\\\!odd" }
""")
    policy = parse_policy(text, "p.toml")
    assert policy.decide(Subject(ALICE), "vm.migrate", instance("bio", ALICE), {"node": "node9.example.org"}).rule \
        == "not-on-node9"
    assert policy.decide(Subject("/O=Other/CN=x"), "vm.migrate", instance("bio", "/O=Other/CN=x"),
                         {"node": "node9"}).rule == "owner-acts-on-instance"
    assert policy.decide(Subject(ALICE), "vm.inspect", instance("bio", BOB), {}).rule == "others-instances"
    # a missing attribute matches only a negated pattern
    assert policy.decide(Subject(ALICE), "vm.inspect", {"type": "instance"}, {}).rule == "others-instances"
    d = policy.decide(Subject(ALICE), "vm.inspect", {"type": "instance", "owner": ALICE, "tag": "!odd"}, {})
    assert d.rule == "literal-bang"


def test_groups_admins_are_members_and_lookups_are_sorted(site):
    assert site.groups_of(CAROL) == ["bio"] and site.admin_groups_of(CAROL) == ["bio"]
    assert site.groups_of(ALICE) == ["bio"] and site.admin_groups_of(ALICE) == []
    assert site.groups_of("/O=Grid/CN=nobody") == []
    assert site.is_admin(ADMIN) and not site.is_admin(ALICE)
    assert site.is_enforcement_point("/O=Grid/OU=vmgrid/CN=host/node1.example.org")
    assert not site.is_enforcement_point(ALICE)


def test_version_changes_with_the_text(tmp_path: Path):
    a = parse_policy(policy_text(), "p.toml")
    b = parse_policy(policy_text(admins=[ADMIN]), "p.toml")
    assert a.version != b.version and len(a.version) == 12
    assert parse_policy(policy_text(), "p.toml").version == a.version


def test_limits_tighten_and_durations():
    a = Limits(max_lifetime=100, max_memory=None)
    assert a.tighten(Limits(max_lifetime=50, max_memory=10)) == Limits(max_lifetime=50, max_memory=10)
    assert a.tighten(None) == a
    text = policy_text(limits={"max_lifetime": "7d", "max_memory": 1})
    assert parse_policy(text, "p.toml").defaults == Limits(max_lifetime=7 * 86400, max_memory=1)


HOST = "/O=Grid/OU=vmgrid/CN=host/node1.example.org"


@pytest.mark.parametrize("forged", [
    "/O=Grid/OU=vmgrid/CN=x/CN=host/localhost",      # two CN parts (what `vmgrid ca user "x/CN=host/localhost"` minted)
    "/O=Grid/OU=vmgrid/CN=x\\/CN=host/localhost",    # one CN value holding '/CN=host/...' (a foreign CA's)
    "/O=Grid/OU=vmgrid/CN=host/localhost/CN=alice",  # a host DN with a part after it
])
def test_host_patterns_compare_parsed_names_not_strings(site, forged):
    """The default policy's host rule and enforcement points match a host certificate's DN, and none of these."""
    assert site.is_enforcement_point(HOST) and not site.is_enforcement_point(forged)
    assert site.decide(Subject(HOST), "image.hold", image("hep", BOB), {}).permit
    d = site.decide(Subject(forged), "image.hold", image("hep", BOB), {})
    assert (d.permit, d.rule) == (False, DEFAULT_DENY)


@pytest.mark.parametrize("pattern, dn, hit", [
    ("/O=Grid/*", ALICE, True),
    ("/O=Grid/OU=vmgrid/*", ALICE, True),
    ("/O=Grid/OU=vmgrid/CN=al*", ALICE, True),
    ("/O=Grid/OU=vmgrid/CN=al*", "/O=Grid/OU=vmgrid/CN=al/CN=x", False),   # a value glob stays in its value
    ("/o=Grid/ou=vmgrid/cn=alice", ALICE, True),                           # keys are names, not strings
    ("/O=Grid/*/CN=alice", "/O=Grid/OU=a/OU=b/CN=alice", False),           # a lone * is one part
    ("/O=Grid/OU=vmgrid/CN=alice", "/O=Grid/OU=vmgrid/CN=alice/CN=1234", False),
])
def test_dn_patterns(pattern, dn, hit):
    from services.authz.policy import dn_matches
    assert dn_matches(pattern, dn) is hit


def test_holds_go_to_owners_vo_admins_and_nodes_only(site):
    """A VO member may not pin another member's image; its owner, the VO's admin and a node may, and the permit
    carries max_lifetime, which bounds the hold."""
    assert not site.decide(Subject(ALICE), "image.hold", image("bio", CAROL), {"seconds": "604800"}).permit
    for who, rule in ((ALICE, "owner-edits-image"), (CAROL, "vo-admins"), (HOST, "nodes-stage-images")):
        d = site.decide(Subject(who), "image.hold", image("bio", ALICE), {"seconds": "604800"})
        assert (d.permit, d.rule) == (True, rule) and int(d.obligations["max_lifetime"]) < 604800


def test_a_batch_of_decisions_is_each_exactly_the_single_decision_even_when_a_rule_names_images():
    """decide_many (a bulk import's questions) shares an evaluation only between requests that agree on every
    attribute the policy reads: a rule that names images, one that reads the context and the VO's limits
    still decide each request as decide() does; the Enforcer turns each answer into its own fault."""
    from services.authz.engine import PolicyEnginePoint
    from services.authz.pep import Decision, Enforcer
    from services.faults import AccessDenied, LimitExceeded

    text = policy_text(groups={"bio": {"members": [ALICE], "limits": {"max_memory": 4096}}, "hep": {"members": [ALICE]}},
                       rules_first="""
[[rule]]
id = "no-secret-images"
effect = "deny"
subjects = ["*"]
actions = ["image.register"]
resource = { name = "secret-*" }

[[rule]]
id = "no-local"
effect = "deny"
subjects = ["*"]
actions = ["image.register"]
context = { source = "local" }
""")
    point = PolicyEnginePoint(parse_policy(text, "p.toml"))
    requests = [("image.register", image(vo, ALICE, name), {"source": source, "memory": str(memory)})
                for vo in ("bio", "hep", "astro") for name in ("plain", "secret-1", "plain-2")
                for source in ("import", "local") for memory in (512, 8192)]
    batch = point.decide_many(Subject(ALICE), requests)
    single = [point.decide(Subject(ALICE), a, r, c) for a, r, c in requests]
    assert batch == single
    assert {d.rule for d in batch} >= {"no-secret-images", "no-local", DEFAULT_DENY}
    assert any(d.permit for d in batch)
    answers = Enforcer(point).check_many(Subject(ALICE), requests)
    for (action, resource, context), decision, answer in zip(requests, single, answers):
        if not decision.permit:
            assert isinstance(answer, AccessDenied) and answer.rule == decision.rule
        elif resource["vo"] == "bio" and context["memory"] == "8192":
            assert isinstance(answer, LimitExceeded)        # the bio group's 4096 MiB, applied per request
        else:
            assert isinstance(answer, Decision) and answer.permit


GUEST = "/O=Grid/OU=vmgrid-guests/CN=host/10.99.0.12"


def test_a_guest_containers_certificate_is_neither_a_node_nor_an_enforcement_point(site):
    """A node issues each guest's grid container a host DN (/O=Grid/OU=vmgrid-guests/CN=host/<address>), whose key
    the VM's owner holds as root; the main job's guest CA is the site CA. It matched "/O=Grid/*/CN=host/*": any
    VO's images (nodes-stage-images), anyone's slots and groups (enforcement_points). Fails without [policy]
    guests: the guest read a hep image and was an enforcement point."""
    from services.authz.policy import GUESTS_RULE
    assert site.is_enforcement_point(HOST) and not site.is_enforcement_point(GUEST)
    for action, resource in (("image.read", image("hep", BOB)), ("image.hold", image("bio", ALICE)),
                             ("vm.destroy", instance("bio", GUEST)), ("image.query", {})):
        d = site.decide(Subject(GUEST), action, resource, {})
        assert (d.permit, d.rule) == (False, GUESTS_RULE)
    assert site.decide(Subject(HOST), "image.read", image("hep", BOB), {}).permit       # a real node still is one


def test_the_guest_patterns_follow_the_policy_file():
    """Absent from [policy] (a file written before the setting): the default, vmgrid-guests. A site whose nodes
    use another guest_ou names it; `guests = []` turns the check off; a pattern that is no DN is refused."""
    from services.authz.policy import PolicyError
    text = policy_text().replace('guests = ["/O=Grid/OU=vmgrid-guests/*"]\n', "")
    assert "guests = " not in text
    assert parse_policy(text, "old.toml").is_guest(GUEST)
    other = policy_text().replace('guests = ["/O=Grid/OU=vmgrid-guests/*"]', 'guests = ["/O=Grid/OU=vms/*"]')
    policy = parse_policy(other, "other.toml")
    assert policy.is_guest("/O=Grid/OU=vms/CN=host/10.0.0.9") and not policy.is_guest(GUEST)
    assert not parse_policy(policy_text().replace('guests = ["/O=Grid/OU=vmgrid-guests/*"]', "guests = []"),
                            "off.toml").is_guest(GUEST)
    with pytest.raises(PolicyError, match="guest pattern"):
        parse_policy(policy_text().replace('guests = ["/O=Grid/OU=vmgrid-guests/*"]', 'guests = ["vms"]'), "bad.toml")


# the rule the default policy shipped after `nodes-stage-images` until trial14b V9: a copy of `vo-members-upload`
MEMBERS_UPLOAD = '''[[rule]]
id = "members-upload"
description = "a member of any VO may upload image files into its own upload area"
effect = "permit"
subjects = ["group:*"]
actions = ["image.upload"]

'''


def test_no_rule_of_the_default_policy_is_a_copy_of_an_earlier_one():
    """A rule matching exactly what an earlier rule matches never decides anything (first match wins): the default
    policy carried `members-upload`, `vo-members-upload` again, which `vmgrid authz rules` listed and docs/authz.md
    did not (trial14b V9)."""
    import dataclasses

    seen: dict[tuple, str] = {}
    for rule in load_policy(DEFAULT_POLICY).rules:
        what = repr([v for k, v in dataclasses.asdict(rule).items() if k not in ("id", "description", "line")])
        assert what not in seen, f"rule {rule.id} is rule {seen[what]} again: it never decides anything"
        seen[what] = rule.id


def test_the_default_policy_decides_as_it_did_with_members_upload():
    """Without `members-upload` the default policy decides every request as before (the same permit or deny, by the
    same rule), over every action, each kind of resource and each kind of subject."""
    from services.authz.actions import KNOWN_ACTIONS as ACTIONS

    groups = {"bio": {"members": [ALICE], "admins": [CAROL]}, "hep": {"members": [BOB]}}
    now = parse_policy(policy_text(admins=[ADMIN], groups=groups), "now.toml")
    text = policy_text(admins=[ADMIN], groups=groups)
    assert MEMBERS_UPLOAD not in text
    before_text = text.replace('[[rule]]\nid = "list-own-instances"', MEMBERS_UPLOAD + '[[rule]]\nid = "list-own-instances"')
    assert before_text != text
    before = parse_policy(before_text, "before.toml")
    resources = [image("bio", ALICE), image("hep", BOB), instance("bio", ALICE), instance("bio", BOB),
                 {"type": "catalogue"}, {"type": "node", "node": "node1", "owner": ALICE}, {"owner": ALICE}]
    subjects = [Subject(d) for d in (ALICE, BOB, CAROL, ADMIN, "/O=Grid/CN=nobody", "/O=Grid/OU=x/CN=host/node1")]
    subjects.append(Subject(ALICE, limited=True))
    n = 0
    for subject in subjects:
        for action in ACTIONS:
            for resource in resources:
                for context in ({}, {"source": "local"}):
                    a, b = now.decide(subject, action, resource, context), before.decide(subject, action, resource, context)
                    assert (a.permit, a.rule, a.obligations) == (b.permit, b.rule, b.obligations), (subject, action, resource)
                    n += 1
    assert n > 500
