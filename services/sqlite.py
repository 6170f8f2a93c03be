"""SQLite as the services use it: one database file in WAL mode, a connection per thread (all of
them closed by ``close``), and write transactions that take SQLite's write lock up front."""
from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class Database:
    def __init__(self, path: Path, *, on_connect: Callable[[sqlite3.Connection], None] | None = None,
                 before_commit: Callable[[str], None] | None = None, synchronous: str = "FULL",
                 timeout: float = 30):
        self.path = Path(path)
        self.synchronous = synchronous
        self.timeout = timeout
        self._on_connect = on_connect
        self._before_commit = before_commit
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (autocommit mode: transactions are explicit); a forked child opens its own."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
            if self._on_connect:
                self._on_connect(db)
            self._local.db, self._local.pid = db, os.getpid()
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def write(self, name: str = "write") -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: the write lock, across processes too)."""
        db = self.conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            if self._before_commit:
                self._before_commit(name)
            db.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            conns, self._all = self._all, []
        for db in conns:
            try:
                db.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
