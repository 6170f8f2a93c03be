"""Replay caches for WS-Security: the signed messages seen within the freshness window (wssec keys them by the
digest of their canonical SignedInfo), refused a second time.

`SQLiteReplayCache(state_dir)` is shared by every worker process of a container (SQLite WAL, one atomic upsert per
message); `MemoryReplayCache()` serves a single process. A full disk degrades the SQLite cache to its in-memory
window (it never fails a request for it). Both expose `first_seen(key, expires_at) -> bool`.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from services.sqlite import Database

log = logging.getLogger(__name__)


class ReplayCache(Protocol):
    def first_seen(self, key: bytes, expires_at: float) -> bool:
        """Record `key` until `expires_at` (UNIX time); False if it was already recorded and not yet expired."""


SEEN, FRESH, FULL = "seen", "fresh", "full"


class MemoryReplayCache:
    """A replay cache for one process, of at most `max_entries` live keys: full of live ones, it refuses what it
    cannot record (fail closed) and sweeps at most once a second (not once per message)."""

    def __init__(self, max_entries: int = 200_000):
        self._seen: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._max = max_entries
        self._next_sweep = 0.0
        self._next_full_sweep = 0.0

    def first_seen(self, key: bytes, expires_at: float) -> bool:
        return self.record(key, expires_at) == FRESH

    def record(self, key: bytes, expires_at: float) -> str:
        """SEEN (a replay), FRESH (recorded) or FULL (new, but no room to record it)."""
        now = time.time()
        with self._lock:
            if now >= self._next_sweep or (len(self._seen) >= self._max and now >= self._next_full_sweep):
                self._seen = {k: t for k, t in self._seen.items() if t > now}
                self._next_sweep, self._next_full_sweep = now + 10, now + 1
            old = self._seen.get(key)
            if old is not None and old > now:
                return SEEN
            if len(self._seen) >= self._max:
                return FULL
            self._seen[key] = expires_at
            return FRESH


class SQLiteReplayCache:
    """A replay cache in `<state_dir>/replay.sqlite`, safe across threads and processes (services.sqlite).

    Every key it accepts is also kept in an in-memory window, so when SQLite cannot write (a full disk) the cache
    degrades instead of failing: it still refuses every replay of a message this process accepted, and checks
    older ones against SQLite as long as SQLite can be read. Only what it cannot check is refused: started on a
    database it cannot read, it refuses messages an earlier process may have accepted (created before its start
    plus the clock skew: ``window`` is the longest horizon after Created, ``skew`` the clock skew). It tries
    SQLite again every ``retry`` seconds.
    """

    def __init__(self, state_dir: Path | str, filename: str = "replay.sqlite", *, window: float = 360.0,
                 skew: float = 60.0, retry: float = 5.0):
        self.path = Path(state_dir) / filename
        self.window, self.skew, self.retry = window, skew, retry
        self._memory = MemoryReplayCache()
        self._db = Database(self.path, synchronous="NORMAL", timeout=10)
        self._local = threading.local()
        self.degraded: str | None = None      # why SQLite is not written, while it is not
        self._retry_at = 0.0
        self._started = time.time()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._db.write("replay-schema") as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS seen (key BLOB PRIMARY KEY, expires REAL NOT NULL) "
                             "WITHOUT ROWID")
                conn.execute("CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires)")
        except (sqlite3.Error, OSError) as exc:
            self._degrade(exc)
            try:
                self._db.conn().execute("SELECT 1 FROM seen LIMIT 1").fetchall()
            except (sqlite3.Error, OSError):
                log.warning("replay cache %s cannot be read either: messages that may have been accepted before "
                            "this start are refused as uncheckable", self.path)

    def close(self) -> None:
        """Close every thread's connection (the container calls this when it stops)."""
        self._db.close()
        self._local = threading.local()

    def _degrade(self, exc: BaseException) -> None:
        if self.degraded is None:
            log.warning("replay cache %s cannot be written (%s): keeping the window in memory", self.path, exc)
        self.degraded = str(exc)
        self._retry_at = time.time() + self.retry

    def first_seen(self, key: bytes, expires_at: float) -> bool:
        now = time.time()
        state = self._memory.record(key, expires_at)
        if state == SEEN:
            return False
        # FULL: one busy signer filled the memory window (an authenticated client sending as fast as the service
        # verifies); SQLite records the key exactly, so nobody else is refused for it. Only when SQLite cannot be
        # written either is a key that neither can record refused (fail closed).
        if state == FULL and self.degraded is not None and now < self._retry_at:
            return False
        if self.degraded is not None and now < self._retry_at:
            return self._check_only(key, expires_at, now)
        try:
            fresh = self._record(key, expires_at, now)
        except (sqlite3.Error, OSError) as exc:
            self._degrade(exc)
            return state != FULL and self._check_only(key, expires_at, now)
        if self.degraded is not None:
            log.warning("replay cache %s is written again", self.path)
            self.degraded = None
        return fresh

    def _record(self, key: bytes, expires_at: float, now: float) -> bool:
        conn = self._db.conn()
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

    def _check_only(self, key: bytes, expires_at: float, now: float) -> bool:
        """Degraded: the memory window said fresh; is it in SQLite (recorded before the disk filled)?"""
        try:
            row = self._db.conn().execute("SELECT 1 FROM seen WHERE key = ? AND expires > ?", (key, now)).fetchone()
            return row is None
        except (sqlite3.Error, OSError):
            # this process's acceptances are in memory; an earlier process's are unreadable: refuse a message
            # it may have accepted (created >= expires_at - window; received before our start only if
            # created <= start + skew)
            return expires_at - self.window > self._started + self.skew

    def __len__(self) -> int:
        return self._db.conn().execute("SELECT count(*) FROM seen WHERE expires > ?", (time.time(),)).fetchone()[0]
