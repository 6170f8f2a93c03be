"""Concurrent-instance limits: the slot ledger counts atomically (threads and processes racing cannot
overshoot), claims are idempotent per instance, slots expire, and a restarted service reconciles."""
from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from services.authz.audit import AuditLog
from services.authz.authority import LocalPolicyPoint, PolicyAuthority
from services.authz.pep import Enforcer, Subject
from services.authz.slots import SlotLedger
from services.authz.store import PolicyFile
from services.faults import AccessDenied, InvalidArgument, LimitExceeded
from tests.unit.authz.authz_support import policy_text

ALICE, BOB, CAROL = (f"/O=Grid/OU=vmgrid/CN={n}" for n in ("alice", "bob", "carol"))
HOST = "/O=Grid/OU=vmgrid/CN=host/node1"


def race(n: int, func) -> tuple[list, list]:
    """Run func(i) in n threads released at once; (results, errors)."""
    barrier = threading.Barrier(n)
    results, errors, lock = [], [], threading.Lock()

    def run(i):
        barrier.wait()
        try:
            r = func(i)
            with lock:
                results.append(r)
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_twenty_concurrent_claims_cannot_pass_the_per_user_limit(tmp_path: Path):
    ledger = SlotLedger(tmp_path / "slots.sqlite")
    ok, errors = race(20, lambda i: ledger.claim(f"i-{i}", ALICE, "bio", HOST, max_per_user=5, max_per_group=None))
    assert len(ok) == 5 and len(errors) == 15
    assert all(isinstance(e, LimitExceeded) and e.limit == "max_instances_per_user" and e.allowed == "5"
               for e in errors)
    assert ledger.counts(ALICE, "bio") == (5, 5)
    assert sorted(s.user_count for s, _ in ok) == [1, 2, 3, 4, 5]


def test_the_group_limit_holds_across_users(tmp_path: Path):
    ledger = SlotLedger(tmp_path / "slots.sqlite")
    users = [f"/O=Grid/OU=vmgrid/CN=u{i}" for i in range(10)]
    ok, errors = race(20, lambda i: ledger.claim(f"i-{i}", users[i % 10], "bio", HOST, max_per_user=2,
                                                 max_per_group=7))
    assert len(ok) == 7 and all(e.limit == "max_instances_per_group" for e in errors)
    assert ledger.counts(users[0], "bio")[1] == 7


def _claim_in_process(path: str, start: int, n: int, out) -> None:
    ledger = SlotLedger(Path(path))
    won = 0
    for i in range(start, start + n):
        try:
            ledger.claim(f"i-{i}", ALICE, "bio", HOST, max_per_user=None, max_per_group=9)
            won += 1
        except LimitExceeded:
            pass
    out.put(won)


def test_two_processes_sharing_the_ledger_cannot_overshoot(tmp_path: Path):
    path = str(tmp_path / "slots.sqlite")
    SlotLedger(Path(path)).close()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(path, k * 20, 20, out)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sum(out.get(timeout=5) for _ in procs) == 9
    assert SlotLedger(Path(path)).counts(ALICE, "bio") == (9, 9)


def test_claims_are_idempotent_per_instance(tmp_path: Path):
    ledger = SlotLedger(tmp_path / "slots.sqlite")
    slot, new = ledger.claim("i-1", ALICE, "bio", HOST, max_per_user=1, max_per_group=None, lifetime=60, now=1000)
    assert new and slot.expires == 1000 + 60 + 600
    again, new = ledger.claim("i-1", ALICE, "bio", "/O=Grid/OU=vmgrid/CN=host/node2", max_per_user=1,
                              max_per_group=None, lifetime=120, now=1010)
    assert not new and again.user_count == 1 and again.claimant.endswith("node2") and again.expires == 1010 + 720
    with pytest.raises(InvalidArgument, match="another subject"):
        ledger.claim("i-1", BOB, "bio", HOST, max_per_user=None, max_per_group=None, now=1020)


