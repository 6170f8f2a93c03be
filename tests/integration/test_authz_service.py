"""The Authorization service live: a real container (cheroot, TLS, WS-Security signed messages) on
loopback, called through zeep built from the served WSDL, every response checked against the
published schema by the container. A matrix of subjects x actions x resources against an independent
statement of the site's expectations; who may ask what; admin changes written to the file and
audited; invalid changes refused with the previous policy in force; slots claimed concurrently."""
from __future__ import annotations

import itertools
import threading

import pytest

from services.authz.audit import verify_chain
from services.authz.faults import InvalidPolicy
from services.authz.pep import Enforcer, Subject
from services.authz.policy import Group, Limits, Rule, load_policy
from services.container.contract import Contract
from services.faults import AccessDenied, InvalidArgument, LimitExceeded
from tests.fixtures.pki import grid_pki  # noqa: F401
from tests.unit.authz.authz_support import AuthzSite, grid_user, limited_proxy, policy_text

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def people(grid_pki):
    carol, dave = grid_user(grid_pki, "carol"), grid_user(grid_pki, "dave")
    return {"alice": grid_pki.alice, "bob": grid_pki.bob, "carol": carol, "dave": dave, "admin": grid_pki.admin}


@pytest.fixture
def site(grid_pki, people, tmp_path):
    dn = {k: v.dn for k, v in people.items()}
    s = AuthzSite(grid_pki, tmp_path, policy_text(admins=[dn["admin"]], groups={
        "bio": {"members": [dn["alice"]], "admins": [dn["carol"]], "limits": {"max_instances_per_group": 4}},
        "hep": {"members": [dn["bob"]]},
    }, limits={"max_lifetime": "2h", "max_memory": 2048, "max_vcpus": 2, "max_instances_per_user": 3,
               "max_instances_per_group": 50}))
    yield s
    s.close()


# -- the matrix -------------------------------------------------------------------------------------

GROUPS = {"alice": {"bio"}, "bob": {"hep"}, "carol": {"bio"}, "dave": set(), "admin": set()}
VO_ADMIN = {"carol": {"bio"}}
IMAGE_ACTIONS = ["image.read", "image.duplicate", "image.update", "image.remove", "image.hold", "vm.deploy"]
VM_ACTIONS = ["vm.inspect", "vm.pause", "vm.save", "vm.destroy", "vm.migrate", "vm.set-lifetime"]


def expected(who: str, limited: bool, action: str, kind: str, vo: str | None, owner: str | None) -> bool:
    """The site's expectations (issue 4), stated independently of the policy engine."""
    if limited and action in ("vm.deploy", "vm.migrate"):
        return False                                    # limited proxies cannot deploy or migrate
    if who == "admin":
        return True                                     # site admins
    member = vo in GROUPS[who]
    vo_admin = vo in VO_ADMIN.get(who, set())
    if kind == "node":
        return False                                    # node administration: site admins only
    if kind == "instance":
        return owner == who or vo_admin                 # only the owner or a VO admin acts on an instance
    if action in ("image.read", "image.duplicate", "vm.deploy"):
        return member                                   # a VO's members see and use its images
    return (member and owner == who) or vo_admin        # update/hold/remove: the owner, or a VO admin


RESOURCES = [("image", "bio", "alice"), ("image", "bio", "carol"), ("image", "hep", "bob"),
             ("instance", "bio", "alice"), ("instance", "hep", "bob"), ("node", None, None)]


def cases():
    for who, limited in itertools.product(["alice", "bob", "carol", "dave", "admin"], [False, True]):
        for kind, vo, owner in RESOURCES:
            actions = IMAGE_ACTIONS if kind == "image" else VM_ACTIONS if kind == "instance" else ["admin.node"]
            for action in actions:
                yield who, limited, action, kind, vo, owner


