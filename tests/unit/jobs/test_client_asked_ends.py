"""The ends the user asked for her jobs, kept where the client runs (services/jobs/client.py remember_end): what a
`vmgrid job refresh-proxy` lends at most, whatever the job's service says of its end (attack15). Real files under a
temporary $XDG_CACHE_HOME."""
from __future__ import annotations

import time

from services.jobs.client import NO_RECORD, asked_end, asked_ends_dir, forget_end, remember_end

URL = "https://vm.example.org:8443/wsrf/services/JobService"


def test_an_end_is_kept_per_service_and_job_and_forgotten(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    end = time.time() + 3600
    remember_end(URL, "job-1", end)
    remember_end(URL, "job-2", None)
    assert asked_ends_dir() == tmp_path / "vmgrid" / "jobs"
    assert asked_end(URL, "job-1") == end and asked_end(URL, "job-2") is None
    assert asked_end(URL, "job-3") is NO_RECORD
    assert asked_end(URL.replace("vm.", "other."), "job-1") is NO_RECORD       # another service's job of that key
    forget_end(URL, "job-1")
    assert asked_end(URL, "job-1") is NO_RECORD


def test_records_go_a_day_after_their_end_or_a_month_after_without_one(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    remember_end(URL, "ended", time.time() - 2 * 86400)        # its job is long gone
    remember_end(URL, "recent", time.time() - 3600)            # ended an hour ago: kept a day
    remember_end(URL, "default", None)
    old = next(p for p in asked_ends_dir().glob("*.json") if '"job": "default"' in p.read_text())
    os.utime(old, (time.time() - 1, time.time() - 1))          # as if written 31 days ago
    remember_end(URL, "new", None)                             # each write drops what may go
    assert [asked_end(URL, k) is NO_RECORD for k in ("ended", "recent", "default", "new")] == [True, False, True,
                                                                                              False]