def test_slots_expire_after_their_lifetime_and_grace(tmp_path: Path):
    ledger = SlotLedger(tmp_path / "slots.sqlite")
    ledger.claim("i-1", ALICE, "bio", HOST, max_per_user=1, max_per_group=None, lifetime=10, grace=5, now=0)
    with pytest.raises(LimitExceeded):
        ledger.claim("i-2", ALICE, "bio", HOST, max_per_user=1, max_per_group=None, now=14)
    slot, new = ledger.claim("i-2", ALICE, "bio", HOST, max_per_user=1, max_per_group=None, now=16)
    assert new and slot.user_count == 1 and [s.instance for s in ledger.list(now=16)] == ["i-2"]


def test_release_and_reconcile(tmp_path: Path):
    ledger = SlotLedger(tmp_path / "slots.sqlite")
    for i in range(4):
        ledger.claim(f"i-{i}", ALICE, "bio", HOST if i < 3 else "/O=Grid/OU=vmgrid/CN=host/other",
                     max_per_user=None, max_per_group=None)
    released = ledger.release("i-0")
    assert released.instance == "i-0" and released.user_count == 3
    assert ledger.release("i-0") is None
    assert ledger.reconcile(HOST, ["i-1"]) == ["i-2"]          # node1 lost i-2; the other host's i-3 stays
    assert sorted(s.instance for s in ledger.list()) == ["i-1", "i-3"]


