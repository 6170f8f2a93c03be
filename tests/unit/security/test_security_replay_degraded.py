"""The SQLite replay cache when its database cannot be written or read (a full disk): it keeps its window in
memory and refuses only what it cannot check."""
from __future__ import annotations

import time

from security.replay import SQLiteReplayCache


def test_a_replay_cache_that_cannot_open_its_database_refuses_only_what_it_cannot_check(tmp_path):
    (tmp_path / "replay.sqlite").mkdir()          # SQLite can neither read nor write it
    cache = SQLiteReplayCache(tmp_path, window=360, skew=0.5, retry=0)
    assert cache.degraded
    # created at this start: an earlier process may have accepted it (within the clock skew of this start; the
    # start's own time, not the test's now, which a loaded machine may put past the skew)
    assert cache.first_seen(b"old", cache._started + 360 - 0.1) is False
    # created after this start plus the skew: no earlier process can have seen it; accepted once
    later = cache._started + 1 + 360
    assert cache.first_seen(b"new", later) is True
    assert cache.first_seen(b"new", later) is False


def test_a_replay_cache_refuses_a_replay_after_it_lost_its_database(tmp_path):
    cache = SQLiteReplayCache(tmp_path, retry=0)
    assert cache.first_seen(b"a", time.time() + 60) is True
    cache.close()
    db = tmp_path / "replay.sqlite"
    for p in tmp_path.iterdir():
        p.unlink()
    db.mkdir()                                    # the database is gone and cannot come back
    cache.first_seen(b"b", time.time() + 60)
    assert cache.degraded
    assert cache.first_seen(b"a", time.time() + 60) is False   # the memory window still knows it


def test_a_full_memory_window_does_not_lock_everyone_out(tmp_path):
    """One authenticated client signing as fast as the service verifies fills the memory window (200,000 keys);
    the memory layer then refused every new message of everyone, as replays, until keys expired. SQLite still
    records exactly: a new message is accepted, a replay of any (in memory or not) refused. Fails without: the
    new message was refused."""
    cache = SQLiteReplayCache(tmp_path, retry=0)
    cache._memory._max = 10
    horizon = time.time() + 60
    for n in range(10):
        assert cache.first_seen(b"flood-%d" % n, horizon) is True
    assert cache.first_seen(b"someone-else", horizon) is True           # not in memory: recorded in SQLite
    assert cache.first_seen(b"someone-else", horizon) is False          # and its replay refused there
    assert cache.first_seen(b"flood-3", horizon) is False


def test_a_full_memory_window_refuses_what_a_broken_database_cannot_record(tmp_path):
    (tmp_path / "replay.sqlite").mkdir()          # SQLite can neither read nor write it
    cache = SQLiteReplayCache(tmp_path, window=360, skew=0.5, retry=0)
    cache._memory._max = 1
    later = cache._started + 1 + 360
    assert cache.first_seen(b"first", later) is True
    assert cache.first_seen(b"second", later) is False                  # neither layer can record it