def test_decision_matrix_against_the_live_service(site, people, grid_pki):
    pep = site.client(grid_pki.host)          # an enforcement point asks about every subject
    dn = {k: v.dn for k, v in people.items()}
    mismatches, count = [], 0
    for who, limited, action, kind, vo, owner in cases():
        resource = {"type": kind, "id": f"{kind}-1"}
        if vo:
            resource["vo"] = vo
        if owner:
            resource["owner"] = dn[owner]
        if kind != "image":
            resource["node"] = "node1"
        decision, groups = pep.authorize(Subject(dn[who], limited), action, resource, {})
        count += 1
        if decision.permit != expected(who, limited, action, kind, vo, owner):
            mismatches.append((who, limited, action, resource, decision.rule))
        assert sorted(groups) == sorted(GROUPS[who])
        assert decision.decision_id and decision.policy == site.authority.policy.current.version
        if decision.permit:
            assert decision.obligations["max_memory"] == "2048"
            assert decision.obligations.get("group") == vo
    assert not mismatches, mismatches
    assert count == 5 * 2 * (3 * len(IMAGE_ACTIONS) + 2 * len(VM_ACTIONS) + 1)
    decisions = site.authority.audit.read(event="decision", limit=1000)
    assert len(decisions) == count
    assert {r["by"] for r in decisions} == {grid_pki.host.subject}
    last = decisions[-1]
    assert set(last) >= {"time", "by", "subject", "action", "resource", "decision", "rule", "policy"}
    assert verify_chain(site.authority.audit.path) >= count


# -- who may ask ------------------------------------------------------------------------------------

def test_a_user_may_ask_about_itself_only_and_a_limited_proxy_stays_limited(site, people, grid_pki):
    alice = site.client(people["alice"].proxy)
    mine = {"type": "instance", "owner": people["alice"].dn, "vo": "bio"}
    decision, groups = alice.authorize(Subject(people["alice"].dn), "vm.migrate", mine)
    assert decision.permit and groups == ["bio"]
    with pytest.raises(AccessDenied, match="only enforcement points .* and policy admins ask"):
        alice.authorize(Subject(people["bob"].dn), "vm.inspect", mine)
    with pytest.raises(AccessDenied):
        alice.groups(people["bob"].dn)
    assert alice.groups(people["alice"].dn) == (["bio"], [])
    limited = site.client(limited_proxy(people["alice"]))
    decision, _ = limited.authorize(Subject(people["alice"].dn, limited=False), "vm.migrate", mine)
    assert (decision.permit, decision.rule) == (False, "limited-proxy-no-deploy")
    refused = site.authority.audit.read(event="access")
    assert refused and refused[-1]["by"] == people["alice"].dn


def test_unknown_actions_and_bad_requests_are_typed_errors(site, grid_pki):
    pep = site.client(grid_pki.host)
    with pytest.raises(InvalidArgument, match="unknown action 'vm.deplyo'"):
        pep.authorize(Subject("/O=Grid/CN=x"), "vm.deplyo", {})
    with pytest.raises(InvalidArgument, match="invalid Authorize request"):
        pep.authorize(Subject("/O=Grid/CN=x"), "Not An Action", {})
    with pytest.raises(InvalidArgument, match="given twice"):
        pep.service.call("Authorize", subject={"dn": "/O=Grid/CN=x"}, action="vm.inspect",
                         resource={"attribute": [{"_value_1": "a", "name": "owner"},
                                                 {"_value_1": "b", "name": "owner"}]})


def test_decision_and_slot_calls_go_without_zeep_rendering_or_deserializing(site, people, grid_pki, monkeypatch):
    """Authorize, ClaimSlot and ReleaseSlot are sent as lxml requests and their answers read from the verified
    payload: zeep renders no request and builds no object form of an answer (most of a decision call's time at
    the enforcing service); typed faults still come back from their detail, and the signature is still
    checked first: an answer signed by another host than the one expected is refused."""
    from zeep.wsdl.bindings.soap import SoapOperation
    from zeep.wsdl.definitions import Operation

    from security.wssec import WSSecurityError

    def never(*_, **__):
        raise AssertionError("zeep rendered a request or deserialized an answer")

    monkeypatch.setattr(SoapOperation, "process_reply", never)
    monkeypatch.setattr(Operation, "create", never)
    alice, host = site.client(people["alice"].proxy), site.client(grid_pki.host)
    decision, groups = alice.authorize(Subject(people["alice"].dn), "vm.inspect",
                                       {"type": "instance", "owner": people["alice"].dn, "vo": "bio"})
    assert decision.permit and groups == ["bio"]
    with pytest.raises(InvalidArgument, match="unknown action"):      # a typed fault from its detail
        alice.authorize(Subject(people["alice"].dn), "vm.nothing", {})
    with pytest.raises(InvalidArgument, match="undeclared: this element is not expected"):   # the schema's
        alice.service.call("GetGroups", payload=_undeclared_child(people["alice"].dn))
    image = {"type": "image", "vo": "bio", "owner": people["alice"].dn}
    decision, slot, renewed = host.claim_slot(Subject(people["alice"].dn), "inst-lxml", image,
                                              {"memory": "512", "lifetime": "60"}, node="n1")
    assert decision.permit and (slot.instance, slot.user_count, renewed) == ("inst-lxml", 1, False)
    with pytest.raises(LimitExceeded):
        host.claim_slot(Subject(people["alice"].dn), "inst-big", image, {"memory": "9999"}, node="n1")
    assert host.release_slot("inst-lxml").instance == "inst-lxml" and host.release_slot("inst-lxml") is None
    foreign = site.client(people["alice"].proxy)
    foreign.service.zeep.wsse.expected_host_dn = "/O=Grid/OU=elsewhere/CN=host/other.example"
    with pytest.raises(WSSecurityError):
        foreign.authorize(Subject(people["alice"].dn), "vm.inspect", {})


