"""Instance slots: the Authorization service's count of running instances per subject and per VO
group, so the concurrent-instance limits hold however many deployments arrive at once. SQLite (WAL)
in the service's state directory; every claim is one IMMEDIATE transaction (count, compare, insert)."""
from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from services.authz.pep import Slot
from services.faults import InvalidArgument, LimitExceeded
from services.sqlite import WalSync

SCHEMA = """
CREATE TABLE IF NOT EXISTS slots (
    instance TEXT PRIMARY KEY,
    subject  TEXT NOT NULL,
    grp      TEXT,
    claimant TEXT NOT NULL,
    claimed  REAL NOT NULL,
    expires  REAL
);
CREATE INDEX IF NOT EXISTS slots_subject ON slots(subject);
CREATE INDEX IF NOT EXISTS slots_grp ON slots(grp);
CREATE INDEX IF NOT EXISTS slots_claimant ON slots(claimant);
CREATE INDEX IF NOT EXISTS slots_expires ON slots(expires);   -- every claim drops the expired first
"""


class NotTheClaimant(Exception):
    """A release asked for by another service than the slot's claimant (:meth:`SlotLedger.release`)."""

    def __init__(self, claimant: str):
        super().__init__(claimant)
        self.claimant = claimant


class SlotLedger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # a commit is in the WAL file at once (NORMAL) and on the disk before the caller answers: synced by _tx after
        # the ledger's lock is let go, so the next claim does not wait through this one's fsync, and claims that
        # commit at once share one (WalSync)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._wal = WalSync(self.path)
        self._db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the ledger's lock; committed, it is on the disk before this returns."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        self._wal.sync()

    def _counts(self, db: sqlite3.Connection, subject: str, group: str | None) -> tuple[int, int | None]:
        users = db.execute("SELECT COUNT(*) FROM slots WHERE subject = ?", (subject,)).fetchone()[0]
        groups = db.execute("SELECT COUNT(*) FROM slots WHERE grp = ?", (group,)).fetchone()[0] if group else None
        return users, groups

    def claim(self, instance: str, subject: str, group: str | None, claimant: str, *,
              max_per_user: int | None, max_per_group: int | None, lifetime: int | None = None,
              grace: int = 600, now: float | None = None, renew_any: bool = False) -> tuple[Slot, bool]:
        """Count ``instance`` for ``subject`` (and ``group``) unless that would pass a limit (LimitExceeded).
        Returns the slot and whether it is new. An instance that has a slot already is renewed (new expiry,
        new claimant: a migration's target node) when the subject is the same, or with ``renew_any`` (an
        authorized operation on an existing instance, e.g. a VO admin extending its lifetime); its subject
        and group stay."""
        now = time.time() if now is None else now
        expires = now + lifetime + grace if lifetime else None
        with self._tx() as db:
            db.execute("DELETE FROM slots WHERE expires IS NOT NULL AND expires < ?", (now,))
            row = db.execute("SELECT subject, grp, claimed FROM slots WHERE instance = ?", (instance,)).fetchone()
            if row is not None:
                if row[0] != subject and not renew_any:
                    raise InvalidArgument(f"instance {instance} already holds a slot for another subject",
                                          argument="instance")
                db.execute("UPDATE slots SET claimant = ?, expires = ? WHERE instance = ?",
                           (claimant, expires, instance))
                users, groups = self._counts(db, row[0], row[1])
                return Slot(instance, row[0], row[1], claimant, row[2], expires, users, groups), False
            users, groups = self._counts(db, subject, group)
            if max_per_user is not None and users + 1 > max_per_user:
                raise LimitExceeded(f"{subject} already runs {users} instance(s); the limit is {max_per_user}",
                                    limit="max_instances_per_user", allowed=str(max_per_user),
                                    requested=str(users + 1))
            if group and max_per_group is not None and groups + 1 > max_per_group:
                raise LimitExceeded(f"group {group} already runs {groups} instance(s); the limit is {max_per_group}",
                                    limit="max_instances_per_group", allowed=str(max_per_group),
                                    requested=str(groups + 1))
            db.execute("INSERT INTO slots(instance, subject, grp, claimant, claimed, expires) VALUES (?,?,?,?,?,?)",
                       (instance, subject, group, claimant, now, expires))
            return Slot(instance, subject, group, claimant, now, expires, users + 1,
                        groups + 1 if group else None), True

    def release(self, instance: str, holder: Callable[[str], bool] | None = None) -> Slot | None:
        """Free the instance's slot; None when it had none. With ``holder``, only a slot whose claimant it accepts:
        another's raises :class:`NotTheClaimant` and stays."""
        with self._tx() as db:
            row = db.execute("SELECT instance, subject, grp, claimant, claimed, expires FROM slots WHERE instance = ?",
                             (instance,)).fetchone()
            if row is None:
                return None
            if holder is not None and not holder(row[3]):
                raise NotTheClaimant(row[3])
            db.execute("DELETE FROM slots WHERE instance = ?", (instance,))
            users, groups = self._counts(db, row[1], row[2])
            return Slot(*row, users, groups)

    def reconcile(self, claimant: str, instances: list[str]) -> list[str]:
        """Free the claimant's slots of instances it no longer has; the freed instance ids."""
        keep = set(instances)
        with self._tx() as db:
            rows = [r[0] for r in db.execute("SELECT instance FROM slots WHERE claimant = ?", (claimant,))]
            gone = sorted(i for i in rows if i not in keep)
            db.executemany("DELETE FROM slots WHERE instance = ?", [(i,) for i in gone])
            return gone

    def list(self, *, subject: str | None = None, group: str | None = None,
             now: float | None = None) -> list[Slot]:
        now = time.time() if now is None else now
        sql = "SELECT instance, subject, grp, claimant, claimed, expires FROM slots WHERE (expires IS NULL OR expires >= ?)"
        params: list = [now]
        if subject:
            sql += " AND subject = ?"
            params.append(subject)
        if group:
            sql += " AND grp = ?"
            params.append(group)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY claimed", params).fetchall()
            out = []
            for row in rows:
                users, groups = self._counts(self._db, row[1], row[2])
                out.append(Slot(*row, users, groups))
        return out

    def counts(self, subject: str, group: str | None = None) -> tuple[int, int | None]:
        with self._lock:
            return self._counts(self._db, subject, group)

    def close(self) -> None:
        with self._lock:
            self._db.close()
