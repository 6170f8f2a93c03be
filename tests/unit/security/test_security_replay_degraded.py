"""The SQLite replay cache when its database cannot be written or read (a full disk): it keeps its window in
memory and refuses only what it cannot check."""
from __future__ import annotations

import time

from security.replay import SQLiteReplayCache


def test_a_replay_cache_that_cannot_open_its_database_refuses_only_what_it_cannot_check(tmp_path):
    (tmp_path / "replay.sqlite").mkdir()          # SQLite can neither read nor write it
    cache = SQLiteReplayCache(tmp_path, window=360, skew=0.5, retry=0)
    assert cache.degraded
    now = time.time()
    # created now: an earlier process may have accepted it (within the clock skew of this start)
    assert cache.first_seen(b"old", now + 360 - 0.1) is False
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
