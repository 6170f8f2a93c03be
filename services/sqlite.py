"""SQLite as the services use it: one database file in WAL mode, a connection per thread (all of
them let go by ``close``), and write transactions that take SQLite's write lock up front."""
from __future__ import annotations

import itertools
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
        """Let go of every thread's connection: this thread's is closed now, each other one as soon as no thread
        holds it, which is at once for an idle one (its last references are dropped here) and when its query ends
        for one another thread is using. Closing that one from here, under its running query, crashed the process
        (a job's watcher thread reading its record while the service stopped: SIGSEGV in sqlite3)."""
        with self._lock:
            conns, self._all = self._all, []
        mine = getattr(self._local, "db", None)
        self._local = threading.local()          # each thread's reference to its connection goes with the old one
        del conns
        if mine is not None:
            try:
                mine.close()
            except sqlite3.Error:
                pass


class WalSync:
    """Makes a WAL database's commits durable after the fact: an ``fdatasync`` of its ``-wal`` file, which is what a
    commit with ``synchronous=FULL`` does at the commit, for every commit written before it. For commits made with
    ``synchronous=NORMAL`` (in WAL mode already in the WAL file, read by every connection and kept when the process is
    killed; on the disk once the file is synced), synced outside the write lock before the caller answers anyone.
    Threads that ask at once share one sync (group commit): a sync covers every commit finished before it began."""

    def __init__(self, path: Path):
        self.wal = f"{path}-wal"
        self._lock = threading.Lock()
        self._tickets = itertools.count(1)
        self._done = 0

    def sync(self) -> None:
        """Every commit this thread has finished is on the disk when this returns."""
        ticket = next(self._tickets)          # taken after the caller's commits
        with self._lock:
            if self._done >= ticket:          # a sync that began after that ticket has covered them
                return
            upto = next(self._tickets)        # every ticket below was taken before this sync begins
            try:
                fd = os.open(self.wal, os.O_RDONLY)
            except FileNotFoundError:         # no WAL file: every commit is in the database file, synced by the
                fd = -1                       # checkpoint that removed it
            if fd >= 0:
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            self._done = upto
