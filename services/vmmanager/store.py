"""The node's records in SQLite (WAL): instances, address leases, the image cache and
notification subscriptions. Everything the VMManager must know after a restart is here."""
from __future__ import annotations

import ipaddress
import json
import sqlite3
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

from services.faults import InvalidArgument, NoCapacity
from services.sqlite import Database, WalSync
from services.vmmanager.states import FINAL, State

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    key            TEXT PRIMARY KEY,
    identifier     TEXT NOT NULL,
    owner          TEXT NOT NULL,
    vo             TEXT NOT NULL,
    image_id       TEXT NOT NULL,
    image_name     TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    size           INTEGER NOT NULL,
    format         TEXT NOT NULL,
    memory         INTEGER NOT NULL,
    vcpus          INTEGER NOT NULL,
    descriptor     BLOB NOT NULL,
    state          TEXT NOT NULL,
    initial_state  TEXT NOT NULL,
    address        TEXT,
    mac            TEXT,
    created        REAL NOT NULL,
    termination    REAL NOT NULL,
    max_lifetime   INTEGER,
    phases         TEXT NOT NULL DEFAULT '[]',
    staged_bytes   INTEGER NOT NULL DEFAULT 0,
    cached         INTEGER NOT NULL DEFAULT 0,
    guest_status   TEXT NOT NULL DEFAULT 'none',
    failure        TEXT,
    token          TEXT NOT NULL,
    hold_id        TEXT,
    ended          REAL,
    hold_holder    TEXT,
    earlier_phases TEXT NOT NULL DEFAULT '[]'
);
CREATE UNIQUE INDEX IF NOT EXISTS instances_live_identifier ON instances (owner, identifier)
    WHERE state NOT IN ('Destroyed', 'Failed', 'Migrated');
