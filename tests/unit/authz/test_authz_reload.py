"""Reloading the policy while running: a valid change takes effect (on a file change, a grid-mapfile
change, a wake-up as SIGHUP does, or on request); an invalid one is refused with where and why, and
the policy in force stays until the file is fixed."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from services.authz.audit import AuditLog, verify_chain
from services.authz.pep import Subject
from services.authz.policy import PolicyError
from services.authz.store import PolicyFile
from tests.unit.authz.authz_support import policy_text

ALICE, BOB = "/O=Grid/OU=vmgrid/CN=alice", "/O=Grid/OU=vmgrid/CN=bob"
IMAGE = {"type": "image", "vo": "bio", "owner": BOB}


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def rewrite(path: Path, text: str) -> None:
    """Write a new version whose stat differs even within one mtime tick."""
    path.write_text(text)


@pytest.fixture
def files(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text(policy_text(groups={"bio": {"members": [ALICE]}}))
    audit = AuditLog(tmp_path / "audit.log")
    pf = PolicyFile(path, audit=audit)
    yield pf, path, audit
    pf.stop()
    audit.close()


def reads(pf: PolicyFile, who: str) -> bool:
    return pf.current.decide(Subject(who), "image.read", IMAGE, {}).permit


def test_valid_change_takes_effect_and_invalid_is_refused(files):
    pf, path, audit = files
    assert reads(pf, ALICE) and not reads(pf, BOB)
    rewrite(path, policy_text(groups={"bio": {"members": [ALICE, BOB]}}))
    assert pf.reload() is True
    assert reads(pf, BOB)
    good = pf.current.version

    broken = policy_text(groups={"bio": {"members": [ALICE]}}) + '\n[[rule]]\nid = "oops"\neffect = "permit"\n' \
        'subjects = ["*"]\nactions = ["vm.deplyo"]\n'
    rewrite(path, broken)
    with pytest.raises(PolicyError) as info:
        pf.reload()
    err = info.value
    assert err.rule == "oops" and err.line == len(broken.splitlines()) - 4 and "vm.deplyo" in err.reason
    assert pf.current.version == good and reads(pf, BOB)          # the old policy stays in force
    status = pf.status()
    assert status.version == good and status.error is err
    records = audit.read(event="reload")
    assert records[-1]["result"] == "refused" and "vm.deplyo" in records[-1]["error"]

    rewrite(path, policy_text(groups={"bio": {"members": [ALICE]}}))
    assert pf.reload() is True and not reads(pf, BOB) and pf.status().error is None
    assert verify_chain(audit.path) == len(audit.read(limit=1000))


def test_the_watcher_picks_up_file_changes(files):
    pf, path, _ = files
    pf.start_watching(0.05)
    rewrite(path, policy_text(groups={"bio": {"members": [ALICE, BOB]}}))
    wait_for(lambda: reads(pf, BOB))
    rewrite(path, "this is [not toml")
    wait_for(lambda: pf.status().error is not None)
    assert reads(pf, BOB) and pf.status().error.line == 1
    rewrite(path, policy_text(groups={"bio": {"members": [ALICE]}}))
    wait_for(lambda: not reads(pf, BOB))


def test_a_wake_up_reloads_even_without_polling(files):
    pf, path, _ = files
    pf.start_watching(0)               # no polling: only SIGHUP (wake) or requests
    rewrite(path, policy_text(groups={"bio": {"members": [ALICE, BOB]}}))
    time.sleep(0.2)
    assert not reads(pf, BOB)
    pf.wake()
    wait_for(lambda: reads(pf, BOB))


def test_a_changed_gridmap_is_a_changed_policy(tmp_path: Path):
    gridmap = tmp_path / "bio.gridmap"
    gridmap.write_text(f'"{ALICE}" bio001\n')
    path = tmp_path / "policy.toml"
    path.write_text(policy_text(groups={"bio": {"gridmap": "bio.gridmap"}}))
    pf = PolicyFile(path)
    try:
        pf.start_watching(0.05)
        assert reads(pf, ALICE) and not reads(pf, BOB)
        gridmap.write_text(f'"{ALICE}" bio001\n"{BOB}" bio002\n')
        wait_for(lambda: reads(pf, BOB))
        gridmap.write_text('"/O=broken bio\n')
        wait_for(lambda: pf.status().error is not None)
        assert pf.status().error.file == str(gridmap) and reads(pf, BOB)
    finally:
        pf.stop()


def test_an_invalid_policy_at_start_is_an_error(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text('[[rule]]\nid = "x"\n')
    with pytest.raises(PolicyError, match="effect must be"):
        PolicyFile(path)


def test_audit_records_are_json_lines_chained(files):
    pf, path, audit = files
    rewrite(path, policy_text())
    pf.reload(by="/O=Grid/CN=admin")
    line = path.parent.joinpath("audit.log").read_text().splitlines()[-1]
    rec = json.loads(line)
    assert rec["event"] == "reload" and rec["by"] == "/O=Grid/CN=admin" and rec["policy"] == pf.current.version


def test_a_file_caught_half_written_is_not_taken_until_it_settles(files):
    """An editor or `cat >` rewrites the file in place: truncate, then write. A watcher poll between the two
    must not put the truncated file (which may even parse) in force; the finished file is taken once it has
    stayed the same for one poll. Polls are driven by hand here, so the interleaving is exact."""
    pf, path, _ = files
    version = pf.current.version
    half = policy_text(groups={"bio": {"members": [ALICE, BOB]}})
    path.write_text("")                                # truncated: what a poll can catch mid-write
    pf.poll()
    assert pf.current.version == version and pf.status().error is None
    path.write_text(half[: half.index("[[rule]]")])     # partly written: valid TOML, the rules missing
    pf.poll()
    assert pf.current.version == version
    path.write_text(half)                              # finished
    pf.poll()
    assert pf.current.version == version               # seen changing: not yet
    pf.poll()                                          # unchanged since the last poll: taken
    assert pf.current.version != version and reads(pf, BOB)


def test_an_empty_policy_file_is_refused_and_the_policy_in_force_stays(files, tmp_path: Path):
    pf, path, _ = files
    path.write_text("# nothing here yet\n\n")
    with pytest.raises(PolicyError, match="the policy file is empty"):
        pf.reload()
    assert reads(pf, ALICE) and "empty" in pf.status().error.reason
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(PolicyError, match="the policy file is empty"):
        PolicyFile(empty)


def test_a_change_made_right_after_the_file_is_read_is_still_seen(files, monkeypatch):
    """The file changes between the reload's read and the moment the new policy is in force (an admin writes
    again as soon as the first change shows): the watcher must still see the second change. The read is
    wrapped so the second write lands exactly there."""
    import services.authz.store as store
    pf, path, _ = files
    real = store.load_policy

    def read_then_someone_writes(p):
        policy = real(p)
        rewrite(path, policy_text(groups={"bio": {"members": [ALICE]}}) + "\n# second change\n")
        return policy

    rewrite(path, policy_text(groups={"bio": {"members": [ALICE, BOB]}}))
    monkeypatch.setattr(store, "load_policy", read_then_someone_writes)
    assert pf.reload() is True and reads(pf, BOB)
    monkeypatch.setattr(store, "load_policy", real)
    pf.poll()
    pf.poll()                                           # settled: taken
    assert not reads(pf, BOB)
