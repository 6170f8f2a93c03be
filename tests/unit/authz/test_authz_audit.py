"""The audit log is append-only and tamper-evident: every record chains to the one before; a record
altered, removed or inserted is found; reopening continues the chain."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.authz.audit import GENESIS, AuditError, AuditLog, verify_chain


def test_records_chain_and_survive_reopening(tmp_path: Path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    first = log.record("decision", by="/O=Grid/CN=host/a", subject="/O=Grid/CN=alice", action="vm.deploy",
                       decision="permit", rule="r1")
    assert first["prev"] == GENESIS and first["seq"] == 1
    log.record("decision", subject="/O=Grid/CN=bob", decision="deny", rule="default-deny")
    log.close()
    log = AuditLog(path)
    third = log.record("admin", by="/O=Grid/CN=admin", operation="AddRule")
    assert third["seq"] == 3
    log.close()
    assert verify_chain(path) == 3
    assert [r["subject"] for r in AuditLog(path).read(event="decision")] == ["/O=Grid/CN=alice", "/O=Grid/CN=bob"]


@pytest.mark.parametrize("tamper", ["alter", "remove", "insert"])
def test_tampering_is_detected(tmp_path: Path, tamper):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(4):
        log.record("decision", subject=f"/O=Grid/CN=u{i}", decision="deny", rule="default-deny")
    log.close()
    lines = path.read_text().splitlines()
    if tamper == "alter":
        rec = json.loads(lines[1])
        rec["decision"] = "permit"
        lines[1] = json.dumps(rec, separators=(",", ":"))
    elif tamper == "remove":
        del lines[1]
    else:
        lines.insert(2, lines[1])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditError) as info:
        verify_chain(path)
    assert info.value.line in (2, 3)


def test_a_record_cut_short_by_a_crash_is_kept_and_reported(tmp_path: Path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record("decision", subject="/O=Grid/CN=a")
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"time":"2026-01-01T00:00:00Z","seq":2,"ev')
    log = AuditLog(path)
    log.record("decision", subject="/O=Grid/CN=b")
    log.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and lines[1].startswith(b'{"time"') and json.loads(lines[2])["subject"] == "/O=Grid/CN=b"
    with pytest.raises(AuditError, match="cut short"):
        verify_chain(path)


def test_read_filters_and_limits(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.log")
    for i in range(30):
        log.record("decision", subject=f"/O=Grid/CN=u{i % 3}", by="/O=Grid/CN=host/h")
    assert len(log.read(limit=10)) == 10 and log.read(limit=10)[-1]["seq"] == 30
    assert {r["subject"] for r in log.read(subject="/O=Grid/CN=u1", limit=100)} == {"/O=Grid/CN=u1"}
    assert len(log.read(subject="/O=Grid/CN=host/h", limit=100)) == 30
    log.close()


def test_counted_refusals_are_written_when_their_window_ends_with_each_reason(tmp_path: Path):
    """Attack H5: the count of an identity's refusals waited for that identity to be refused the same call again
    after the window (or a clean stop), so a burst that then stopped was one record, and after a SIGKILL nothing
    more. The recorder's timer now writes each count when its window ends, with how many for each reason (the
    first few distinct reasons by name, the rest together)."""
    import time

    from services.authz.audit import RefusalRecorder

    log = AuditLog(tmp_path / "audit.log")
    now = [100.0]
    refusals = RefusalRecorder(log, window=60, tick=0.05, max_reasons=2, clock=lambda: now[0])
    try:
        for why in ["not an enforcement point"] * 5 + ["a limited proxy"] * 2 + ["about bob", "about carol"]:
            refusals.refused("/O=Grid/CN=mallory", "Authorize", why)
        first = log.read(event="access")
        assert [r.get("repeated") for r in first] == [None]             # counted, not written one by one
        now[0] += 61                                                      # the window ends: nobody calls again
        deadline = time.monotonic() + 60
        while len(log.read(event="access")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        count = log.read(event="access")[1]
        assert (count["repeated"], count["since"]) == (8, first[0]["seq"])
        assert count["reasons"] == {"not an enforcement point": 4, "a limited proxy": 2}
        assert count["others"] == 2 and "2 x for other reasons" in count["reason"]
    finally:
        refusals.close()
    assert len(log.read(event="access")) == 2                             # nothing counted twice at close
    log.close()
    assert verify_chain(tmp_path / "audit.log") == 2
