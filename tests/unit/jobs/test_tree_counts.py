"""How often job directories are counted (services/jobs/tree.py Counts; attack14 H1, H3 (2)): one directory whose
count is expensive is counted less often, never every job's with it (another job's quota is enforced at the next
sweep); an ended job's directory and a trash entry are counted again now and then (a job of the same submitter may
write into a file there it opened before), so the submitter's quota stays true. A fake clock: each count of the
expensive directory takes 5 s of it."""
from __future__ import annotations

import os
import time

import pytest

from services.jobs import manager as manager_module
from services.jobs import tree
from services.jobs.store import JobSpec, JobState
from tests.unit.jobs.test_manager import OWNER, PY, manager, shut, wait_final, wait_until


class Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:              # the job service's wall clock (when an ended directory is due again)
        return 1.7e9 + self.now

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture
def clock(monkeypatch):
    """tree's clock (Counts made after this use it) and the job service's, and count_tree taking 5 s of it for a directory 'expensive'
    names (a file of that name at its top)."""
    c = Clock()
    monkeypatch.setattr(tree, "time", c)
    monkeypatch.setattr(manager_module, "time", c)
    real = tree.count_tree

    def count_tree(top, max_files, *args):
        if os.path.exists(os.path.join(top, "expensive")):
            c.now += 5.0
        return real(top, max_files, *args)

    monkeypatch.setattr(tree, "count_tree", count_tree)
    return c


def test_an_expensive_count_leaves_the_other_directories_counted_every_sweep(tmp_path, clock):
    for name in ("big", "small"):
        (tmp_path / name).mkdir()
    (tmp_path / "big" / "expensive").touch()
    counts = tree.Counts(1000, 1.0)
    tops = {name: tmp_path / name for name in ("big", "small")}
    counted = {"big": [], "small": []}
    for sweep in range(60):
        clock.now += 1.0
        for name in counts.refresh(tops):
            counted[name].append(sweep)
    # from the second sweep on (the first one's round ended with big's count, unknown until then), every sweep
    # (attack14: about every 20 s, whenever the rest after big's count ended)
    assert counted["small"] == list(range(1, 60)), counted
    assert 2 <= len(counted["big"]) <= 4, counted                  # every ~50 s: 5 s each, a tenth of one core


def test_the_periods_share_a_tenth_of_one_core_cheap_directories_first():
    got = tree.periods({"cheap": (0.001, 1.0), "big": (2.0, 1.0), "ended": (0.5, 30.0)})
    assert got["cheap"] == 1.0 and got["ended"] == 30.0
    assert sum(cost / got[n] for n, cost in (("cheap", 0.001), ("big", 2.0), ("ended", 0.5))) == pytest.approx(0.1)
    got = tree.periods({"a": (2.0, 1.0), "b": (2.0, 1.0)})
    assert got == {"a": 40.0, "b": 40.0}


SLEEP = ("import time; open('ready', 'w').close(); time.sleep(300)",)


def test_another_jobs_quota_is_enforced_at_the_next_sweep_while_one_jobs_count_is_expensive(tmp_path, clock):
    """attack14 H3 (2): job X's directory takes 5 s to count; job Y grows past its quota after both were counted:
    the very next sweep kills Y (the sweeps rested 45 s for every job after X's count)."""
    m = manager(tmp_path / "state", staging_quota=1000000, sweep_interval=3600)      # the test sweeps
    try:
        m.counts = tree.Counts(m.config.max_files, 1.0)
        x = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", *SLEEP)))
        y = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", *SLEEP)))
        wait_until(lambda: (m.jobs_dir / x.key / "ready").exists() and (m.jobs_dir / y.key / "ready").exists())
        (m.jobs_dir / x.key / "expensive").touch()
        for _ in range(2):                  # each counted once at least
            clock.now += 1.0
            m.check_quotas()
        assert not m._over_quota
        with open(m.jobs_dir / y.key / "big", "wb") as f:
            f.truncate(2000000)
        clock.now += 1.0
        m.check_quotas()
        assert y.key in m._over_quota and x.key not in m._over_quota
        done = wait_final(m, y.key)
        assert done.state == JobState.FAILED and done.failure.startswith("the job's directory grew to 2")
    finally:
        shut(m)


def test_an_ended_jobs_directory_and_a_trash_entry_are_counted_again_now_and_then(tmp_path, clock, held_removal):
    """attack14 H1: what comes into an ended job's directory after its end (a job of the same submitter writing into
    a file it opened before) counts for her within ENDED_EVERY sweeps, and so does what comes into its directory
    in the trash before it is removed (an ended job's was counted once, a trash entry's too)."""
    release = held_removal
    m = manager(tmp_path / "state", sweep_interval=3600)
    try:
        m.counts = tree.Counts(m.config.max_files, 1.0)
        job = m.submit(OWNER, JobSpec(executable=PY, arguments=("-c", "open('out', 'wb').write(b'x' * 100000)")))
        assert wait_final(m, job.key).state == JobState.DONE
        before = m.submitter_bytes(OWNER)
        assert 100000 <= before < 200000
        with open(m.jobs_dir / job.key / "late", "wb") as f:       # as through a file held open
            f.write(b"y" * 1048576)
        clock.now += 1.0
        m.check_quotas()
        assert m.submitter_bytes(OWNER) == before                  # not due yet: a low rate
        clock.now += tree.ENDED_EVERY
        m.check_quotas()
        assert m.submitter_bytes(OWNER) == before + 1048576
        m.destroy(OWNER, job.key)
        (entry,) = [p for p in m.trash.path.iterdir() if not p.name.endswith(".control")]
        moved = m.submitter_bytes(OWNER)                           # its control directory's entries too
        assert moved >= before + 1048576
        with open(entry / "later", "wb") as f:
            f.write(b"z" * 2097152)
        clock.now += tree.ENDED_EVERY + 1.0
        m.check_quotas()
        assert m.submitter_bytes(OWNER) == moved + 2097152
        release.set()
        wait_until(lambda: not os.listdir(m.trash.path))
        assert m.submitter_bytes(OWNER) == 0
    finally:
        release.set()
        shut(m)