def test_a_claim_answers_its_questions_asked_ahead_in_order_and_an_unknown_one_claims_nothing(site, people, grid_pki):
    """ClaimSlot's ahead questions (wsdl/authz.xsd): decided after the claim, in order, under its policy version,
    each audited naming the claim; an unknown action among them is refused before anything is claimed; a caller
    whose fetched contract has no ahead questions (an older service) sends none."""
    host, alice = site.client(grid_pki.host), Subject(people["alice"].dn)
    image = {"type": "image", "vo": "bio", "owner": people["alice"].dn}

    def instance(owner):
        return {"type": "instance", "owner": owner, "vo": "bio", "node": "n1", "id": "inst-a", "image": "bio/x"}

    with pytest.raises(InvalidArgument, match="unknown action"):
        host.claim_slot_ahead(alice, "inst-a", image, {"lifetime": "60"}, node="n1", ahead=[("vm.nothing", {}, {})])
    with pytest.raises(InvalidArgument, match="ahead"):        # at most 4 (the schema's bound)
        host.claim_slot_ahead(alice, "inst-a", image, {"lifetime": "60"}, node="n1",
                              ahead=[("vm.destroy", instance(people["alice"].dn), {})] * 5)
    assert host.list_slots() == []
    assert host.answers_ahead
    decision, slot, renewed, later = host.claim_slot_ahead(
        alice, "inst-a", image, {"lifetime": "60"}, node="n1",
        ahead=[("vm.destroy", instance(people["alice"].dn), {}), ("vm.destroy", instance(people["bob"].dn), {})])
    assert (slot.instance, renewed) == ("inst-a", False)
    assert [(d.permit, d.policy) for d in later] == [(True, decision.policy), (False, decision.policy)]
    audited = {r["id"]: r for r in site.authority.audit.read(event="decision") if r.get("ahead_of")}
    assert [audited[d.decision_id]["ahead_of"] for d in later] == [decision.decision_id] * 2
    host._answers_ahead = False          # as read from an older service's contract
    *_, later = host.claim_slot_ahead(alice, "inst-b", image, {"lifetime": "60"}, node="n1",
                                      ahead=[("vm.destroy", instance(people["alice"].dn), {})])
    assert later == [] and len([r for r in site.authority.audit.read(event="decision") if r.get("ahead_of")]) == 2


def _undeclared_child(dn: str):
    """A GetGroups payload whose element the service's schema refuses (a child it does not declare)."""
    from lxml import etree

    from services.authz.wire import NS

    el = etree.Element(f"{{{NS['az']}}}GetGroups")
    etree.SubElement(el, f"{{{NS['az']}}}dn").text = dn
    etree.SubElement(el, f"{{{NS['az']}}}undeclared").text = "x"
    return el


# -- administration ---------------------------------------------------------------------------------

def test_admin_operations_need_a_policy_admin_with_a_full_proxy(site, people):
    for cred in (people["alice"].proxy, people["carol"].proxy, limited_proxy(people["admin"])):
        client = site.client(cred)
        with pytest.raises(AccessDenied):
            client.rules()
        with pytest.raises(AccessDenied):
            client.add_member("bio", people["dave"].dn)
    assert "dave" not in site.policy_path.read_text()


