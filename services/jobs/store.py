"""The job service's records in SQLite: jobs, written before anything is done for them, so a restart
finds every job (the notification subscriptions share the database: services.wsrf.notification)."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from services.sqlite import Database

ACCOUNT_HELD = "held by "      # the submitter of a uid an account or group of the system holds: no DN begins so


class JobState(str, Enum):
    PENDING = "Pending"
    STAGE_IN = "StageIn"
    ACTIVE = "Active"
    STAGE_OUT = "StageOut"
    DONE = "Done"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


FINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class StageIn:
    source: str          # gsiftp:// or ftp:// URL, or staged:NAME (the owner's staging area)
    name: str            # where it lands, relative to the job's directory
    sha256: str | None = None


@dataclass(frozen=True)
class StageOut:
    name: str                      # a file of the job's directory
    destination: str | None = None  # a gsiftp:// or ftp:// URL it is also sent to


@dataclass(frozen=True)
class JobSpec:
    """What SubmitJob asks for."""

    executable: str
    arguments: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    directory: str | None = None
    stdin: str | None = None
    stdout: str = "stdout"
    stderr: str = "stderr"
    stage_in: tuple[StageIn, ...] = ()
    stage_out: tuple[StageOut, ...] = ()
    lifetime: int | None = None

    def to_json(self) -> str:
        return json.dumps({"executable": self.executable, "arguments": list(self.arguments),
                           "environment": [list(v) for v in self.environment], "directory": self.directory,
                           "stdin": self.stdin, "stdout": self.stdout, "stderr": self.stderr,
                           "stage_in": [[s.source, s.name, s.sha256] for s in self.stage_in],
                           "stage_out": [[s.name, s.destination] for s in self.stage_out],
                           "lifetime": self.lifetime})

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        d = json.loads(text)
        return cls(d["executable"], tuple(d["arguments"]), tuple(tuple(v) for v in d["environment"]),
                   d["directory"], d["stdin"], d["stdout"], d["stderr"],
                   tuple(StageIn(*s) for s in d["stage_in"]), tuple(StageOut(*s) for s in d["stage_out"]),
                   d["lifetime"])


@dataclass(frozen=True)
class OutputFile:
    name: str
    size: int
    sha256: str
    destination: str | None = None


@dataclass
class Job:
    key: str
    owner: str
    state: JobState
    spec: JobSpec
    submitted: float
    termination: float
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    failure: str | None = None
    pid: int | None = None
    pid_start: str | None = None           # the shim's start time in /proc (tells a reused pid apart)
    progress: dict = field(default_factory=dict)   # filesDone, filesTotal, bytesDone, current
    outputs: tuple[OutputFile, ...] = ()
    cancel_requested: bool = False

    @property
    def final(self) -> bool:
        return self.state in FINAL


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,
    submitted REAL NOT NULL, termination REAL NOT NULL, started REAL, ended REAL, exit_code INTEGER,
    failure TEXT, pid INTEGER, pid_start TEXT, progress TEXT NOT NULL DEFAULT '{}',
    outputs TEXT NOT NULL DEFAULT '[]', cancel_requested INTEGER NOT NULL DEFAULT 0,
    destroyed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS accounts (dn TEXT PRIMARY KEY, uid INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS uids (uid INTEGER PRIMARY KEY, dn TEXT NOT NULL, job TEXT UNIQUE);
INSERT OR IGNORE INTO uids (uid, dn) SELECT uid, dn FROM accounts;
CREATE TABLE IF NOT EXISTS held_by (dn TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
"""
# held_by: the running total of jobs.held over each submitter's ended jobs not destroyed (what they count against her
# [jobs] submitter_quota), kept in step by every write of held: a sweep reads one row, never her ended jobs.
# jobs.held: an ended job's directory as last counted (bytes against the quota; NULL: a live job, or one ended before
# this column, until its first recount); jobs.recount_at: when an ended job's directory is next due to be counted
# again (seconds since the epoch; 0: at the next sweep). The indexes are partial: what a sweep asks for (the live jobs,
# the recounts due, the lifetimes past) is read through them, whatever the number of ended jobs (attack15).
MIGRATIONS = (("held", "ALTER TABLE jobs ADD COLUMN held INTEGER"),
              ("recount_at", "ALTER TABLE jobs ADD COLUMN recount_at REAL"))
