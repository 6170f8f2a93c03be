"""A sweep's cost does not grow with the jobs that have ended (attack15: with 100,000 ended records each sweep read
every one of them, listed them all to be counted again and looked each directory up by its own query, about 1 s a
sweep): the real job service's core with real jobs, then thousands of ended records as a day of them leaves, and the
SQLite work of one sweep (statements issued, virtual machine steps: what SQLite reads) counted before and after."""
from __future__ import annotations

import json
import os
import time

import pytest

from services.jobs import manager as manager_module
from services.jobs import store as store_module
from services.jobs.store import JobSpec
from tests.unit.jobs.test_manager import OWNER, PY, manager, shut, wait_final, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")
ENDED = 3000


class Work:
    """What one sweep asks of SQLite on the sweeping thread's connection: the statements, the VM steps (each row
    SQLite reads costs some), and the job records turned into Jobs."""

    def __init__(self, m, monkeypatch):
        self.m, self.monkeypatch = m, monkeypatch

    def __call__(self) -> tuple[int, int, int]:
        statements, steps, records = [], [0], [0]
        original = store_module._row

        def row(r):
            records[0] += 1
            return original(r)

        def step():
            steps[0] += 1
            return 0

        conn = self.m.store.db.conn()
        conn.set_trace_callback(statements.append)
        conn.set_progress_handler(step, 1)
        self.monkeypatch.setattr(store_module, "_row", row)
        try:
            self.m._recount_rest = 0.0            # the recount's rest after a round is time: not this test's
            self.m.sweep()
        finally:
            conn.set_trace_callback(None)
            conn.set_progress_handler(None, 1)
            self.monkeypatch.setattr(store_module, "_row", original)
        return len(statements), steps[0], records[0]


def add_ended(m, n: int) -> None:
    """``n`` ended jobs of the owner as the service leaves them (their records, each with its directory and control
    directory), written at once; due to be counted again, as a version before the running totals leaves them."""
    spec = JobSpec("true").to_json()
    with m.store.db.write("test") as db:
        for i in range(n):
            key = f"job-{i:032x}"
            db.execute("INSERT INTO jobs (key, owner, state, spec, submitted, termination, started, ended, exit_code, "
                       "outputs) VALUES (?, ?, 'Done', ?, 1.0, 4e9, 2.0, 3.0, 0, ?)",
                       (key, OWNER, spec, json.dumps([["stdout", 0, "0" * 64, None]])))
            (m.jobs_dir / key).mkdir(mode=0o700)
            (m.jobs_dir / key / "stdout").write_bytes(b"x" * 5000)
            (m.control_dir / key).mkdir(mode=0o700)
            if hasattr(m, "_known"):
                m._known.add(key)                 # as a restart finds them
        if "recount_at" in {r[1] for r in db.execute("PRAGMA table_info(jobs)")}:
            db.execute("UPDATE jobs SET recount_at = 0 WHERE recount_at IS NULL AND state = 'Done'")


def test_a_sweep_reads_no_ended_jobs_records_however_many_have_ended(tmp_path, monkeypatch):
    """Before: with 3000 more ended jobs a sweep issued over 6000 more statements (one lookup per directory of jobs/
    and control/) and turned 6000 more records into jobs (every record, twice: the recount and the submitter's
    total). Now the same statements, the same SQLite steps within a few, and no ended record read; the ended jobs'
    directories are still counted again (as they fall due) and still count against their submitter's quota."""
    monkeypatch.setattr(manager_module, "RECOUNT_BATCH", 10 * ENDED, raising=False)   # the backlog in one round
    m = manager(tmp_path / "state", sweep_interval=3600.0)          # the test sweeps: its sweeper waits an hour
    try:
        for _ in range(3):
            wait_final(m, m.submit(OWNER, JobSpec(PY, ("-c", "print('x' * 3000)"))).key)
        running = m.submit(OWNER, JobSpec(PY, ("-c", "import time; print('up', flush=True); time.sleep(300)")))
        out = m.jobs_dir / running.key / "stdout"      # its program runs: its cgroups are made (the sweep asks)
        wait_until(lambda: running.key in m._procs and out.exists() and "up" in out.read_text())
        work = Work(m, monkeypatch)
        work()                                    # the first sweep (the running job counted)
        few = work()
        assert few[2] <= 1                        # the running job's record at most (its quota), none ended

        add_ended(m, ENDED)
        work()                                    # the backlog: each ended directory counted again once
        many = work()
        assert many[0] == few[0], (few, many)                 # statements issued
        assert many[2] == few[2], (few, many)                 # job records read
        assert many[1] <= few[1] + 50, (few, many)            # SQLite's steps: an index search, not a scan
        assert m.store.due_recounts(time.time(), 10) == []   # each was counted again, and is not due again yet
        assert m.store.ended_held(OWNER) >= ENDED * 5000      # and counts against her quota
        assert m.submitter_bytes(OWNER) >= ENDED * 5000
    finally:
        shut(m)