def test_a_vo_admin_cannot_change_the_policy_over_the_wire_not_even_of_its_own_group(site, people):
    """Policy administration over SOAP is for the `[policy] admins` DNs alone (docs/authz.md, Operations): a VO
    admin (carol administers bio), signing as itself, is refused every admin operation, those on its own group
    included, and the file and the policy in force do not change; nor is it told the policy or the audit."""
    carol = site.client(people["carol"].proxy)
    before = site.policy_path.read_bytes()
    version = site.authority.policy.current.version
    dave = people["dave"].dn
    attempts = {
        "AddMember": lambda: carol.add_member("bio", dave),
        "AddMember as admin": lambda: carol.add_member("bio", dave, admin=True),
        "RemoveMember": lambda: carol.remove_member("bio", people["alice"].dn),
        "AddRule": lambda: carol.add_rule(Rule("carol-all", "permit", ("*",), ("*",)),
                                          before="limited-proxy-no-deploy"),
        "RemoveRule": lambda: carol.remove_rule("limited-proxy-no-deploy"),
        "AddGroup": lambda: carol.add_group(Group("carols", (dave,), (people["carol"].dn,))),
        "RemoveGroup": lambda: carol.remove_group("hep"),
        "ReloadPolicy": lambda: carol.reload(),
        "ListRules": lambda: carol.rules(),
        "ListGroups": lambda: carol.list_groups(),
        "ReadAudit": lambda: carol.audit(),
    }
    for name, attempt in attempts.items():
        with pytest.raises(AccessDenied, match="not a policy admin"):
            attempt()
    assert site.policy_path.read_bytes() == before and site.authority.policy.current.version == version


def test_admin_changes_are_written_audited_and_in_force(site, people, grid_pki):
    admin = site.client(people["admin"].proxy)
    pep = site.client(grid_pki.host)
    dave = Subject(people["dave"].dn)
    bio_image = {"type": "image", "vo": "bio", "owner": people["carol"].dn}
    assert not pep.authorize(dave, "image.read", bio_image)[0].permit

    status = admin.add_member("bio", dave.dn)
    assert status.groups == 2 and status.error is None
    assert pep.authorize(dave, "image.read", bio_image)[0].permit
    on_disk = load_policy(site.policy_path)
    assert dave.dn in on_disk.groups["bio"].members and on_disk.version == status.version

    rule = Rule("no-migrate-bio", "deny", ("group:bio",), ("vm.migrate",), (("vo", ("bio",)),),
                description="bio instances stay where they are")
    admin.add_rule(rule, before="site-admins")
    _, _, rules = admin.rules()
    assert [r.id for r in rules][:3] == ["limited-proxy-no-deploy", "no-migrate-bio", "site-admins"]
    assert rules[1].line is not None and rules[1].description == "bio instances stay where they are"
    alice_instance = {"type": "instance", "vo": "bio", "owner": people["alice"].dn}
    d = pep.authorize(Subject(people["alice"].dn), "vm.migrate", alice_instance)[0]
    assert (d.permit, d.rule) == (False, "no-migrate-bio")

    admin.add_group(Group("chem", (people["dave"].dn,), (people["carol"].dn,), limits=Limits(max_memory=512)))
    _, groups = admin.list_groups()
    chem = next(g for g in groups if g.name == "chem")
    assert chem.members == (people["dave"].dn,) and chem.admins == (people["carol"].dn,)
    assert chem.limits == Limits(max_memory=512)
    d = pep.authorize(dave, "vm.deploy", {"type": "image", "vo": "chem", "owner": people["carol"].dn})[0]
    assert d.permit and d.obligations["max_memory"] == "512"

    admin.remove_member("bio", dave.dn)
    admin.remove_rule("no-migrate-bio")
    admin.remove_group("chem")
    assert not pep.authorize(dave, "image.read", bio_image)[0].permit
    assert pep.authorize(Subject(people["alice"].dn), "vm.migrate", alice_instance)[0].permit

    changes = admin.audit(event="admin", limit=10)
    assert [c["operation"] for c in changes] == ["AddMember", "AddRule", "AddGroup", "RemoveMember", "RemoveRule",
                                                 "RemoveGroup"]
    assert all(c["by"] == people["admin"].dn and c["result"] == "ok" for c in changes)
    assert '+id = "no-migrate-bio"' in changes[1]["diff"]
    assert "# Rules, in order." in site.policy_path.read_text()     # the file's comments are kept