FINAL_SQL = "('Done', 'Failed', 'Cancelled')"        # FINAL, as SQL (the partial index names it so)
INDEXES = f"""
CREATE INDEX IF NOT EXISTS jobs_live ON jobs(owner) WHERE destroyed = 0 AND state NOT IN {FINAL_SQL};
CREATE INDEX IF NOT EXISTS jobs_recount ON jobs(recount_at) WHERE destroyed = 0 AND recount_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_termination ON jobs(termination) WHERE destroyed = 0;
"""
# accounts: an earlier version's one uid per submitter (kept: its uids stay their submitters'; a job it started still
# runs under one). uids: every uid of [jobs] job_uid_first.. ever given, the submitter it was first given to (it never
# passes to another) and the running job that holds it (NULL: free for that submitter's next job).
COLUMNS = ("key", "owner", "state", "spec", "submitted", "termination", "started", "ended", "exit_code", "failure",
           "pid", "pid_start", "progress", "outputs", "cancel_requested")


def _row(row) -> Job:
    d = dict(zip(COLUMNS, row))
    return Job(d["key"], d["owner"], JobState(d["state"]), JobSpec.from_json(d["spec"]), d["submitted"],
               d["termination"], d["started"], d["ended"], d["exit_code"], d["failure"], d["pid"], d["pid_start"],
               json.loads(d["progress"]), tuple(OutputFile(*o) for o in json.loads(d["outputs"])),
               bool(d["cancel_requested"]))


