"""A job's uid is looked up in the system's name services (services/jobs/uids.py account_holding: getpwuid,
getgrgid, which LDAP or SSSD answer as slowly as their server) with the job store's write lock free: a slow answer
for one job's uid holds no other caller of the service, in a real container on loopback (HTTPS, WS-Security both
ways), and two jobs still never share a uid."""
from __future__ import annotations

import threading

import pytest

from services.jobs import uids, wire
from services.jobs.store import JobSpec
from tests.integration.test_jobs_service import PY, JobGrid

pytestmark = pytest.mark.timeout(300)
UID = JobSpec(PY, ("-c", "import os; print(os.getuid())"))


def test_a_slow_account_lookup_holds_no_other_submit_or_listing(grid_pki, tmp_path, monkeypatch):
    """The lookup ran inside the store's write transaction (JobStore.take_uid), so a slow LDAP or SSSD answer held
    the write lock for everyone: another SubmitJob waited for it (and failed, `database is locked`, after SQLite's
    30 s). The real lookup is made slow here (a stand-in for a slow name service: its first call, for alice's first
    job, waits before asking until the test lets it go, at most 90 s). Meanwhile a second job is submitted, listed,
    given a uid and run to its end; then the first lookup answers: the first job finds the uid it was looking up
    taken meanwhile and takes the next one. Without the fix the second submit did not come back while the lookup
    waited (the lookup gave up waiting: `released` False)."""
    real, gate = uids.account_holding, threading.Lock()
    stalled, go, released = threading.Event(), threading.Event(), []
    asked = []

    def slow_lookup(uid: int) -> str | None:
        asked.append(uid)
        if gate.acquire(blocking=False):          # the first lookup only: the others answer at once
            stalled.set()
            released.append(go.wait(90))
        return real(uid)

    monkeypatch.setattr(uids, "account_holding", slow_lookup)
    grid = JobGrid(grid_pki, tmp_path)
    try:
        alice, admin = grid.client(grid_pki.alice), grid.client(grid_pki.admin)
        first = alice.submit(UID)
        assert stalled.wait(60), "the first job's uid lookup never came"
        second = admin.submit(UID)                           # not held by the pending lookup
        assert {j.findtext(f".//{wire.KEY_TAG}") for j in alice.list()} == {first, second}     # nor a listing
        done = admin.wait(second, timeout=120)                # it even ran, under a uid of its own
        assert (done.state, done.failure) == ("Done", None)
        assert alice.status(first).state in ("Pending", "StageIn")      # still waiting for its lookup
        go.set()
        info = alice.wait(first, timeout=120)
        assert released == [True]
        assert (info.state, info.failure) == ("Done", None)
        first_uid, second_uid = int(info.stdout_tail), int(done.stdout_tail)
        assert second_uid == 900000 and first_uid == 900001      # the one it looked up was taken meanwhile
        assert asked[0] == 900000 and asked.count(900001) == 1
        store = grid.service.jobs.store                           # 900000 stays the admin's, as any uid its first
        assert (store.uids_of(grid_pki.admin.dn), store.uids_of(grid_pki.alice.dn)) == ([900000], [900001])
    finally:
        go.set()
        grid.close()