def test_invalid_admin_changes_are_refused_and_nothing_changes(site, people):
    admin = site.client(people["admin"].proxy)
    site.policy_path.write_text(site.policy_path.read_text() + '\n[[rule]]\nid = "hep-only"\neffect = "permit"\n'
                                'subjects = ["group:hep"]\nactions = ["vm.inspect"]\n')
    admin.reload()
    before = site.policy_path.read_bytes()
    version = site.authority.policy.current.version
    with pytest.raises(InvalidPolicy) as info:
        admin.add_rule(Rule("bad", "permit", ("group:physics",), ("vm.*",)))
    assert info.value.rule == "bad" and "unknown group 'physics'" in info.value.reason
    assert info.value.line and info.value.file == str(site.policy_path)
    with pytest.raises(InvalidPolicy, match="named by rule\\(s\\) hep-only"):
        admin.remove_group("hep")
    with pytest.raises(InvalidPolicy, match="no rule 'nope'"):
        admin.remove_rule("nope")
    with pytest.raises(InvalidPolicy, match="is not a DN"):
        admin.add_member("bio", "alice")
    with pytest.raises(InvalidPolicy, match="already exists"):
        admin.add_group(Group("bio"))
    assert site.policy_path.read_bytes() == before and site.authority.policy.current.version == version
    refused = [r for r in admin.audit(event="admin") if r["result"] == "refused"]
    assert len(refused) == 5 and all(r["error"] for r in refused)


def test_reload_refuses_an_invalid_file_and_keeps_the_policy_in_force(site, people, grid_pki):
    admin = site.client(people["admin"].proxy)
    pep = site.client(grid_pki.host)
    dave = Subject(people["dave"].dn)
    hep_image = {"type": "image", "vo": "hep", "owner": people["bob"].dn}
    good = site.policy_path.read_text()
    site.policy_path.write_text(good.replace(f'"{people["bob"].dn}",', f'"{people["bob"].dn}",\n  "{dave.dn}",'))
    status, changed = admin.reload()
    assert changed and pep.authorize(dave, "image.read", hep_image)[0].permit
    site.policy_path.write_text(bad := good.replace("\n[limits]\n", "\n[limits]\nmax_ram = 1\n", 1))
    with pytest.raises(InvalidPolicy) as info:
        admin.reload()
    assert info.value.reason.startswith("unknown limit 'max_ram'")
    assert int(info.value.line) == bad.splitlines().index("[limits]") + 1
    assert pep.authorize(dave, "image.read", hep_image)[0].permit     # the previous policy stays in force
    status, _, _ = admin.rules()
    assert status.version == site.authority.policy.current.version and status.error is not None
    assert "max_ram" in status.error.reason


# -- slots ------------------------------------------------------------------------------------------

def test_slot_operations_are_for_enforcement_points(site, people):
    alice = site.client(people["alice"].proxy)
    with pytest.raises(AccessDenied, match="not an enforcement point"):
        alice.claim_slot(Subject(people["alice"].dn), "i-1", {"type": "image", "vo": "bio"})
    with pytest.raises(AccessDenied):
        alice.release_slot("i-1")
    with pytest.raises(AccessDenied):
        alice.list_slots()



def test_a_slot_is_released_only_by_the_service_that_holds_it(site, people, grid_pki):
    """Any enforcement point could name any instance in ReleaseSlot, and a local grid's nodes share one host
    credential: the release names the releasing node, and another node's slot stays (released=false, audited).
    A release without a node (an older enforcing service) still frees a slot of its credential. Fails without:
    n2 freed n1's slot."""
    host = site.client(grid_pki.host)
    image = {"type": "image", "vo": "bio", "owner": people["alice"].dn}
    for instance in ("held-by-n1", "held-too"):
        host.claim_slot(Subject(people["alice"].dn), instance, image, {"memory": "512", "lifetime": "60"}, node="n1")
    assert host.release_slot("held-by-n1", node="n2") is None
    assert [s.instance for s in host.list_slots() if s.instance.startswith("held-")] == ["held-by-n1", "held-too"]
    refused = site.authority.audit.read(event="slot", limit=1000)[-1]
    assert (refused["node"], refused["claimant"]) == ("n2", f"{grid_pki.host.subject}#n1")
    assert host.release_slot("held-by-n1", node="n1").instance == "held-by-n1"
    assert host.release_slot("held-too").instance == "held-too"            # no node: the credential's own
    assert not [s for s in host.list_slots() if s.instance.startswith("held-")]

