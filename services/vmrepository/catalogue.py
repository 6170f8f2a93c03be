"""The catalogue: descriptors in SQLite (WAL), the image bytes they refer
to, and holds. Writes are serialised by SQLite's write lock (BEGIN IMMEDIATE), which also guards
the store's renames and deletions, so the catalogue and the store stay consistent across crashes."""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lxml import etree

from services.descriptor import MAX_DESCRIPTOR_BYTES, MAX_STORED_DESCRIPTOR_BYTES, Descriptor, simple_fields
from services.sqlite import Database
from services.vmrepository.index import FACTS_VERSION, QueryIndex, pack_facts
from services.vmrepository.query import Prepared
from services.common.crash import crashpoint
from services.vmrepository.store import ImageStore, Ingested

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    sha256   TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    created  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    image_id   TEXT PRIMARY KEY,
    vo         TEXT NOT NULL,
    name       TEXT NOT NULL,
    owner      TEXT NOT NULL,
    sha256     TEXT NOT NULL REFERENCES blobs(sha256),
    size       INTEGER NOT NULL,
    memory     INTEGER NOT NULL,
    vcpus      INTEGER NOT NULL,
    created    TEXT NOT NULL,
    updated    TEXT NOT NULL,
    revision   INTEGER NOT NULL DEFAULT 1,
    descriptor BLOB NOT NULL,
    facts      TEXT,
    UNIQUE (vo, name)
);
CREATE INDEX IF NOT EXISTS images_sha ON images (sha256);
CREATE INDEX IF NOT EXISTS images_vo_name ON images (vo, name);
-- the query index (index.py) reads each descriptor's facts packed in its row (images.facts): a registration
-- writes one row, not one per fact (about 46 for a descriptor: they were most of an import's time). An older
-- catalogue loses its facts table at its next start, and gains the facts column (see _migrate).
DROP INDEX IF EXISTS facts_txt;
DROP INDEX IF EXISTS facts_num;
DROP INDEX IF EXISTS facts_ver;
DROP INDEX IF EXISTS facts_image;
DROP TABLE IF EXISTS facts;
CREATE TABLE IF NOT EXISTS holds (
    hold_id  TEXT PRIMARY KEY,
    image_id TEXT NOT NULL,
    holder   TEXT NOT NULL,
    owner    TEXT NOT NULL,
    expires  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_image ON holds (image_id, expires);
CREATE TABLE IF NOT EXISTS changes (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Record:
    image_id: str
    vo: str
    name: str
    owner: str
    sha256: str
    size: int
    revision: int
    descriptor: bytes

    def element(self) -> etree._Element:
        return etree.fromstring(self.descriptor, _TRUSTED)


log = logging.getLogger("vmgrid.VMRepositoryService")
RESAVE_AFTER = 10_000   # changes replayed at a start after which the saved index is written again
REBUILD_OVER = 50_000   # changes behind the saved index past which a start rebuilds instead of replaying
INDEX_IDLE_S = 0.5      # quiet after a bulk import before the query index catches up on it in the background
_TRUSTED = etree.XMLParser(resolve_entities=False, no_network=True)  # our own stored, validated XML


def _bounded(data: bytes, vo: str, name: str) -> bytes:
    """A descriptor's stored bytes, or InvalidDescriptor when they are more than MAX_STORED_DESCRIPTOR_BYTES: the bound
    parse_descriptor holds a file to, held on every way in (a 9 MB descriptor sent in a SOAP request was stored, and
    two of them made every query page of their VO longer than any client reads: a VO member broke everyone's
    queries)."""
    if len(data) > MAX_STORED_DESCRIPTOR_BYTES:
        from services.faults import InvalidDescriptor
        raise InvalidDescriptor(f"the descriptor of {vo}/{name} is {len(data)} bytes; a descriptor may be at most "
                                f"{MAX_DESCRIPTOR_BYTES} bytes (and {MAX_STORED_DESCRIPTOR_BYTES} with the fields the "
                                f"repository sets)", schemaMessage="descriptor too long")
    return data


def new_image_id() -> str:
    """``img-`` and a random (version 4) UUID's hex, made without a UUID object (a bulk import makes thousands)."""
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40       # version 4
    b[8] = b[8] & 0x3F | 0x80       # RFC 4122 variant
    return "img-" + b.hex()


class Catalogue:
    def __init__(self, path: Path, store: ImageStore):
        self.path = Path(path)
        self.store = store
        self.index = QueryIndex()
        self.db = Database(self.path, on_connect=lambda c: c.execute("PRAGMA cache_size=-65536"),
                           before_commit=lambda name: crashpoint(f"catalogue.{name}.before-commit"))
        self._db().executescript(SCHEMA)
        self.index_path = self.path.with_name(self.path.name + ".index")
        self._migrate()
        with self._write("meta") as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('catalogue_id', ?)", (uuid.uuid4().hex,))
        self.catalogue_id = self._db().execute("SELECT value FROM meta WHERE key = 'catalogue_id'").fetchone()[0]
        self.path.with_name(self.path.name + ".index.npz").unlink(missing_ok=True)   # the earlier format's file
        self._saved_seq: int | None = None
        # a bulk import's rows are caught up into the query index by a background thread once imports have been
        # quiet for INDEX_IDLE_S (not in the import call: parsing each descriptor for its facts is most of a
        # catch-up), so that neither the next query nor close() (a stop under a supervisor's timeout) pays for it
        self._idle = threading.Condition()
        self._dirty_at: float | None = None
        self._closing = False
        self._worker: threading.Thread | None = None

    def _migrate(self) -> None:
        """Bring an older catalogue to this schema: the images' packed facts column (added empty: a row without
        packed facts is read from its XML by the next rebuild, which stores them, see :meth:`warm`), and packed
        facts made by another :data:`FACTS_VERSION` dropped, with the saved index built from them."""
        with self._write("migrate") as db:
            if "facts" not in [r[1] for r in db.execute("PRAGMA table_info(images)")]:
                db.execute("ALTER TABLE images ADD COLUMN facts TEXT")
            row = db.execute("SELECT value FROM meta WHERE key = 'facts_version'").fetchone()
            if row is None or row[0] != FACTS_VERSION:
                if row is not None or db.execute("SELECT 1 FROM images WHERE facts IS NOT NULL LIMIT 1").fetchone():
                    db.execute("UPDATE images SET facts = NULL")
                    self.index_path.unlink(missing_ok=True)
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('facts_version', ?)", (FACTS_VERSION,))

    # -- connections ----------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        return self.db.conn()

    def _write(self, name: str = "write"):
        """One write transaction; the crash tests can kill the process just before its COMMIT."""
        return self.db.write(name)

    def close(self) -> None:
        """Save the query index beside the catalogue (if it moved since it was saved), then close. A background
        catch-up under way is finished first (one at most: it holds the index's lock)."""
        with self._idle:
            self._closing = True
            self._idle.notify_all()
        if self._worker is not None:
            self._worker.join()
        try:
            top = self._db().execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
            if self._saved_seq is not None and top != self._saved_seq:   # the catalogue moved since it was saved
                self.save_index()
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot save the query index to %s: %s (the next start rebuilds it)", self.index_path, exc)
        self.db.close()

    def _bulk_written(self) -> None:
        """A bulk import committed: have the background thread catch the query index up once imports are quiet."""
        with self._idle:
            if self._closing:
                return
            self._dirty_at = time.monotonic()
            if self._worker is None:
                self._worker = threading.Thread(target=self._catch_up_when_idle, name="vmgrid-index-catch-up",
                                                daemon=True)
                self._worker.start()
            self._idle.notify_all()

    def _catch_up_when_idle(self) -> None:
        while True:
            with self._idle:
                while True:
                    if self._closing:
                        return
                    if self._dirty_at is None:
                        self._idle.wait()
                        continue
                    delay = self._dirty_at + INDEX_IDLE_S - time.monotonic()
                    if delay <= 0:
                        self._dirty_at = None
                        break
                    self._idle.wait(delay)
            try:
                with self.index.lock:
                    if self.index.last_seq < 0:      # never made current (no start warmed it): the first query does
                        continue
                    self.index.catch_up(self._db())
                    self._store_unpacked()
            except (OSError, sqlite3.Error) as exc:
                log.warning("the query index could not catch up on an import: %s (the next query does)", exc)

    # -- the query index, persisted -------------------------------------------------------------------
    def warm(self) -> str:
        """Make the query index current before the first query: from the saved index when its stamp names
        a position of this catalogue's change log (then the changes after it are caught up), else rebuilt
        from SQLite and saved. Returns how: "saved", "saved+N changes" or "rebuilt (reason)"."""
        db = self._db()
        with self.index.lock:
            how = self._load_saved_index(db)
            if how is None:
                return "current"
            before = self.index.last_seq
            self.index.catch_up(db)
            self._store_unpacked()
            if how != "saved":
                self.save_index()
                return how
            caught = db.execute("SELECT count(*) FROM changes WHERE seq > ?", (before,)).fetchone()[0] if before >= 0 else 0
            if caught >= RESAVE_AFTER:
                self.save_index()        # the next start need not replay them again
            return f"saved+{caught} changes" if caught else "saved"

    def _store_unpacked(self) -> None:
        """Store the packed facts the index had to read from the XML of rows without them (a bulk import's, or
        a migrated catalogue's): the next rebuild reads them. A row changed meanwhile keeps its own."""
        todo, self.index.unpacked = self.index.unpacked, []
        if todo:
            with self._write("pack-facts") as db:
                db.executemany("UPDATE images SET facts = ? WHERE image_id = ? AND facts IS NULL", todo)
            log.info("stored the packed facts of %d descriptors written before they were kept", len(todo))

    def _load_saved_index(self, db: sqlite3.Connection) -> str | None:
        """Load the saved index if it is valid for this catalogue; the reason it is not, otherwise."""
        if self.index.last_seq >= 0:
            return None
        if not self.index_path.exists():
            return "rebuilt (no saved index)"
        stamp = QueryIndex.read_stamp(self.index_path)
        if stamp is None:
            return "rebuilt (saved index unreadable)"
        fmt, cid, seq, image_id = stamp
        if cid != self.catalogue_id:
            return "rebuilt (saved index of another catalogue)"
        logged = db.execute("SELECT image_id FROM changes WHERE seq = ?", (seq,)).fetchone()
        if seq > 0 and (logged is None or logged[0] != image_id):
            return "rebuilt (saved index from another history of the change log)"
        behind = db.execute("SELECT count(*) FROM changes WHERE seq > ?", (seq,)).fetchone()[0]
        if behind > REBUILD_OVER:
            return f"rebuilt (saved index {behind} changes behind)"      # reading it all at once is faster
        try:
            self.index.load(self.index_path)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            self.index.__init__()
            return f"rebuilt (saved index unreadable: {exc})"
        self._saved_seq = seq
        return "saved"

    def save_index(self) -> None:
        """Write the query index beside the catalogue, stamped with its change-log position."""
        db = self._db()
        with self.index.lock:
            self.index.catch_up(db)
            self._store_unpacked()
            seq = self.index.last_seq
            row = db.execute("SELECT image_id FROM changes WHERE seq = ?", (seq,)).fetchone()
            self.index.save(self.index_path, self.catalogue_id, row[0] if row else "")
            self._saved_seq = seq

    # -- recovery -----------------------------------------------------------------------------
    def reconcile(self) -> dict[str, int]:
        """At start: drop ingests in progress, orphan blob files, and blob rows nobody refers to.
        Blob rows whose file is missing are reported (the images stay, marked by `missing`)."""
        removed_tmp = self.store.clear_tmp()
        with self._write() as db:
            db.execute("DELETE FROM blobs WHERE sha256 NOT IN (SELECT sha256 FROM images)")
            rows = {r[0] for r in db.execute("SELECT sha256 FROM blobs")}
            orphans = self.store.all_blobs() - rows
            for sha in orphans:
                self.store.delete(sha)
            missing = [sha for sha in rows if not self.store.exists(sha)]
            db.execute("DELETE FROM holds WHERE expires < ?", (time.time(),))
        return {"tmp_removed": removed_tmp, "orphan_blobs_removed": len(orphans), "missing_blobs": len(missing)}

    # -- reads ------------------------------------------------------------------------------
    def get(self, image_id: str) -> Record | None:
        row = self._db().execute(
            "SELECT image_id, vo, name, owner, sha256, size, revision, descriptor FROM images WHERE image_id = ?",
            (image_id,)).fetchone()
        return Record(*row) if row else None

    def find(self, vo: str, name: str) -> Record | None:
        row = self._db().execute(
            "SELECT image_id, vo, name, owner, sha256, size, revision, descriptor FROM images WHERE vo = ? AND name = ?",
            (vo, name)).fetchone()
        return Record(*row) if row else None

    def made_of(self, sha256: str, page: int = 64) -> Iterator[Record]:
        """The images whose bytes are ``sha256`` (duplicates share them), read a page at a time: a caller that
        stops at the first it may read (an import, a GridFTP read) does not load every duplicate (a bulk import
        makes thousands of descriptors of one image). Each page is its own statement: no cursor stays open."""
        after = 0
        while True:      # rowid order is the images_sha index's own order: each page is one index range
            rows = self._db().execute(
                "SELECT rowid, image_id, vo, name, owner, sha256, size, revision, descriptor FROM images "
                "WHERE sha256 = ? AND rowid > ? ORDER BY rowid LIMIT ?", (sha256, after, page)).fetchall()
            for r in rows:
                yield Record(*r[1:])
            if len(rows) < page:
                return
            after = rows[-1][0]

    def blake3_of(self, sha256: str) -> str | None:
        """The BLAKE3 digest of the bytes ``sha256``, from a descriptor that carries it (computed at ingest;
        images ingested before BLAKE3 have none)."""
        for (data,) in self._db().execute("SELECT descriptor FROM images WHERE sha256 = ?", (sha256,)):
            value = Descriptor(etree.fromstring(data, _TRUSTED)).blake3
            if value:
                return value
        return None

    def count(self) -> int:
        return self._db().execute("SELECT count(*) FROM images").fetchone()[0]

    def vo_counts(self, vos: list[str]) -> dict[str, int]:
        marks = ",".join("?" * len(vos))
        rows = self._db().execute(f"SELECT vo, count(*) FROM images WHERE vo IN ({marks}) GROUP BY vo", vos) if vos else []
        counts = {vo: 0 for vo in vos}
        counts.update(dict(rows))
        return counts

    def query(self, groups: list[list[Prepared]], vos: list[str], order: str, descending: bool,
              offset: int, limit: int) -> tuple[int, list[Record]]:
        """The images matching an OR of AND groups of criteria, within the VOs: the total and one page."""
        if not vos:
            return 0, []
        db = self._db()
        with self.index.lock:
            self.index.catch_up(db)
            if self.index.unpacked:                 # a rebuild here read rows written before packed facts
                self._store_unpacked()
            mask = self.index.match(groups, vos)
            total = int(mask.sum())
            ids = self.index.page(mask, order, descending, offset, limit)
        return total, self.records(ids)

    def records(self, image_ids: list[str]) -> list[Record]:
        """The records of these images, in this order (those removed meanwhile are left out)."""
        if not image_ids:
            return []
        rows = self._db().execute(
            f"SELECT image_id, vo, name, owner, sha256, size, revision, descriptor FROM images "
            f"WHERE image_id IN ({','.join('?' * len(image_ids))})", image_ids).fetchall()
        by_id = {r[0]: Record(*r) for r in rows}
        return [by_id[i] for i in image_ids if i in by_id]

    def scan(self, vos: list[str], order: str, descending: bool) -> Iterator[Record]:
        """Every image of the VOs in order (the XPath dialect evaluates on each)."""
        if not vos:
            return iter(())
        marks = ",".join("?" * len(vos))
        direction = "DESC" if descending else "ASC"
        cur = self._db().execute(
            f"SELECT image_id, vo, name, owner, sha256, size, revision, descriptor FROM images "
            f"WHERE vo IN ({marks}) ORDER BY {order} {direction}, image_id {direction}", vos)
        return (Record(*r) for r in cur)

    # -- writes -------------------------------------------------------------------------------
    def add(self, element: etree._Element, ingested: Ingested | None = None) -> None:
        """Insert a complete descriptor (imageId, owner, created, sha256 and size set). With
        ``ingested``, its bytes become the blob in the same write transaction; without, the
        descriptor must refer to a blob already present (a duplicate)."""
        d = Descriptor(element)
        now = d.created
        data = _bounded(etree.tostring(element, encoding="UTF-8"), d.vo, d.name)
        adopted: list[str] = []
        try:
            self._add(d, ingested, now, data, element, adopted)
        except BaseException:
            if adopted:   # a failed ingest leaves nothing behind: the blob it adopted goes (under the write lock)
                try:
                    with self._write("add-undo") as db:
                        if not db.execute("SELECT 1 FROM blobs WHERE sha256 = ?", (adopted[0],)).fetchone():
                            self.store.delete(adopted[0])
                except sqlite3.Error:
                    pass   # the next start's reconcile removes the orphan
            raise

    def _add(self, d, ingested, now, data, element, adopted: list[str]) -> None:
        from services.faults import DuplicateName, UnknownImage

        with self._write("add") as db:
            if db.execute("SELECT 1 FROM images WHERE vo = ? AND name = ?", (d.vo, d.name)).fetchone():
                raise DuplicateName(f"an image named {d.name!r} already exists in VO {d.vo!r}", vo=d.vo, name=d.name)
            have_blob = db.execute("SELECT 1 FROM blobs WHERE sha256 = ?", (d.sha256,)).fetchone()
            if ingested is not None:
                if not self.store.exists(d.sha256):
                    adopted.append(d.sha256)
                self.store.adopt(ingested)
                crashpoint("ingest.renamed")
                if not have_blob:
                    db.execute("INSERT INTO blobs (sha256, size, created) VALUES (?, ?, ?)",
                               (d.sha256, d.size, time.time()))
            elif not have_blob or not self.store.exists(d.sha256):
                raise UnknownImage(f"the image bytes {d.sha256} are not in the store", image=d.sha256)
            db.execute(
                "INSERT INTO images (image_id, vo, name, owner, sha256, size, memory, vcpus, created, updated, descriptor,"
                " facts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (d.image_id, d.vo, d.name, d.owner, d.sha256, d.size, d.memory, d.vcpus, now, now, data,
                 pack_facts(element)))
            db.execute("INSERT INTO changes (image_id) VALUES (?)", (d.image_id,))

    def add_many(self, elements: list[etree._Element], check: bool = False,
                 fields: list[dict[str, str]] | None = None) -> None:
        """Insert complete descriptors whose bytes are already in the store, in one transaction (imports,
        benchmarks). Their packed facts are left to the query index, which stores them when it first reads the
        rows (walking each descriptor for them here made a bulk import 1.6x the CPU). With ``check``, a name already taken (DuplicateName) or bytes not in the store
        (UnknownImage) refuse the whole batch; the fault's ``position`` is the descriptor's (1-based).
        ``fields``: each element's :func:`simple_fields` when the caller has them already (an import does)."""
        rows = []
        for n, element in enumerate(elements):
            f = fields[n] if fields is not None else simple_fields(element)
            data = etree.tostring(element, encoding="UTF-8")
            if len(data) > MAX_STORED_DESCRIPTOR_BYTES:
                try:
                    _bounded(data, f["identity.vo"], f["identity.name"])
                except Exception as exc:
                    exc.position = f"{n + 1} ({f['identity.vo']}/{f['identity.name']})"
                    raise
            rows.append((f["identity.imageId"], f["identity.vo"], f["identity.name"], f["identity.owner"],
                         f["image.sha256"], int(f["image.size"]), int(f["hardware.memory"]), int(f["hardware.vcpus"]),
                         f["identity.created"], f["identity.created"], data))
        with self._write("add-many") as db:
            # the bytes, once per distinct sha256; names taken are left to the UNIQUE (vo, name) constraint
            if check and not all(self._has_bytes(db, sha256) for sha256 in {r[4] for r in rows}):
                self._refuse_first(db, rows)
            # A refused row is named inside this transaction, the write lock still held, after the rows inserted
            # before it are undone (the savepoint): the catalogue it reads is the one that refused the insert. Named
            # after the transaction, a name removed in between was found nowhere, and the refusal became an
            # InternalFault.
            db.execute("SAVEPOINT add_many")
            try:
                db.executemany(
                    "INSERT INTO images (image_id, vo, name, owner, sha256, size, memory, vcpus, created, updated,"
                    " descriptor) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError:
                if not check:
                    raise
                db.execute("ROLLBACK TO add_many")
                self._refuse_first(db, rows)    # the first descriptor refused, by position, as checked one by one
                raise
            db.execute("RELEASE add_many")
            db.executemany("INSERT INTO changes (image_id) VALUES (?)", [(r[0],) for r in rows])
        self._bulk_written()

    def _has_bytes(self, db, sha256: str) -> bool:
        return bool(db.execute("SELECT 1 FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
                    and self.store.exists(sha256))

    def _refuse_first(self, db, rows: list[tuple]) -> None:
        """Raise the fault of the first of an add_many's rows refused (a name taken: DuplicateName; bytes not in the
        store: UnknownImage), its ``position`` the row's (1-based), read through ``db`` (the add's transaction)."""
        from services.faults import DuplicateName, UnknownImage

        present: set[str] = set()
        for n, (_image_id, vo, name, _owner, sha256, *_rest) in enumerate(rows, 1):
            if db.execute("SELECT 1 FROM images WHERE vo = ? AND name = ?", (vo, name)).fetchone():
                exc = DuplicateName(f"an image named {name!r} already exists in VO {vo!r}", vo=vo, name=name)
                exc.position = f"{n} ({vo}/{name})"
                raise exc
            if sha256 not in present:
                if not self._has_bytes(db, sha256):
                    exc = UnknownImage(f"the image bytes {sha256} are not in the store", image=sha256)
                    exc.position = f"{n} ({vo}/{name})"
                    raise exc
                present.add(sha256)

    def replace(self, element: etree._Element, updated: str) -> int:
        """Replace a descriptor (same imageId and bytes); returns the new revision."""
        d = Descriptor(element)
        data = _bounded(etree.tostring(element, encoding="UTF-8"), d.vo, d.name)
        from services.faults import DuplicateName, UnknownImage

        with self._write() as db:
            row = db.execute("SELECT revision FROM images WHERE image_id = ?", (d.image_id,)).fetchone()
            if row is None:
                raise UnknownImage(f"no image {d.image_id}", image=d.image_id)
            clash = db.execute("SELECT image_id FROM images WHERE vo = ? AND name = ? AND image_id != ?",
                               (d.vo, d.name, d.image_id)).fetchone()
            if clash:
                raise DuplicateName(f"an image named {d.name!r} already exists in VO {d.vo!r}", vo=d.vo, name=d.name)
            db.execute("UPDATE images SET vo=?, name=?, owner=?, memory=?, vcpus=?, updated=?, revision=revision+1,"
                       " descriptor=?, facts=? WHERE image_id=?",
                       (d.vo, d.name, d.owner, d.memory, d.vcpus, updated, data, pack_facts(element), d.image_id))
            db.execute("INSERT INTO changes (image_id) VALUES (?)", (d.image_id,))
            return row[0] + 1

    def remove(self, image_id: str, now: float | None = None) -> tuple[bool, list[str]]:
        """Remove an image unless held. Returns (bytes deleted, holders). When holders is not
        empty, nothing was removed."""
        now = time.time() if now is None else now
        with self._write() as db:
            holders = [r[0] for r in db.execute("SELECT holder FROM holds WHERE image_id = ? AND expires >= ?",
                                                (image_id, now))]
            if holders:
                return False, holders
            row = db.execute("SELECT sha256 FROM images WHERE image_id = ?", (image_id,)).fetchone()
            if row is None:
                return False, []
            sha = row[0]
            db.execute("DELETE FROM images WHERE image_id = ?", (image_id,))
            db.execute("DELETE FROM holds WHERE image_id = ?", (image_id,))
            db.execute("INSERT INTO changes (image_id) VALUES (?)", (image_id,))
            last = db.execute("SELECT count(*) FROM images WHERE sha256 = ?", (sha,)).fetchone()[0] == 0
            if last:
                db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
        if last:
            # Unlink under the write lock, after the row is gone: an ingest of the same bytes
            # (which adopts under the same lock) cannot interleave. A crash in between leaves an
            # orphan file, which reconcile() removes.
            with self._write() as db:
                if not db.execute("SELECT 1 FROM blobs WHERE sha256 = ?", (sha,)).fetchone():
                    self.store.delete(sha)
                else:
                    last = False
        return last, []

    def hold(self, image_id: str, holder: str, owner: str, seconds: int) -> tuple[str, float]:
        """A hold on ``image_id`` for ``holder`` (asked by ``owner``) for ``seconds``. One hold per image, holder
        and owner: asking again renews it and returns its id, so a holder that never learned the id (a node
        killed before it recorded it) finds its hold again by asking."""
        expires = time.time() + seconds
        with self._write() as db:
            row = db.execute("SELECT hold_id FROM holds WHERE image_id = ? AND holder = ? AND owner = ?",
                             (image_id, holder, owner)).fetchone()
            if row is not None:
                db.execute("UPDATE holds SET expires = ? WHERE hold_id = ?", (expires, row[0]))
                return row[0], expires
            hold_id = "hold-" + uuid.uuid4().hex
            db.execute("INSERT INTO holds (hold_id, image_id, holder, owner, expires) VALUES (?, ?, ?, ?, ?)",
                       (hold_id, image_id, holder, owner, expires))
        return hold_id, expires

    def get_hold(self, hold_id: str) -> tuple[str, str, str, float] | None:
        return self._db().execute("SELECT image_id, holder, owner, expires FROM holds WHERE hold_id = ?",
                                  (hold_id,)).fetchone()

    def release(self, hold_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM holds WHERE hold_id = ?", (hold_id,)).rowcount > 0
