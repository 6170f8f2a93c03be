"""Replay caches for WS-Security: the signatures seen within the freshness window, refused a second time.

`SQLiteReplayCache(state_dir)` is shared by every worker process of a container (SQLite WAL, one atomic upsert per
message); `MemoryReplayCache()` serves a single process. Both expose `first_seen(key, expires_at) -> bool`.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Protocol

from services.sqlite import Database


class ReplayCache(Protocol):
    def first_seen(self, key: bytes, expires_at: float) -> bool:
        """Record `key` until `expires_at` (UNIX time); False if it was already recorded and not yet expired."""


class MemoryReplayCache:
    """A replay cache for one process."""

    def __init__(self, max_entries: int = 200_000):
        self._seen: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._max = max_entries
        self._next_sweep = 0.0

    def first_seen(self, key: bytes, expires_at: float) -> bool:
        now = time.time()
        with self._lock:
            if now >= self._next_sweep or len(self._seen) >= self._max:
                self._seen = {k: t for k, t in self._seen.items() if t > now}
                self._next_sweep = now + 10
            old = self._seen.get(key)
            if old is not None and old > now:
                return False
            if len(self._seen) >= self._max:
                # Full of live entries: refuse rather than forget (fail closed).
                return False
            self._seen[key] = expires_at
            return True


class SQLiteReplayCache:
    """A replay cache in `<state_dir>/replay.sqlite`, safe across threads and processes (services.sqlite)."""

    def __init__(self, state_dir: Path | str, filename: str = "replay.sqlite"):
        self.path = Path(state_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Database(self.path, synchronous="NORMAL", timeout=10)
        self._local = threading.local()
        with self._db.write("replay-schema") as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS seen (key BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID")
            conn.execute("CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires)")

    def close(self) -> None:
        """Close every thread's connection (the container calls this when it stops)."""
        self._db.close()
        self._local = threading.local()

    def first_seen(self, key: bytes, expires_at: float) -> bool:
        conn = self._db.conn()
        now = time.time()
        cur = conn.execute(
            "INSERT INTO seen (key, expires) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET expires = excluded.expires WHERE seen.expires <= ?",
            (key, expires_at, now))
        fresh = cur.rowcount == 1
        count = getattr(self._local, "count", 0) + 1
        self._local.count = count
        if count % 500 == 0:
            conn.execute("DELETE FROM seen WHERE expires <= ?", (now,))
        return fresh

    def __len__(self) -> int:
        return self._db.conn().execute("SELECT count(*) FROM seen WHERE expires > ?", (time.time(),)).fetchone()[0]