CREATE INDEX IF NOT EXISTS instances_owner ON instances (owner);
CREATE INDEX IF NOT EXISTS instances_owner_page ON instances (owner, created, key);
CREATE INDEX IF NOT EXISTS instances_termination ON instances (termination) WHERE ended IS NULL;
CREATE TABLE IF NOT EXISTS leases (
    address      TEXT PRIMARY KEY,
    mac          TEXT NOT NULL UNIQUE,
    instance_key TEXT NOT NULL UNIQUE
);
-- bridge mode: the host tap each leased instance sends from (services/vmmanager/guard.py binds it to the lease)
CREATE TABLE IF NOT EXISTS ports (
    instance_key TEXT PRIMARY KEY,
    tap          TEXT NOT NULL,
    active       INTEGER NOT NULL DEFAULT 1   -- 0: its domain left for another node (a migration's save)
);
CREATE TABLE IF NOT EXISTS cache (
    sha256    TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    format    TEXT NOT NULL,
    fetched   REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    key          TEXT PRIMARY KEY,
    instance_key TEXT NOT NULL,
    consumer     TEXT NOT NULL,
    subscriber   TEXT NOT NULL,
    expires      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS subscriptions_instance ON subscriptions (instance_key);
CREATE TABLE IF NOT EXISTS outbox (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,           -- what to give back at the central services: 'hold', 'holder', 'slot',
                                        -- 'idle-hold' (a node's hold on an image none of its instances uses)
    instance   TEXT NOT NULL,           -- the instance; for 'idle-hold' the hold's holder
    arg        TEXT NOT NULL DEFAULT '',
    created    REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_try   REAL NOT NULL,
    last_error TEXT
);
"""


@dataclass
class Instance:
    """One instance's record (a row of ``instances``)."""

    key: str
    identifier: str
    owner: str
    vo: str
    image_id: str
    image_name: str
    sha256: str
    size: int
    format: str
    memory: int
    vcpus: int
    descriptor: bytes
    state: str
    initial_state: str
    address: str | None
    mac: str | None
    created: float
    termination: float
    max_lifetime: int | None
    phases: str = "[]"
    staged_bytes: int = 0
    cached: int = 0
    guest_status: str = "none"
    failure: str | None = None
    token: str = ""
    hold_id: str | None = None
    ended: float | None = None
    hold_holder: str | None = None   # recorded before the hold is asked for: the repository finds it by holder
    # the phases of this instance's earlier operations on this node, oldest first (a list of [name, seconds] lists):
    # an instance that comes back by migration replaces its Migrated record here, whose phases (its deployment's,
    # an earlier migration's) are kept so (the EarlierPhaseTimings property; trial16 T3)
    earlier_phases: str = "[]"

    @property
    def state_enum(self) -> State:
        return State(self.state)

    def phase_list(self) -> list[tuple[str, float]]:
        return [(n, s) for n, s in json.loads(self.phases)]

    def earlier_phase_lists(self) -> list[list[tuple[str, float]]]:
        return [[(n, s) for n, s in group] for group in json.loads(self.earlier_phases)]


COLUMNS = [f.name for f in fields(Instance)]


@dataclass(frozen=True)
class Lease:
    address: str
    mac: str
    netmask: str
    gateway: str | None
    prefix: int


@dataclass
class LeaseRange:
    """[vmmanager] lease range: first-last address of this node (nodes sharing a subnet get disjoint ranges)."""

    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address
    network: ipaddress.IPv4Network
    gateway: str | None
    mac_prefix: str = "52:54:00"

    @classmethod
    def parse(cls, text: str, network: str, gateway: str | None, mac_prefix: str = "52:54:00") -> "LeaseRange":
        try:
            first_s, _, last_s = text.partition("-")
            first, last = ipaddress.IPv4Address(first_s.strip()), ipaddress.IPv4Address(last_s.strip())
            net = ipaddress.IPv4Network(network, strict=False)
        except ValueError as exc:
            raise ValueError(f"bad lease range {text!r} / network {network!r}: {exc}") from None
        if not (first in net and last in net and first <= last):
            raise ValueError(f"lease range {text} is not an ordered range inside {net}")
        if first == net.network_address or last == net.broadcast_address:
            raise ValueError(f"lease range {text} includes the network or broadcast address of {net}")
        return cls(first, last, net, gateway, mac_prefix)

    def mac_for(self, address: ipaddress.IPv4Address) -> str:
        """The MAC of an address: the prefix and the address's last three octets, so distinct addresses
        (even on other nodes of the subnet) never share a MAC."""
        b = address.packed
        return f"{self.mac_prefix}:{b[1]:02x}:{b[2]:02x}:{b[3]:02x}"

    def __len__(self) -> int:
        return int(self.last) - int(self.first) + 1


class NodeStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = Database(self.path)
        self._wal = WalSync(self.path)
        self._tx = threading.local()      # the depth of this thread's transaction()
        self._db().executescript(SCHEMA)
        columns = {r[1] for r in self._db().execute("PRAGMA table_info(instances)")}
        if "hold_holder" not in columns:    # a node state written before holds were found by holder
            self._db().execute("ALTER TABLE instances ADD COLUMN hold_holder TEXT")
        if "earlier_phases" not in columns:  # a node state written before an instance's earlier phases were kept
            self._db().execute("ALTER TABLE instances ADD COLUMN earlier_phases TEXT NOT NULL DEFAULT '[]'")
        # instances share the node's hold on an image: who still records it is asked at every release
        self._db().execute("CREATE INDEX IF NOT EXISTS instances_hold_holder ON instances (hold_holder)")

    def _db(self) -> sqlite3.Connection:
        return self.db.conn()

    def write(self):
        """One write transaction; inside :meth:`transaction` on this thread, a part of that one (no commit of
        its own)."""
        if getattr(self._tx, "depth", 0):
            return nullcontext(self._db())
        self._committing()
        return self.db.write()

    def _committing(self) -> None:
        if getattr(self._tx, "deferred", 0):
            self._tx.unsynced = True

    @contextmanager
    def one_sync(self) -> Iterator[None]:
        """This thread's commits inside are written without an fsync each, and made durable together by one
        fsync on the way out (before the caller answers anyone). A commit inside is SQLite's synchronous=NORMAL:
        in WAL mode it is in the WAL file at once, visible to every connection and kept if the process is killed
        (the node's crash), but on the disk only once the WAL is synced; leaving syncs it, which is what a commit
        with synchronous=FULL does, for all of them at once. A deployment's six commits cost one fsync, not six
        (each fsync on this VM's disk is a device flush and its interrupt). Not inside a :meth:`transaction`."""
        tx = self._tx
        if getattr(tx, "deferred", 0):
            tx.deferred += 1
            try:
                yield
            finally:
                tx.deferred -= 1
            return
        if getattr(tx, "depth", 0):
            raise RuntimeError("one_sync() inside a transaction")
        conn = self._db()
        conn.execute("PRAGMA synchronous=NORMAL")
        tx.deferred, tx.unsynced = 1, False
        try:
            yield
        finally:
            tx.deferred = 0
            conn.execute(f"PRAGMA synchronous={self.db.synchronous}")
            self.sync_pending()

    def sync_pending(self) -> None:
        """This thread's commits made inside :meth:`one_sync` and not yet on the disk: synced now (before the node
        tells another service about what they record)."""
        if getattr(self._tx, "unsynced", False):
            self._tx.unsynced = False
            self._wal.sync()      # one fsync shared by the threads that ask at once

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """This thread's writes inside as one transaction, one commit (each commit is a WAL write, an fsync
        and SQLite's file locks): all of them or, when anything inside raises, none."""
        if getattr(self._tx, "depth", 0):
            self._tx.depth += 1
            try:
                yield
            finally:
                self._tx.depth -= 1
            return
        self._committing()
        with self.db.write():
            self._tx.depth = 1
            try:
                yield
            finally:
                self._tx.depth = 0

    def close(self) -> None:
        self.db.close()

    # -- the outbox: releases the central services could not take yet ------------------------------
    def enqueue(self, kind: str, instance: str, arg: str = "", error: str = "") -> None:
        now = time.time()
        with self.write() as db:
            db.execute("INSERT INTO outbox (kind, instance, arg, created, attempts, next_try, last_error) "
                       "VALUES (?, ?, ?, ?, 1, ?, ?)", (kind, instance, arg, now, now + 0.5, error))

    def drop_hold(self, key: str, idle: tuple[str, str, float] | None = None) -> None:
        """The instance no longer uses its image hold; with ``idle`` (holder, "image id\\nhold id", when), in the
        same transaction, the hold's release is due at ``when`` unless an instance takes it again meanwhile (one
        pending entry per holder: a later one replaces it)."""
        now = time.time()
        with self.write() as db:
            db.execute("UPDATE instances SET hold_id = NULL, hold_holder = NULL WHERE key = ?", (key,))
            if idle is not None:
                holder, arg, when = idle
                db.execute("DELETE FROM outbox WHERE kind = 'idle-hold' AND instance = ?", (holder,))
                db.execute("INSERT INTO outbox (kind, instance, arg, created, attempts, next_try, last_error) "
                           "VALUES ('idle-hold', ?, ?, ?, 0, ?, '')", (holder, arg, now, when))

    def outbox(self, due: float | None = None, instance: str | None = None) -> list[tuple[int, str, str, str, int]]:
        """(id, kind, instance, arg, attempts) of the pending releases (only those due at ``due``)."""
        sql, params = "SELECT id, kind, instance, arg, attempts FROM outbox WHERE 1", []
        if due is not None:
            sql += " AND next_try <= ?"
            params.append(due)
        if instance is not None:
            sql += " AND instance = ?"
            params.append(instance)
        return self._db().execute(sql + " ORDER BY id", params).fetchall()

    def outbox_done(self, entry: int) -> None:
        with self.write() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (entry,))

    def outbox_retry(self, entry: int, error: str, next_try: float) -> None:
        with self.write() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, next_try = ?, last_error = ? WHERE id = ?",
                       (next_try, error, entry))

    # -- instances ------------------------------------------------------------------------------
    def insert(self, inst: Instance) -> None:
        try:
            with self.write() as db:
                db.execute(f"INSERT INTO instances ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                           [getattr(inst, c) for c in COLUMNS])
        except sqlite3.IntegrityError:
            raise InvalidArgument(f"you already have a live instance named {inst.identifier!r} on this node",
                                  argument="identifier") from None

    def get(self, key: str) -> Instance | None:
        row = self._db().execute(f"SELECT {', '.join(COLUMNS)} FROM instances WHERE key = ?", (key,)).fetchone()
        return Instance(*row) if row else None

    def hold_users(self, *, hold_id: str | None = None, holder: str | None = None) -> int:
        """How many instances record the hold ``hold_id`` or the holder ``holder`` (their hold fields are
        cleared when they release)."""
        if hold_id is not None:
            return self._db().execute("SELECT count(*) FROM instances WHERE hold_id = ?", (hold_id,)).fetchone()[0]
        return self._db().execute("SELECT count(*) FROM instances WHERE hold_holder = ?", (holder,)).fetchone()[0]

    def update(self, key: str, **values) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        with self.write() as db:
            db.execute(f"UPDATE instances SET {sets} WHERE key = ?", [*values.values(), key])

    def set_state(self, key: str, new: State, *, expect: set[State] | None = None,
                  phases: list | None = None, **values) -> State | None:
        """Move an instance to ``new`` (only from ``expect`` when given); returns the old state, or None when the
        instance was not in an expected state (nothing changed). ``phases`` ([name, seconds] pairs) are added
        to its phase timings in the same transaction."""
        with self.write() as db:
            row = db.execute("SELECT state, phases FROM instances WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            old = State(row[0])
            if expect is not None and old not in expect:
                return None
            extra = dict(values)
            if phases:
                extra["phases"] = json.dumps(json.loads(row[1]) + [list(p) for p in phases])
            if new in FINAL:
                extra.setdefault("ended", time.time())
            sets = ", ".join(["state = ?"] + [f"{k} = ?" for k in extra])
            db.execute(f"UPDATE instances SET {sets} WHERE key = ?", [new.value, *extra.values(), key])
            return old

    def add_phase(self, key: str, name: str, seconds: float) -> None:
        self.add_phases(key, [[name, round(seconds, 6)]])

    def add_phases(self, key: str, phases: list) -> None:
        """Add [name, seconds] pairs to an instance's phase timings, in one transaction."""
        with self.write() as db:
            row = db.execute("SELECT phases FROM instances WHERE key = ?", (key,)).fetchone()
            if row is None:
                return
            db.execute("UPDATE instances SET phases = ? WHERE key = ?",
                       (json.dumps(json.loads(row[0]) + [list(p) for p in phases]), key))

    def list(self, owner: str | None = None, *, live_only: bool = True) -> list[Instance]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM instances"
        where, params = [], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if live_only:
            where.append("state NOT IN ('Destroyed', 'Failed', 'Migrated')")
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [Instance(*r) for r in self._db().execute(sql + " ORDER BY created", params)]

    def page(self, owner: str, *, live_only: bool, after: tuple[float, str] | None, limit: int) -> list[Instance]:
        """Up to ``limit`` of ``owner``'s instances in (created, key) order, those after ``after`` (the last
        (created, key) of the page before) only: a page of ListInstances, stable while instances come and go."""
        sql, params = f"SELECT {', '.join(COLUMNS)} FROM instances WHERE owner = ?", [owner]
        if live_only:
            sql += " AND state NOT IN ('Destroyed', 'Failed', 'Migrated')"
        if after is not None:
            sql += " AND (created > ? OR (created = ? AND key > ?))"
            params += [after[0], after[0], after[1]]
        return [Instance(*r) for r in self._db().execute(sql + " ORDER BY created, key LIMIT ?", [*params, limit])]

    def expired(self, now: float) -> list[str]:
        return [r[0] for r in self._db().execute(
            "SELECT key FROM instances WHERE ended IS NULL AND termination <= ? AND state NOT IN ('Destroyed', 'Failed', 'Migrated')",
            (now,))]

    # -- leases ---------------------------------------------------------------------------------------
    def lease(self, key: str, pool: LeaseRange) -> Lease:
        """Lease the lowest free address of the range (and its MAC) to an instance, atomically."""
        with self.write() as db:
            row = db.execute("SELECT address, mac FROM leases WHERE instance_key = ?", (key,)).fetchone()
            if row:
                return self._lease(row[0], row[1], pool)
            taken = {r[0] for r in db.execute("SELECT address FROM leases")}
            for n in range(int(pool.first), int(pool.last) + 1):
                addr = ipaddress.IPv4Address(n)
                if str(addr) not in taken:
                    mac = pool.mac_for(addr)
                    db.execute("INSERT INTO leases (address, mac, instance_key) VALUES (?, ?, ?)", (str(addr), mac, key))
                    db.execute("UPDATE instances SET address = ?, mac = ? WHERE key = ?", (str(addr), mac, key))
                    return self._lease(str(addr), mac, pool)
        raise NoCapacity(f"all {len(pool)} addresses of this node's lease range {pool.first}-{pool.last} are held",
                         resource="addresses")

    @staticmethod
    def _lease(address: str, mac: str, pool: LeaseRange) -> Lease:
        return Lease(address, mac, str(pool.network.netmask), pool.gateway, pool.network.prefixlen)

    def release_lease(self, key: str) -> bool:
        with self.write() as db:
            db.execute("DELETE FROM ports WHERE instance_key = ?", (key,))
            return db.execute("DELETE FROM leases WHERE instance_key = ?", (key,)).rowcount > 0

    def bind_port(self, key: str, tap: str | None = None) -> bool:
        """Instance ``key`` sends from host tap ``tap`` (kept until its lease is released); without ``tap``, the
        one it had, again (a migration rolled back). False when it has none."""
        with self.write() as db:
            if tap is None:
                return db.execute("UPDATE ports SET active = 1 WHERE instance_key = ?", (key,)).rowcount > 0
            db.execute("INSERT INTO ports (instance_key, tap, active) VALUES (?, ?, 1) ON CONFLICT (instance_key) "
                       "DO UPDATE SET tap = excluded.tap, active = 1", (key, tap))
            return True

    def unbind_port(self, key: str) -> None:
        """Instance ``key``'s domain no longer runs here (saved for a migration): its tap is not its to bind."""
        with self.write() as db:
            db.execute("UPDATE ports SET active = 0 WHERE instance_key = ?", (key,))

    def ports(self) -> dict[str, str]:
        """instance key -> its tap, bound or not."""
        return {r[0]: r[1] for r in self._db().execute("SELECT instance_key, tap FROM ports")}

    def port_bindings(self) -> list[tuple[str, str, str]]:
        """(tap, MAC, address) of every leased instance whose tap is bound: what the bridge guard lets each tap
        send as."""
        return [tuple(r) for r in self._db().execute(
            "SELECT p.tap, l.mac, l.address FROM ports p JOIN leases l ON l.instance_key = p.instance_key "
            "WHERE p.active = 1 ORDER BY p.tap")]

    def leases(self) -> dict[str, tuple[str, str]]:
        return {r[2]: (r[0], r[1]) for r in self._db().execute("SELECT address, mac, instance_key FROM leases")}

    # -- image cache ----------------------------------------------------------------------------------
    def cached(self, sha256: str) -> bool:
        return self._db().execute("SELECT 1 FROM cache WHERE sha256 = ?", (sha256,)).fetchone() is not None

    def add_cached(self, sha256: str, size: int, fmt: str) -> None:
        now = time.time()
        with self.write() as db:
            db.execute("INSERT OR REPLACE INTO cache (sha256, size, format, fetched, last_used) VALUES (?, ?, ?, ?, ?)",
                       (sha256, size, fmt, now, now))

    def touch_cached(self, sha256: str) -> None:
        with self.write() as db:
            db.execute("UPDATE cache SET last_used = ? WHERE sha256 = ?", (time.time(), sha256))

    def cache_entries(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db().execute("SELECT sha256, size FROM cache")}

    def drop_cached(self, sha256: str) -> None:
        with self.write() as db:
            db.execute("DELETE FROM cache WHERE sha256 = ?", (sha256,))

    # -- subscriptions ----------------------------------------------------------------------------------
    def subscribe(self, key: str, instance_key: str, consumer: str, subscriber: str, expires: float) -> None:
        with self.write() as db:
            db.execute("INSERT INTO subscriptions (key, instance_key, consumer, subscriber, expires) "
                       "VALUES (?, ?, ?, ?, ?)", (key, instance_key, consumer, subscriber, expires))

    def subscriptions(self, instance_key: str, now: float) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._db().execute(
            "SELECT key, consumer FROM subscriptions WHERE instance_key = ? AND expires > ?", (instance_key, now))]

    def drop_subscriptions(self, instance_key: str) -> None:
        with self.write() as db:
            db.execute("DELETE FROM subscriptions WHERE instance_key = ?", (instance_key,))
