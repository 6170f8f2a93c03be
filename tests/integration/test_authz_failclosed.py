"""Fail closed: when the Authorization service cannot be reached (stopped, not answering, or refusing
this host as an enforcement point) every repository operation is refused with a ServiceUnavailable
fault and nothing changes; when the service returns on its address, operations work again."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from services.authz.pep import Subject
from services.faults import ServiceUnavailable
from tests.fixtures.pki import grid_pki  # noqa: F401
from tests.unit.authz.authz_support import AuthzSite, descriptor, policy_text

pytestmark = pytest.mark.timeout(120)


def site_policy(pki, **kwargs) -> str:
    return policy_text(admins=[pki.admin.dn], groups={"bio": {"members": [pki.alice.dn]}}, **kwargs)


@pytest.fixture
def site(grid_pki, tmp_path):
    s = AuthzSite(grid_pki, tmp_path, site_policy(grid_pki), repository=True, permit_ttl=0, timeout=2,
                  restartable=True)
    yield s
    s.close()


def test_service_down_every_operation_refused_then_recovery(site, grid_pki):
    alice = site.repository(grid_pki.alice.proxy)
    alice.register(descriptor("emboss", "bio"), upload=site.upload("e.img", grid_pki.alice.dn))
    upload = site.upload("f.img", grid_pki.alice.dn)

    site.stop_authz()
    attempts = {
        "query": lambda: alice.query(),
        "show": lambda: alice.show("bio/emboss"),
        "register": lambda: alice.register(descriptor("other", "bio"), upload=upload),
        "duplicate": lambda: alice.duplicate("bio/emboss", "copy"),
        "update": lambda: alice.update("bio/emboss", descriptor("emboss", "bio", memory=512)),
        "remove": lambda: alice.remove("bio/emboss"),
        "hold": lambda: alice.hold("bio/emboss", "instance-1", 60),
        "vos": lambda: alice.vos(),
    }
    for name, call in attempts.items():
        with pytest.raises(ServiceUnavailable) as info:
            call()
        assert info.value.service == site.url, name
        assert "cannot decide" in info.value.description and "refused" in info.value.description

    site.start_authz()                       # back on the same address
    [ws] = alice.query().descriptors         # nothing changed while it was down
    assert ws.findtext("{*}identity/{*}name") == "emboss" and ws.findtext("{*}hardware/{*}memory") == "256"
    assert site.uploaded(upload, grid_pki.alice.dn).exists()
    alice.duplicate("bio/emboss", "copy")
    assert sorted(d.findtext("{*}identity/{*}name") for d in alice.query().descriptors) == ["copy", "emboss"]


def test_a_service_that_does_not_answer_is_unavailable(grid_pki):
    """A listener that accepts connections and never answers: the call gives up after the timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        from services.authz.client import ServicePolicyPoint

        url = f"https://127.0.0.1:{listener.getsockname()[1]}/wsrf/services/AuthorizationService"
        pep = ServicePolicyPoint(url, grid_pki.host, grid_pki.trust(), timeout=0.5)
        with pytest.raises(ServiceUnavailable, match="timed out"):
            pep.decide(Subject(grid_pki.alice.dn), "image.read", {"vo": "bio"}, {})
        with pytest.raises(ServiceUnavailable):
            pep.groups(Subject(grid_pki.alice.dn))
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_host_that_is_not_an_enforcement_point_is_refused_closed(grid_pki, tmp_path):
    s = AuthzSite(grid_pki, tmp_path, site_policy(grid_pki, enforcement_points=[]), repository=True, permit_ttl=0)
    try:
        with pytest.raises(ServiceUnavailable, match="refuses this service.*enforcement_points"):
            s.repository(grid_pki.alice.proxy).query()
        refused = s.authority.audit.read(event="access")
        assert refused[-1]["by"] == grid_pki.host.subject
    finally:
        s.close()