@pytest.fixture
def authority(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text(policy_text(groups={"bio": {"members": [ALICE, BOB], "admins": [CAROL],
                                                "limits": {"max_instances_per_group": 4}}},
                                limits={"max_lifetime": "1h", "max_memory": 1024, "max_vcpus": 2,
                                        "max_instances_per_user": 3, "max_instances_per_group": 50}))
    audit = AuditLog(tmp_path / "audit.log")
    a = PolicyAuthority(PolicyFile(path, audit=audit), SlotLedger(tmp_path / "slots.sqlite"), audit)
    yield a
    a.close()


IMAGE = {"type": "image", "vo": "bio", "owner": CAROL, "name": "emboss", "id": "img-1"}


def test_an_enforcer_claims_deployments_within_every_limit(authority):
    enforcer = Enforcer(LocalPolicyPoint(authority, HOST))
    ok, errors = race(20, lambda i: enforcer.claim(Subject(ALICE), f"a-{i}", IMAGE,
                                                   {"memory": "512", "vcpus": "1", "lifetime": "600"}))
    assert len(ok) == 3 and {e.limit for e in errors} == {"max_instances_per_user"}
    decision, slot = ok[0]
    assert decision.rule == "vo-members-use-images" and slot.group == "bio" and slot.counted
    enforcer.claim(Subject(BOB), "b-0", IMAGE, {"memory": "512"})
    with pytest.raises(LimitExceeded) as info:       # bio: 4 instances at most
        enforcer.claim(Subject(BOB), "b-1", IMAGE, {"memory": "512"})
    assert info.value.limit == "max_instances_per_group"
    assert enforcer.release("a-0" if any(s.instance == "a-0" for _, s in ok) else ok[0][1].instance)
    enforcer.claim(Subject(BOB), "b-1", IMAGE, {"memory": "512"})


@pytest.mark.parametrize("context, limit", [({"memory": "2048"}, "max_memory"), ({"vcpus": "4"}, "max_vcpus"),
                                            ({"lifetime": "7200"}, "max_lifetime")])
def test_requests_over_the_limits_take_no_slot(authority, context, limit):
    enforcer = Enforcer(LocalPolicyPoint(authority, HOST))
    with pytest.raises(LimitExceeded) as info:
        enforcer.claim(Subject(ALICE), "i-big", IMAGE, context)
    assert info.value.limit == limit and info.value.requested == next(iter(context.values()))
    assert authority.slots() == []
    refused = authority.audit.read(event="slot")[-1]
    assert refused["result"] == "refused" and refused["limit"] == limit


def test_denied_and_limited_deployments_take_no_slot(authority):
    enforcer = Enforcer(LocalPolicyPoint(authority, HOST))
    with pytest.raises(AccessDenied) as info:
        enforcer.claim(Subject("/O=Grid/OU=vmgrid/CN=stranger"), "i-x", IMAGE, {})
    assert info.value.rule == "default-deny"
    with pytest.raises(AccessDenied) as info:
        enforcer.claim(Subject(ALICE, limited=True), "i-y", IMAGE, {})
    assert info.value.rule == "limited-proxy-no-deploy"
    assert authority.slots() == []


def test_a_vo_admin_extending_an_instances_lifetime_renews_the_owners_slot(authority):
    enforcer = Enforcer(LocalPolicyPoint(authority, HOST))
    _, slot = enforcer.claim(Subject(ALICE), "i-1", IMAGE, {"lifetime": "600"})
    instance = {"type": "instance", "id": "i-1", "owner": ALICE, "vo": "bio", "node": "node1"}
    _, renewed = enforcer.claim(Subject(CAROL), "i-1", instance, {"lifetime": "3000"}, action="vm.set-lifetime")
    assert (renewed.subject, renewed.group, renewed.user_count) == (ALICE, "bio", 1)
    assert renewed.expires > slot.expires
    with pytest.raises(AccessDenied) as info:              # bob is neither the owner nor a VO admin
        enforcer.claim(Subject(BOB), "i-1", instance, {"lifetime": "3000"}, action="vm.set-lifetime")
    # ... and learns from the refusal nothing about the instance he did not name: not its owner, VO or node
    assert info.value.resource == "id=i-1,type=instance"
    assert "alice" not in str(info.value) and "vo=" not in str(info.value) and "node=" not in str(info.value), info.value
    with pytest.raises(AccessDenied) as info:              # the same check through the enforcer alone (no slot)
        enforcer.check(Subject(BOB), "vm.inspect", instance)
    assert info.value.resource == "id=i-1,type=instance"
    with pytest.raises(AccessDenied) as info:              # the owner, denied, is told the whole description
        enforcer.check(Subject(ALICE, limited=True), "vm.deploy", {**IMAGE, "owner": ALICE})
    assert f"owner={ALICE}" in info.value.resource
    with pytest.raises(LimitExceeded):
        enforcer.claim(Subject(ALICE), "i-1", instance, {"lifetime": "7200"}, action="vm.set-lifetime")
    with pytest.raises(InvalidArgument, match="another subject"):   # a deploy reusing a live instance id
        enforcer.claim(Subject(BOB), "i-1", IMAGE, {})


def test_a_claim_is_on_the_disk_before_it_returns_synced_outside_the_ledgers_lock_and_shared_by_claims_at_once(
        tmp_path: Path, monkeypatch):
    """The ledger commits with synchronous=NORMAL and syncs the WAL (services.sqlite.WalSync) after letting its lock
    go: a claim returns only after a sync that began after its commit; claims that commit while a sync is under way
    share the next one. A pass-through spy on os.fdatasync, with SQLite's trace of the ledger's commits."""
    import os
    import threading

    ledger = SlotLedger(tmp_path / "slots.sqlite")
    events: list[str] = []
    held = threading.Event()
    release = threading.Event()
    real = os.fdatasync

    def spy(fd):
        events.append(f"sync locked={ledger._lock.locked()}")
        if not held.is_set():          # the first sync waits until two more claims have committed and asked
            held.set()
            assert release.wait(10)
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    ledger._db.set_trace_callback(lambda sql: sql == "COMMIT" and events.append("commit"))
    first = threading.Thread(target=ledger.claim, args=("i-1", ALICE, "bio", HOST),
                             kwargs={"max_per_user": 5, "max_per_group": None})
    first.start()
    assert held.wait(10)
    assert events == ["commit", "sync locked=False"]            # committed, the lock let go, then the sync
    more = [threading.Thread(target=ledger.claim, args=(f"i-{i}", ALICE, "bio", HOST),
                             kwargs={"max_per_user": 5, "max_per_group": None}) for i in (2, 3)]
    for t in more:
        t.start()
    for _ in range(200):               # both committed (the lock is free during the sync) and wait for theirs
        if events.count("commit") == 3:
            break
        threading.Event().wait(0.01)
    assert events.count("commit") == 3 and all(t.is_alive() for t in more)   # not returned before a sync
    release.set()
    for t in [first, *more]:
        t.join(10)
    # the two later claims committed after the first sync began: one more sync covers both
    assert events == ["commit", "sync locked=False", "commit", "commit", "sync locked=False"]
    assert ledger.counts(ALICE, "bio") == (3, 3)
    assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 1     # NORMAL: the sync is the ledger's own
    ledger.close()