def test_twenty_concurrent_deployments_over_soap_cannot_overshoot(site, people, grid_pki):
    enforcer = Enforcer(site.pep())
    image = {"type": "image", "vo": "bio", "owner": people["carol"].dn, "name": "emboss"}
    barrier = threading.Barrier(20)
    won, lost, lock = [], [], threading.Lock()

    def deploy(i):
        barrier.wait()
        try:
            _, slot = enforcer.claim(Subject(people["alice"].dn), f"i-{i}", image,
                                     {"memory": "512", "lifetime": "3600"})
            with lock:
                won.append(slot)
        except LimitExceeded as exc:
            with lock:
                lost.append(exc)

    threads = [threading.Thread(target=deploy, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 3 and len(lost) == 17 and {e.limit for e in lost} == {"max_instances_per_user"}
    admin = site.client(people["admin"].proxy)
    assert sorted(s.instance for s in admin.list_slots(subject=people["alice"].dn)) == \
        sorted(s.instance for s in won)
    carol = Subject(people["carol"].dn)
    enforcer.claim(carol, "c-1", image, {})
    with pytest.raises(LimitExceeded) as info:          # bio's group limit is 4
        enforcer.claim(carol, "c-2", image, {})
    assert info.value.limit == "max_instances_per_group"
    for context, limit in (({"memory": "4096"}, "max_memory"), ({"lifetime": "7201"}, "max_lifetime"),
                           ({"vcpus": "3"}, "max_vcpus")):
        with pytest.raises(LimitExceeded) as info:          # too much: refused before any count
            enforcer.claim(Subject(people["alice"].dn), "c-3", image, context)
        assert info.value.limit == limit
        with pytest.raises(LimitExceeded):                  # and by check, for the other operations
            enforcer.check(Subject(people["alice"].dn), "vm.deploy", image, context)
    assert enforcer.release(won[0].instance) and not enforcer.release(won[0].instance)
    enforcer.claim(carol, "c-2", image, {})
    assert enforcer.reconcile(["c-1", "c-2"]) == sorted(s.instance for s in won[1:])
    assert [s.instance for s in admin.list_slots()] == ["c-1", "c-2"]


def test_every_operation_answers_with_a_response_valid_against_the_contract(site, people, grid_pki):
    """One pass over every operation of wsdl/authz.wsdl through zeep built from the served WSDL; the container
    checks each response against the published schema (a failure would be an InternalFault)."""
    import logging

    called: list[str] = []

    class Calls(logging.Handler):
        def emit(self, record):
            import json
            entry = json.loads(record.getMessage())
            if entry["outcome"] == "ok":
                called.append(entry["operation"])

    handler = Calls()
    logging.getLogger("vmgrid.calls").addHandler(handler)
    logging.getLogger("vmgrid.calls").setLevel(logging.INFO)
    try:
        admin, pep = site.client(people["admin"].proxy), site.client(grid_pki.host)
        alice = Subject(people["alice"].dn)
        image = {"type": "image", "vo": "bio", "owner": people["carol"].dn}
        single, _ = pep.authorize(alice, "vm.deploy", image, {"memory": "256"})
        many, groups = pep.authorize_many(alice, [("vm.deploy", image, {"memory": "256"}),
                                                  ("image.remove", image, {}), ("image.query", {"type": "catalogue"}, {})])
        assert [(d.permit, d.rule) for d in many[:1]] == [(single.permit, single.rule)] and "bio" in groups
        assert len({d.decision_id for d in many}) == 3 and many[1].permit is False and many[2].permit
        pep.groups(alice.dn)
        pep.claim_slot_ahead(alice, "i-1", image, {"lifetime": "60"}, ahead=[("vm.destroy", {"type": "instance"}, {})])
        pep.list_slots(group="bio")
        pep.release_slot("i-1")
        pep.reconcile_slots([])
        admin.rules()
        admin.add_rule(Rule("r1", "permit", ("*",), ("vm.inspect",), (("type", ("instance",)),), (), False,
                            Limits(max_lifetime=60)))
        admin.remove_rule("r1")
        admin.add_group(Group("g1", (people["dave"].dn,)))
        admin.add_member("g1", people["bob"].dn, admin=True)
        admin.list_groups()
        admin.remove_member("g1", people["bob"].dn)
        admin.remove_group("g1")
        admin.reload()
        assert admin.audit(subject=alice.dn, limit=5)
    finally:
        logging.getLogger("vmgrid.calls").removeHandler(handler)
    assert set(called) == set(Contract("authz.wsdl").operations)


def test_one_identity_s_refused_calls_are_counted_not_written_one_by_one(site, people):
    """Any trusted identity may call the service, and each refused call was a record of its own in the audit log
    (about 280 bytes; attack G8: nothing bounded the log at a few hundred signed calls a second). Within a minute
    of a recorded refusal of an identity for an operation the same refusals are counted; the count is written as
    one record when the pair is refused again after the minute, and when the service stops. Nothing is lost."""
    from services.authz.audit import verify_chain

    now = [1000.0]
    site.authz_service.refusals.clock = lambda: now[0]
    bob = site.client(people["bob"].proxy)
    before = len(site.authority.audit.read(event="access", limit=10_000))
    for _ in range(30):
        with pytest.raises(AccessDenied):
            bob.groups(people["alice"].dn)
    with pytest.raises(AccessDenied):
        bob.authorize(Subject(people["alice"].dn), "vm.inspect", {"type": "instance"})   # another operation
    records = site.authority.audit.read(event="access", limit=10_000)[before:]
    assert [(r["by"], r["operation"], r.get("repeated")) for r in records] == [
        (people["bob"].dn, "GetGroups", None), (people["bob"].dn, "Authorize", None)]
    now[0] += 61                                          # after the minute: the count, then the new refusal
    with pytest.raises(AccessDenied):
        bob.groups(people["alice"].dn)
    records = site.authority.audit.read(event="access", limit=10_000)[before:]
    assert [(r["operation"], r.get("repeated"), r.get("since")) for r in records[2:]] == [
        ("GetGroups", 29, records[0]["seq"]), ("GetGroups", None, None)]
    for _ in range(4):
        with pytest.raises(AccessDenied):
            bob.groups(people["alice"].dn)
    site.authz_service.close()                            # stopping writes what is still counted
    site.authz_service.close = lambda: None
    records = site.authority.audit.read(event="access", limit=10_000)[before:]
    assert [(r["operation"], r.get("repeated")) for r in records[4:]] == [("GetGroups", 4)]
    assert verify_chain(site.authority.audit.path) > 0


def test_counted_refusals_are_written_when_the_minute_ends_though_nobody_calls_again(site, people):
    """Attack H5: the count of a burst that then stopped stayed in memory until the service stopped cleanly (and
    was lost to a SIGKILL). The service's recorder writes it when the minute ends, by its timer."""
    import time

    now = [5000.0]
    site.authz_service.refusals.clock = lambda: now[0]
    bob = site.client(people["bob"].proxy)
    before = len(site.authority.audit.read(event="access", limit=10_000))
    for _ in range(7):
        with pytest.raises(AccessDenied):
            bob.list_slots()
    now[0] += 61
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        records = site.authority.audit.read(event="access", limit=10_000)[before:]
        if len(records) >= 2:
            break
        time.sleep(0.2)
    assert [(r["operation"], r.get("repeated"), r.get("since")) for r in records] == [
        ("ListSlots", None, None), ("ListSlots", 6, records[0]["seq"])]


def test_values_and_members_over_their_bounds_are_refused_typed_and_nothing_is_audited(site, people, grid_pki):
    """authz.xsd's AttributeType and MemberType extend xs:string (Axis 1.4 cannot compile a simple-content extension
    of the named ValueType/DNType), so the service bounds them itself: a value over 1024 characters, a member's DN
    empty or over 1024, is an InvalidArgument naming it, and no decision or change is made or audited."""
    from services.authz.policy import Group

    pep = site.client(grid_pki.host)
    before = site.authority.audit.read(limit=10_000)
    with pytest.raises(InvalidArgument, match=r"resource\.vo is 1025 characters: 0 to 1024"):
        pep.authorize(Subject(people["alice"].dn), "vm.inspect", {"type": "instance", "vo": "b" * 1025})
    assert pep.authorize(Subject(people["alice"].dn), "vm.inspect", {"type": "instance", "vo": "b" * 1024})[0]
    admin = site.client(people["admin"].proxy)
    for member in ("", "/O=Grid/CN=" + "m" * 1020):
        with pytest.raises(InvalidArgument, match=r"member is \d+ characters: 1 to 1024"):
            admin.add_group(Group("newgroup", (member,), ()))
    after = site.authority.audit.read(limit=10_000)
    assert [r for r in after[len(before):] if r["event"] != "decision"] == []
    assert len(after) - len(before) == 1                  # the one decision within bounds