def test_a_cached_permit_outlives_an_outage_only_for_its_ttl(grid_pki, tmp_path):
    """Documented behaviour: a permit cached before the outage is honoured until its TTL ends (the clock here
    is the test's own, so no waiting); anything not cached is refused at once."""
    s = AuthzSite(grid_pki, tmp_path, site_policy(grid_pki), restartable=True)
    now = [1000.0]
    pep = s.pep(permit_ttl=5, clock=lambda: now[0])
    alice = Subject(grid_pki.alice.dn)
    image = {"type": "image", "vo": "bio", "owner": grid_pki.alice.dn}
    try:
        assert pep.decide(alice, "image.read", image, {}).permit
        s.stop_authz()
        assert pep.decide(alice, "image.read", image, {}).permit           # cached
        with pytest.raises(ServiceUnavailable):
            pep.decide(alice, "image.update", image, {})                   # not cached
        now[0] += 6
        with pytest.raises(ServiceUnavailable):
            pep.decide(alice, "image.read", image, {})                     # expired
        s.start_authz()
        assert pep.decide(alice, "image.read", image, {}).permit
    finally:
        s.close()


def test_questions_asked_ahead_with_a_claim_are_cached_as_permits_are(grid_pki, tmp_path):
    """ClaimSlot's ahead questions (a node asks its owner's Destroy of the new instance with the claim): each is
    decided and audited with the claim; a permit among them answers the same question later without a call, for
    the TTL only, and only that exact question (subject, limited, action, resource, context); a denial is never
    cached; a newer policy version seen in any answer drops it."""
    s = AuthzSite(grid_pki, tmp_path, site_policy(grid_pki), restartable=True)
    now = [1000.0]
    pep = s.pep(permit_ttl=5, clock=lambda: now[0])
    alice, bob = Subject(grid_pki.alice.dn), Subject(grid_pki.bob.dn)
    image = {"type": "image", "vo": "bio", "owner": grid_pki.alice.dn}

    def instance(key, owner=grid_pki.alice.dn):
        return {"type": "instance", "owner": owner, "vo": "bio", "node": "n1", "id": key, "image": "bio/x"}

    ahead = [("vm.destroy", instance("i-1"), {}), ("vm.destroy", instance("i-1", owner="/O=Grid/CN=someone"), {})]
    try:
        decision, _ = pep.claim_slot(alice, "vm.deploy", "i-1", image, {"lifetime": "60"}, "n1", ahead=ahead)
        records = [r for r in s.authority.audit.read(event="decision") if r.get("ahead_of") == decision.decision_id]
        assert [(r["action"], r["decision"], r["resource"]["owner"]) for r in records] == [
            ("vm.destroy", "permit", grid_pki.alice.dn), ("vm.destroy", "deny", "/O=Grid/CN=someone")]
        s.stop_authz()
        assert pep.decide(alice, "vm.destroy", instance("i-1"), {}).permit            # from the cache: no call
        for subject, resource in ((alice, instance("i-1", owner="/O=Grid/CN=someone")),   # denied: not cached
                                  (alice, instance("i-2")), (bob, instance("i-1")),
                                  (Subject(grid_pki.alice.dn, limited=True), instance("i-1"))):
            with pytest.raises(ServiceUnavailable):
                pep.decide(subject, "vm.destroy", resource, {})
        now[0] += 6
        with pytest.raises(ServiceUnavailable):
            pep.decide(alice, "vm.destroy", instance("i-1"), {})                       # expired
        s.start_authz()

        pep.claim_slot(alice, "vm.deploy", "i-3", image, {"lifetime": "60"}, "n1",
                       ahead=[("vm.destroy", instance("i-3"), {})])
        s.policy_path.write_text(site_policy(grid_pki) + "\n# edited\n")       # a new policy version
        deadline = time.monotonic() + 10
        while s.authority.policy.current.version == decision.policy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pep.decide(alice, "image.read", image, {}).permit                   # its answer names the new version
        s.stop_authz()
        with pytest.raises(ServiceUnavailable):
            pep.decide(alice, "vm.destroy", instance("i-3"), {})                   # dropped with the old policy
        # and the service decides nothing ahead under another version than the claim's
        assert s.authority.decide_ahead(alice, ahead, version=decision.policy, requester="t", claim="d-x") == []
    finally:
        s.close()