class JobStore:
    def __init__(self, path: Path):
        self.db = Database(path)
        self.db.conn().executescript(SCHEMA)
        with self.db.write("migrate") as db:
            have = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
            for column, sql in MIGRATIONS:
                if column not in have:
                    db.execute(sql)
            # ended jobs of a version before held: each counted again at the sweeps (the oldest first)
            db.execute(f"UPDATE jobs SET recount_at = 0 WHERE destroyed = 0 AND recount_at IS NULL AND state IN "
                       f"{FINAL_SQL}")
        self.db.conn().executescript(INDEXES)

    def close(self) -> None:
        self.db.close()

    def add(self, job: Job) -> None:
        with self.db.write("add") as db:
            db.execute("INSERT INTO jobs (key, owner, state, spec, submitted, termination) VALUES (?,?,?,?,?,?)",
                       (job.key, job.owner, job.state.value, job.spec.to_json(), job.submitted, job.termination))

    def get(self, key: str) -> Job | None:
        row = self.db.conn().execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE key = ? AND destroyed = 0",
                                     (key,)).fetchone()
        return _row(row) if row else None

    def list(self, *, live_only: bool = False) -> list[Job]:
        live = f" INDEXED BY jobs_live WHERE destroyed = 0 AND state NOT IN {FINAL_SQL}" if live_only else \
            " WHERE destroyed = 0"                          # live only: through jobs_live, no ended job's row read
        rows = self.db.conn().execute(f"SELECT {', '.join(COLUMNS)} FROM jobs{live} ORDER BY submitted")
        return [_row(r) for r in rows]

    def count_live(self) -> int:
        return self.db.conn().execute(f"SELECT COUNT(*) FROM jobs INDEXED BY jobs_live WHERE destroyed = 0 AND state "
                                      f"NOT IN {FINAL_SQL}").fetchone()[0]

    def live_keys(self, owner: str | None = None) -> list[str]:
        """The keys of the jobs not ended (of ``owner`` only, when given), read through jobs_live: the rows of ended
        jobs are not read."""
        mine = " AND owner = ?" if owner is not None else ""
        return [r[0] for r in self.db.conn().execute(
            f"SELECT key FROM jobs INDEXED BY jobs_live WHERE destroyed = 0 AND state NOT IN {FINAL_SQL}{mine}",
            () if owner is None else (owner,))]

    def due_recounts(self, now: float, limit: int) -> list[str]:
        """The keys of at most ``limit`` ended jobs whose directory is due to be counted again at ``now``, the longest
        due first (through jobs_recount: what is not due is not read)."""
        return [r[0] for r in self.db.conn().execute(
            "SELECT key FROM jobs WHERE destroyed = 0 AND recount_at IS NOT NULL AND recount_at <= ? "
            "ORDER BY recount_at LIMIT ?", (now, limit))]

    def set_held(self, key: str, held: int, recount_at: float) -> None:
        """An ended job's directory counted ``held`` bytes (against its submitter's quota), next counted again at
        ``recount_at``; its submitter's total (held_by) follows in the same transaction. Nothing for a job that is
        not ended (or was destroyed meanwhile)."""
        with self.db.write("set_held") as db:
            row = db.execute(f"SELECT owner, held FROM jobs WHERE key = ? AND destroyed = 0 AND state IN {FINAL_SQL}",
                             (key,)).fetchone()
            if row is None:
                return
            db.execute("UPDATE jobs SET held = ?, recount_at = ? WHERE key = ?", (held, recount_at, key))
            self._add_held(db, row[0], held - (row[1] or 0))

    @staticmethod
    def _add_held(db, dn: str, delta: int) -> None:
        if delta:
            db.execute("INSERT INTO held_by (dn, bytes) VALUES (?, ?) ON CONFLICT (dn) DO UPDATE SET bytes = bytes + "
                       "excluded.bytes", (dn, delta))

    def ended_held(self, dn: str) -> int:
        """What ``dn``'s ended jobs not destroyed hold, as last counted (one row: the running total)."""
        row = self.db.conn().execute("SELECT bytes FROM held_by WHERE dn = ?", (dn,)).fetchone()
        return 0 if row is None else int(row[0])

    @staticmethod
    def _columns(values: dict) -> dict:
        conv = {}
        for k, v in values.items():
            if k == "state":
                v = JobState(v).value
            elif k == "progress":
                v = json.dumps(v)
            elif k == "outputs":
                v = json.dumps([[o.name, o.size, o.sha256, o.destination] for o in v])
            elif k == "cancel_requested":
                v = int(bool(v))
            conv[k] = v
        return conv

    def update(self, key: str, **values) -> None:
        if not values:
            return
        conv = self._columns(values)
        with self.db.write("update") as db:
            db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in conv)} WHERE key = ?", (*conv.values(), key))

    def set_state(self, key: str, new: JobState, *, expect: set[JobState] | None = None, or_cancelled: bool = False,
                  held: int | None = None, recount_at: float = 0.0, **values) -> JobState | None:
        """Move a job to ``new`` (only from ``expect`` when given); returns the old state, or None if refused.
        ``or_cancelled``: a job whose Cancel was accepted (``request_cancel``) goes to Cancelled instead, without
        a ``failure``. A job that ends (a final ``new``) holds ``held`` bytes against its submitter's quota (its
        directory's count at its end; added to her total in the same transaction) and is due to be counted again at
        ``recount_at``."""
        with self.db.write("set_state") as db:
            row = db.execute("SELECT state, cancel_requested, owner FROM jobs WHERE key = ? AND destroyed = 0",
                             (key,)).fetchone()
            if row is None:
                return None
            old = JobState(row[0])
            if (expect is not None and old not in expect) or old in FINAL:
                return None
            if or_cancelled and row[1]:
                new = JobState.CANCELLED
                values.pop("failure", None)
            if new in FINAL:
                values.update(held=held or 0, recount_at=recount_at)
                self._add_held(db, row[2], held or 0)
            conv = self._columns({**values, "state": new})      # one transaction: never final without its end
            db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in conv)} WHERE key = ?", (*conv.values(), key))
        return old

    def request_cancel(self, key: str) -> JobState | None:
        """Record that a live job's Cancel was accepted (checked and marked in one transaction); its state, or
        None when it has ended (or is gone) already."""
        with self.db.write("request_cancel") as db:
            row = db.execute("SELECT state FROM jobs WHERE key = ? AND destroyed = 0", (key,)).fetchone()
            if row is None or JobState(row[0]) in FINAL:
                return None
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE key = ?", (key,))
        return JobState(row[0])

    def destroy(self, key: str) -> int:
        """Mark the job destroyed; what its directory held against its submitter's quota (taken from her total: its
        directory counts on from the trash, services/jobs/tree.py)."""
        with self.db.write("destroy") as db:
            row = db.execute("SELECT owner, held FROM jobs WHERE key = ? AND destroyed = 0", (key,)).fetchone()
            db.execute("UPDATE jobs SET destroyed = 1, held = NULL, recount_at = NULL WHERE key = ?", (key,))
            if row is not None and row[1]:
                self._add_held(db, row[0], -row[1])
        return int(row[1] or 0) if row is not None else 0

    def expired(self, now: float) -> list[str]:
        return [r[0] for r in self.db.conn().execute(
            "SELECT key FROM jobs WHERE destroyed = 0 AND termination <= ?", (now,))]

    def take_uid(self, key: str, dn: str, first: int, count: int,
                 held_elsewhere: Callable[[int], str | None] | None = None) -> int:
        """A uid (and gid) of ``first`` .. ``first + count - 1`` for job ``key`` of ``dn`` alone while it runs: one
        ``dn``'s ended jobs gave back, else one never given (recorded first, so a restart finds who holds it). A uid
        is never given to another submitter than its first: what a job left under it outside its directory (in /tmp,
        /dev/shm) stays that submitter's. ``held_elsewhere(uid)``: who else holds it (an account, a group), or None;
        a uid so held is given to no job, then or later (recorded as ACCOUNT_HELD plus who). LookupError when none
        is left.

        ``held_elsewhere`` asks the system's name services (LDAP, SSSD: as slow as their server), so it is asked
        outside any transaction: a candidate is chosen in one, looked up with the write lock free (other submits,
        listings, state changes go on meanwhile), then claimed in another only if it is still as it was chosen
        (still free, still never given); taken meanwhile by another job, the next candidate is chosen. The claim
        is one UPDATE ... WHERE job IS NULL or one INSERT of a primary key: never two jobs on one uid."""
        known: dict[int, str | None] = {}        # this call's answers: a candidate seen again is not asked again
        while True:
            with self.db.write("take_uid") as db:
                row = db.execute("SELECT uid FROM uids WHERE job = ?", (key,)).fetchone()
                if row is not None:
                    return int(row[0])
                uid, given = self._candidate(db, dn, first, count)
                if held_elsewhere is None:
                    self._claim(db, uid, given, key, dn)     # in this transaction: it is still as chosen
                    return uid
            if uid not in known:
                known[uid] = held_elsewhere(uid)              # no lock held while the name services answer
            holder = known[uid]
            with self.db.write("take_uid") as db:
                if holder is not None:
                    # given to no job, then or later (unless it was taken meanwhile: then it is that job's)
                    if given:
                        db.execute("UPDATE uids SET dn = ? WHERE uid = ? AND dn = ? AND job IS NULL",
                                   (ACCOUNT_HELD + holder, uid, dn))
                    else:
                        db.execute("INSERT OR IGNORE INTO uids (uid, dn, job) VALUES (?, ?, NULL)",
                                   (uid, ACCOUNT_HELD + holder))
                    continue
                if self._claim(db, uid, given, key, dn):
                    return uid
            # taken by another job while it was looked up: the next candidate

    @staticmethod
    def _candidate(db, dn: str, first: int, count: int) -> tuple[int, bool]:
        """The uid to try next for a job of ``dn`` and whether it was given before (to ``dn``, free again): ``dn``'s
        lowest free one, else the lowest never given above those given; LookupError when none is left."""
        row = db.execute("SELECT MIN(uid) FROM uids WHERE dn = ? AND job IS NULL AND uid >= ? AND uid < ?",
                         (dn, first, first + count)).fetchone()
        if row[0] is not None:
            return int(row[0]), True
        taken = db.execute("SELECT MAX(uid) FROM uids WHERE uid >= ? AND uid < ?", (first, first + count)).fetchone()[0]
        uid = first if taken is None else int(taken) + 1
        if uid >= first + count:
            running = db.execute("SELECT COUNT(*) FROM uids WHERE job IS NOT NULL").fetchone()[0]
            raise LookupError(f"no uid left for this job: all {count} uids of [jobs] job_uid_first = {first}, "
                              f"job_uid_count = {count} are given ({running} to running jobs, the rest to other "
                              f"submitters, whose they stay, or held by accounts); the operator may raise "
                              f"job_uid_count")
        return uid, False

    @staticmethod
    def _claim(db, uid: int, given: bool, key: str, dn: str) -> bool:
        """Give ``uid`` to job ``key`` if it is still as :meth:`_candidate` chose it (``dn``'s and free, or never
        given); whether it was."""
        if given:
            return db.execute("UPDATE uids SET job = ? WHERE uid = ? AND dn = ? AND job IS NULL",
                              (key, uid, dn)).rowcount == 1
        return db.execute("INSERT OR IGNORE INTO uids (uid, dn, job) VALUES (?, ?, ?)", (uid, dn, key)).rowcount == 1

    def uid_shortfall(self, dn: str, first: int, count: int) -> str | None:
        """Why no uid of ``first`` .. ``first + count - 1`` could be given to one more job of ``dn`` (None: one can),
        counting the uids promised to live jobs that have not started yet (each will take one as :meth:`take_uid`
        gives it: its submitter's free ones first, else one never given). SubmitJob asks this, so that a submitter
        beyond the pool is refused at once rather than accepted and then Failed at the program's start."""
        with self.db.write("uid_shortfall") as db:          # one snapshot of the jobs and the uids
            given = db.execute("SELECT COUNT(*) FROM uids WHERE uid >= ? AND uid < ?",
                               (first, first + count)).fetchone()[0]
            free = dict(db.execute("SELECT dn, COUNT(*) FROM uids WHERE job IS NULL AND uid >= ? AND uid < ? "
                                   "GROUP BY dn", (first, first + count)).fetchall())
            waiting = dict(db.execute(
                "SELECT owner, COUNT(*) FROM jobs WHERE destroyed = 0 AND state IN (?, ?) AND key NOT IN "
                "(SELECT job FROM uids WHERE job IS NOT NULL) GROUP BY owner",
                (JobState.PENDING.value, JobState.STAGE_IN.value)).fetchall())
            running = db.execute("SELECT COUNT(*) FROM uids WHERE job IS NOT NULL AND uid >= ? AND uid < ?",
                                 (first, first + count)).fetchone()[0]
            yours = db.execute("SELECT COUNT(*) FROM uids WHERE dn = ? AND uid >= ? AND uid < ?",
                               (dn, first, first + count)).fetchone()[0]
        never = count - given
        promised = sum(max(0, n - free.get(owner, 0)) for owner, n in waiting.items() if owner != dn)
        mine = max(0, waiting.get(dn, 0) + 1 - free.get(dn, 0))
        if mine == 0 or mine <= never - promised:
            return None
        later = "submit again once one of your jobs has ended (its uid comes back to you), or " if yours else ""
        return (f"no uid left for your job: the {count} uids of [jobs] job_uid_first = {first}, job_uid_count = "
                f"{count} are all given or promised ({running} held by running jobs, {sum(waiting.values())} promised "
                f"to jobs not started yet, the others kept for the submitters they were first given to; {yours} "
                f"given to you): {later}ask the operator to raise job_uid_count")

    def job_uid(self, key: str) -> int | None:
        """The uid job ``key`` runs (or ran) under while it holds it; for a job an earlier version started, its
        submitter's one uid of then; None if neither."""
        row = self.db.conn().execute("SELECT uid FROM uids WHERE job = ?", (key,)).fetchone()
        if row is None:
            row = self.db.conn().execute("SELECT a.uid FROM accounts a JOIN jobs j ON j.owner = a.dn WHERE j.key = ?",
                                         (key,)).fetchone()
        return None if row is None else int(row[0])

    def held_uids(self) -> dict[str, int]:
        """Job key -> the uid it holds."""
        return {k: int(u) for u, k in self.db.conn().execute("SELECT uid, job FROM uids WHERE job IS NOT NULL")}

    def supervisor(self, key: str) -> tuple[int | None, str | None]:
        """The pid and start time of job ``key``'s supervisor as recorded (a destroyed job's too)."""
        row = self.db.conn().execute("SELECT pid, pid_start FROM jobs WHERE key = ?", (key,)).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    def release_uid(self, key: str) -> None:
        with self.db.write("release_uid") as db:
            db.execute("UPDATE uids SET job = NULL WHERE job = ?", (key,))

    def uids_of(self, dn: str) -> list[int]:
        """Every uid ever given to ``dn``'s jobs."""
        return [int(r[0]) for r in self.db.conn().execute("SELECT uid FROM uids WHERE dn = ? ORDER BY uid", (dn,))]
