"""The catalogue's query index: the descriptors' facts held column-wise in memory (numpy), so a
criteria query over 100,000 descriptors is a handful of vectorised range scans and bitmap ANDs.

SQLite stays the source of truth: the descriptors themselves, each row carrying its facts packed in one
column (:func:`pack_facts`; written with the descriptor by a registration or an update; a bulk import's rows
and those written before that column existed are read from their XML the first time and packed then). Every catalogue write appends to its ``changes`` log; before
answering, the index catches up on that log (also what other worker processes wrote). New facts
go to a small delta evaluated directly and are merged into the sorted base columns once the delta
grows; removed or replaced images are dropped by clearing their slot in the ``alive`` bitmap.

The columns are also kept on disk beside the catalogue (:meth:`QueryIndex.save`: a JSON header and the
arrays' raw bytes, checked by BLAKE3, mapped into memory at a start rather than read and converted), stamped with the catalogue's identity and the change-log position they reflect. A
start loads them column-wise in a fraction of a second (:meth:`QueryIndex.load`) instead of reading
every row, and only if the stamp still names a position in this catalogue's change log; the
changes after that position are then caught up as for any other write. Anything else (another
catalogue, a log that no longer has that position, an unreadable file) is a rebuild from SQLite, which
reads the packed facts (splitting strings, no XML parsed).
"""
from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import sqlite3
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np
from lxml import etree

from services.descriptor import FIELDS, LIBRARY_PREFIX, NUMBER, VERSION, facts, resolve_field, version_key
from services.vmrepository.query import Budget, Prepared

MERGE_AT = 4096        # delta facts before they are merged into the base columns
REBUILD_AT = 20_000    # changed images in one catch-up past which the index is rebuilt instead
SNAPSHOT_FORMAT = 2    # bump when the saved layout changes: older files are then rebuilt, never misread
NUMERIC_ORDER = ("memory", "vcpus", "size")
ORDER_COLUMNS = ("name", "vo", "owner", "created", "updated", "memory", "vcpus", "size", "image_id")


_TRUSTED = etree.XMLParser(resolve_entities=False, no_network=True)  # the catalogue's own stored, validated XML


@functools.lru_cache(maxsize=4096)
def _kind(path: str) -> str:
    return resolve_field(path)[1]


# -- each row's facts, packed -------------------------------------------------------------------------
SEP = "\x1f"          # between a fact's path and text and between facts: XML 1.0 text can never hold it
PACK_FORMAT = 1
FACTS_VERSION = hashlib.sha256(json.dumps([PACK_FORMAT, sorted(FIELDS.items()), LIBRARY_PREFIX]).encode()).hexdigest()[:16]
"""What a row's packed facts were made by (the format and the fields :func:`facts` reads): a catalogue stamped
with another drops every row's packed facts at its start (they are then read from the XML again)."""
REBUILD_CHUNK = 8192   # rows split at once by a rebuild (bounds the strings alive at a time)


def pack_facts(element: etree._Element) -> str | None:
    """A descriptor's facts (:func:`services.descriptor.facts`) as one string: path, text, path, text, ...
    joined by :data:`SEP`; None for a fact without text (then the row's facts are read from its XML)."""
    return pack_facts_of(facts(element))


def pack_facts_of(fact_list: list[tuple[str, str]]) -> str | None:
    """:func:`pack_facts` of facts already read."""
    flat = []
    for path, text in fact_list:
        if text is None or SEP in text or SEP in path:
            return None
        flat += (path, text)
    return SEP.join(flat)


def unpack_facts(packed: str) -> list[tuple[str, str]]:
    """The (path, text) facts of :func:`pack_facts`' string."""
    if not packed:
        return []
    parts = packed.split(SEP)
    return list(zip(parts[0::2], parts[1::2]))


def _merged_codes(base_unique, base_codes: np.ndarray, delta_values, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The sorted unique values of ``base_unique[base_codes]`` and ``delta_values`` together, and each value's code
    into them (the base's first): what ``np.unique(..., return_inverse=True)`` of the concatenation gives."""
    base_unique = np.asarray(base_unique, dtype=dtype)
    d_unique, d_inverse = np.unique(np.asarray(delta_values, dtype=dtype), return_inverse=True)
    # the delta's values not in the base inserted where they sort (no sort of the base: a name's column has one
    # value per descriptor); a base value's code moves up by the values inserted before it
    base_unique = base_unique.astype(np.result_type(base_unique, d_unique), copy=False)   # the longer strings'
    at = np.searchsorted(base_unique, d_unique)
    found = at < len(base_unique)
    found[found] = base_unique[at[found]] == d_unique[found]
    new_at = at[~found]
    unique = np.insert(base_unique, new_at, d_unique[~found])
    shift = np.searchsorted(new_at, np.arange(len(base_unique)), side="right")
    codes = np.concatenate([(np.arange(len(base_unique)) + shift)[base_codes],
                            np.searchsorted(unique, d_unique)[d_inverse.reshape(-1)]]).astype(np.int64)
    used = np.zeros(len(unique), dtype=bool)
    used[codes] = True
    if not used.all():                                 # values only dead facts had
        codes = (np.cumsum(used) - 1)[codes]
        unique = unique[used]
    return unique, codes.astype(np.int32)


@dataclass
class _Column:
    """One field's facts: sorted unique keys, and per fact its slot, key code and text code."""

    numeric: bool
    ukeys: np.ndarray = None
    utexts: list[str] | np.ndarray = field(default_factory=list)
    slots: np.ndarray = None
    kcodes: np.ndarray = None
    tcodes: np.ndarray = None
    delta: list[tuple[int, object, str]] = field(default_factory=list)

    @classmethod
    def build(cls, numeric: bool, entries: list[tuple[int, object, str]]) -> "_Column":
        if not entries:
            return cls.from_arrays(numeric, np.array([], dtype=np.int32), np.array([]), np.array([], dtype=np.str_))
        slots, keys, texts = zip(*entries)
        return cls.from_arrays(numeric, np.asarray(slots, dtype=np.int32),
                               np.asarray(keys, dtype=np.float64 if numeric else np.str_),
                               np.asarray(texts, dtype=np.str_))

    @classmethod
    def from_texts(cls, kind: str, slots: list[int], texts: list[str]) -> "_Column":
        """A column of one field's facts given as their slots and texts (a rebuild): the same column as
        :meth:`from_arrays`, its keys computed once per distinct text and the texts coded through a dict
        rather than a sort of every fact's text (most of a rebuild's time was that, and one tuple per fact)."""
        numeric = kind == NUMBER
        if not texts:
            return cls.from_arrays(numeric, np.array([], dtype=np.int32), np.array([]), np.array([], dtype=np.str_))
        rank = dict.fromkeys(texts)
        utexts = sorted(rank)
        for i, text in enumerate(utexts):
            rank[text] = i
        tcodes = np.fromiter(map(rank.__getitem__, texts), dtype=np.int32, count=len(texts))
        keys = [float(t) if numeric else version_key(t) if kind == VERSION else t for t in utexts]
        ukeys, kinv = np.unique(np.asarray(keys, dtype=np.float64 if numeric else np.str_), return_inverse=True)
        col = cls(numeric)
        col.slots = np.asarray(slots, dtype=np.int32)
        col.ukeys = ukeys
        col.kcodes = kinv.astype(np.int32).reshape(-1)[tcodes]
        col.utexts = np.asarray(utexts, dtype=np.str_)
        col.tcodes = tcodes
        return col

    @classmethod
    def from_arrays(cls, numeric: bool, slots: np.ndarray, keys: np.ndarray, texts: np.ndarray) -> "_Column":
        """A column of the facts (slot, key, text) given as three arrays of one length."""
        col = cls(numeric)
        if not len(slots):
            col.ukeys = np.array([], dtype=np.float64 if numeric else np.str_)
            col.slots = col.kcodes = col.tcodes = np.array([], dtype=np.int32)
            return col
        col.slots = np.asarray(slots, dtype=np.int32)
        col.ukeys, kcodes = np.unique(np.asarray(keys, dtype=np.float64 if numeric else np.str_), return_inverse=True)
        col.kcodes = kcodes.astype(np.int32)
        utexts, tcodes = np.unique(np.asarray(texts, dtype=np.str_), return_inverse=True)
        col.utexts = utexts
        col.tcodes = tcodes.astype(np.int32)
        return col

    def merged(self, alive: np.ndarray) -> "_Column":
        """This column with its delta folded in and the facts of dead slots dropped, by array operations (a
        catch-up after a bulk import merges millions of facts: one Python tuple each took seconds per 100,000
        descriptors)."""
        keep = alive[self.slots]
        live = [e for e in self.delta if alive[e[0]]]
        d_slots, d_keys, d_texts = zip(*live) if live else ((), (), ())
        ktype = np.float64 if self.numeric else np.str_
        col = _Column(self.numeric)
        col.slots = np.concatenate([self.slots[keep], np.asarray(d_slots, dtype=np.int32)])
        # only the delta's values are sorted; the base's sorted unique values are merged with them and its codes
        # mapped (re-sorting every fact's key and text of a 100,000-descriptor column was most of a catch-up)
        col.ukeys, col.kcodes = _merged_codes(self.ukeys, self.kcodes[keep], d_keys, ktype)
        col.utexts, col.tcodes = _merged_codes(self.utexts, self.tcodes[keep], d_texts, np.str_)
        return col

    def select(self, p: Prepared, mask: np.ndarray, within: np.ndarray | None = None,
               budget: Budget | None = None) -> None:
        """Set mask[slot] for every slot with a fact satisfying p (existentially). ``within`` (the caller's
        VOs' slots) bounds the texts a ``contains`` or ``matches`` looks at: no other VO's text is ever
        tested, so the time a query takes tells nothing about other VOs' descriptions."""
        if p.op in ("contains", "matches"):
            if p.op == "contains":
                test = lambda t: p.key in t.lower()  # noqa: E731
            else:
                test = lambda t: p.regex.search(t) is not None  # noqa: E731
            budget = budget or Budget()
            if len(self.utexts):
                facts = np.ones(len(self.slots), dtype=bool) if within is None else within[self.slots]
                ok = np.zeros(len(self.utexts), dtype=bool)
                for n, code in enumerate(np.unique(self.tcodes[facts]).tolist()):
                    if n % 256 == 0:
                        budget.charge()
                    ok[code] = test(self.utexts[code])
                mask[self.slots[facts & ok[self.tcodes]]] = True
            for n, (slot, _, text) in enumerate(self.delta):
                if n % 256 == 0:
                    budget.charge()
                if (within is None or within[slot]) and test(text):
                    mask[slot] = True
            return
        op = "=" if p.op == "!=" else p.op
        key = p.key
        n = len(self.ukeys)
        lo, hi = {
            "=": (np.searchsorted(self.ukeys, key, "left"), np.searchsorted(self.ukeys, key, "right")),
            "<": (0, np.searchsorted(self.ukeys, key, "left")),
            "<=": (0, np.searchsorted(self.ukeys, key, "right")),
            ">": (np.searchsorted(self.ukeys, key, "right"), n),
            ">=": (np.searchsorted(self.ukeys, key, "left"), n),
        }[op]
        if hi > lo:
            if lo == 0 and hi == n:
                mask[self.slots] = True
            else:
                mask[self.slots[(self.kcodes >= lo) & (self.kcodes < hi)]] = True
        compare = {"=": key.__eq__, "<": key.__gt__, "<=": key.__ge__, ">": key.__lt__, ">=": key.__le__}[op]
        for slot, k, _ in self.delta:
            if compare(k) is True:
                mask[slot] = True


class QueryIndex:
    """Column-wise facts of the live descriptors, kept in step with the catalogue's change log."""

    def __init__(self):
        self.lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        """Empty (the lock stays: a catch-up that rebuilds holds it)."""
        self.last_seq = -1
        self.columns: dict[str, _Column] = {}
        self._slot_of: dict[str, int] | None = {}
        self.alive = np.zeros(0, dtype=bool)
        self.order_values: dict[str, list] = {c: [] for c in ORDER_COLUMNS}
        self._perm: dict[str, np.ndarray] = {}
        self.delta_size = 0
        self.unpacked: list[tuple[str, str]] = []   # (packed facts, image id) of rows read from XML, to be stored

    @property
    def slot_of(self) -> dict[str, int]:
        """The slot of each live image id (built from the loaded columns when first needed)."""
        if self._slot_of is None:
            ids = self.order_values["image_id"]
            live = np.flatnonzero(self.alive[:len(ids)])
            self._slot_of = dict(zip(np.asarray(ids)[live].tolist(), live.tolist()))
        return self._slot_of

    # -- keeping up with the catalogue -----------------------------------------------------------
    def _new_slot(self, row: tuple) -> int:
        if not isinstance(self.order_values["image_id"], list):    # loaded columns: appendable from now on
            self.slot_of
            self.order_values = {name: values.tolist() for name, values in self.order_values.items()}
        slot = len(self.order_values["image_id"])
        for name, value in zip(ORDER_COLUMNS, row):
            self.order_values[name].append(value)
        self.slot_of[row[len(ORDER_COLUMNS) - 1]] = slot
        return slot

    def _grow_alive(self) -> None:
        n = len(self.order_values["image_id"])
        if n > len(self.alive):
            grown = np.zeros(max(n, 2 * len(self.alive), 1024), dtype=bool)
            grown[:len(self.alive)] = self.alive
            self.alive = grown

    def catch_up(self, db: sqlite3.Connection) -> None:
        with self.lock:
            top = db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
            if top == self.last_seq:
                return
            if self.last_seq < 0:
                self._load_all(db)
                return
            rows = db.execute("SELECT seq, image_id FROM changes WHERE seq > ? ORDER BY seq",
                              (self.last_seq,)).fetchall()
            changed = list(dict.fromkeys(image_id for _, image_id in rows))
            if len(changed) >= REBUILD_AT:
                # a bulk import since: reading every row at once (split strings, whole columns) is cheaper
                # than a delta of one tuple per fact merged afterwards
                self._reset()
                self._load_all(db)
                return
            for image_id in changed:
                old = self.slot_of.pop(image_id, None)
                if old is not None:
                    self.alive[old] = False
            self._load(db, changed)
            self.last_seq = max(seq for seq, _ in rows) if rows else top
            self._perm.clear()
            if self.delta_size >= MERGE_AT:
                self._merge()

    def _select_rows(self, db, image_ids: list[str]):
        """These images' order columns, packed facts and (only where those are missing) stored XML."""
        cols = ", ".join(ORDER_COLUMNS)
        out = []
        for i in range(0, len(image_ids), 500):
            chunk = image_ids[i:i + 500]
            out += db.execute(f"SELECT {cols}, facts, CASE WHEN facts IS NULL THEN descriptor END FROM images "
                              f"WHERE image_id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        return out

    def _load(self, db, image_ids: list[str]) -> None:
        """These images' facts into the delta (a catch-up)."""
        width = len(ORDER_COLUMNS)
        for row in self._select_rows(db, image_ids):
            slot = self._new_slot(row[:width])
            packed, data = row[width], row[width + 1]
            if packed is not None:
                fact_list = unpack_facts(packed)
            else:
                fact_list = facts(etree.fromstring(data, _TRUSTED))
                packed = pack_facts_of(fact_list)
                if packed is not None:
                    self.unpacked.append((packed, row[width - 1]))
            for path, txt in fact_list:
                kind = _kind(path)
                col = self.columns.get(path)
                if col is None:
                    col = self.columns[path] = _Column.build(kind == NUMBER, [])
                key = float(txt) if kind == NUMBER else version_key(txt) if kind == VERSION else txt
                col.delta.append((slot, key, txt))
                self.delta_size += 1
        self._grow_alive()
        for image_id in image_ids:
            slot = self.slot_of.get(image_id)
            if slot is not None:
                self.alive[slot] = True

    def _load_all(self, db) -> None:
        """Build every column from SQLite: each row's packed facts split, grouped by field with array
        operations (no XML parsed); a row without packed facts (written before they were stored) is parsed
        and its packed facts kept in :attr:`unpacked` for the catalogue to store."""
        width = len(ORDER_COLUMNS)
        db.execute("BEGIN")
        try:
            top = db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
            rows = db.execute(f"SELECT {', '.join(ORDER_COLUMNS)}, facts, CASE WHEN facts IS NULL "
                              f"THEN descriptor END FROM images").fetchall()
        finally:
            db.execute("COMMIT")
        n = len(rows)
        cols = list(zip(*rows)) if rows else [()] * (width + 2)
        del rows
        self.order_values = {name: list(cols[i]) for i, name in enumerate(ORDER_COLUMNS)}
        self._slot_of = dict(zip(self.order_values["image_id"], range(n)))
        self._grow_alive()
        self.alive[:n] = True
        packed, xml = list(cols[width]), cols[width + 1]
        ids = cols[width - 1]
        del cols
        loose: list[tuple[int, str, str]] = []          # facts of rows whose facts cannot be packed
        for slot in [i for i, p in enumerate(packed) if p is None]:
            fact_list = facts(etree.fromstring(xml[slot], _TRUSTED))
            p = pack_facts_of(fact_list)
            if p is None:
                loose += [(slot, path, text) for path, text in fact_list]
                p = ""
            else:
                self.unpacked.append((p, ids[slot]))
            packed[slot] = p
        pathcode: dict[str, int] = {}
        per_field: list[tuple[list[np.ndarray], list[str]]] = []     # by path code: slots (arrays), texts
        for start in range(0, n, REBUILD_CHUNK):
            chunk = packed[start:start + REBUILD_CHUNK]
            joined = SEP.join(filter(None, chunk))
            if not joined:
                continue
            counts = np.fromiter(((p.count(SEP) + 1) >> 1 if p else 0 for p in chunk), dtype=np.int64, count=len(chunk))
            parts = joined.split(SEP)
            paths, texts = parts[0::2], parts[1::2]
            del parts, joined
            for path in dict.fromkeys(paths):
                if path not in pathcode:
                    pathcode[path] = len(pathcode)
                    per_field.append(([], []))
            codes = np.fromiter(map(pathcode.__getitem__, paths), dtype=np.int32, count=len(paths))
            slots = np.repeat(np.arange(start, start + len(chunk), dtype=np.int32), counts)
            order = np.argsort(codes, kind="stable")
            sorted_codes = codes[order]
            texts_sorted = np.asarray(texts, dtype=object)[order].tolist()
            slots_sorted = slots[order]
            bounds = [0, *(np.flatnonzero(np.diff(sorted_codes)) + 1).tolist(), len(order)]
            for a, b in zip(bounds, bounds[1:]):
                lists = per_field[int(sorted_codes[a])]
                lists[0].append(slots_sorted[a:b])
                lists[1].extend(texts_sorted[a:b])
        for slot, path, text in loose:
            if path not in pathcode:
                pathcode[path] = len(pathcode)
                per_field.append(([], []))
            lists = per_field[pathcode[path]]
            lists[0].append(np.asarray([slot], dtype=np.int32))
            lists[1].append(text)
        for path, code in pathcode.items():
            slot_parts, texts = per_field[code]
            self.columns[path] = _Column.from_texts(_kind(path), np.concatenate(slot_parts), texts)
        self.last_seq = top

    def _merge(self) -> None:
        """Fold the delta into the base columns, dropping facts of dead slots."""
        alive = self.alive
        for path, col in list(self.columns.items()):
            if not col.delta and alive[col.slots].all():
                continue
            self.columns[path] = col.merged(alive)
        self.delta_size = 0

    # -- on disk beside the catalogue ------------------------------------------------------------------
    def save(self, path: Path, catalogue_id: str, last_image_id: str) -> None:
        """Write the columns (delta merged first) with their stamp: this catalogue's id, the change-log
        position they reflect and the image id logged there. Atomic (temporary file, fsync, rename)."""
        with self.lock:
            if self.delta_size:
                self._merge()
            n = len(self.order_values["image_id"])
            arrays: dict[str, np.ndarray] = {
                "alive": self.alive[:n].copy(),
                "fields": np.asarray(sorted(self.columns), dtype=np.str_),
            }
            for name in ORDER_COLUMNS:
                values = self.order_values[name]
                arrays[f"order/{name}"] = np.asarray(values, dtype=np.int64 if name in NUMERIC_ORDER else np.str_)
            self._permutation("name")            # the default order: the first query after a start need not sort
            for name, perm in self._perm.items():
                arrays[f"perm/{name}"] = perm
            for i, path_ in enumerate(sorted(self.columns)):
                col = self.columns[path_]
                arrays[f"col{i}/numeric"] = np.asarray([col.numeric])
                arrays[f"col{i}/ukeys"] = col.ukeys
                arrays[f"col{i}/utexts"] = np.asarray(col.utexts, dtype=np.str_)
                arrays[f"col{i}/slots"] = col.slots
                arrays[f"col{i}/kcodes"] = col.kcodes
                arrays[f"col{i}/tcodes"] = col.tcodes
            stamp = [SNAPSHOT_FORMAT, catalogue_id, self.last_seq, last_image_id]
        write_arrays(Path(path), stamp, arrays)

    @staticmethod
    def read_stamp(path: Path) -> tuple[int, str, int, str] | None:
        """A saved index's (format, catalogue id, change-log position, image id logged there), or None."""
        try:
            fmt, cid, seq, image_id = read_header(Path(path))[0]["stamp"]
            return int(fmt), str(cid), int(seq), str(image_id)
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def load(self, path: Path) -> None:
        """Replace this index by the saved one (the caller has checked its stamp, then catches up). The arrays
        stay in the file's memory mapping (nothing is copied or converted; the order columns become lists
        only when a write first needs to append to them); the file's BLAKE3 is checked first."""
        stamp, z = read_arrays(Path(path))
        fmt, _cid, seq, _image_id = stamp
        if int(fmt) != SNAPSHOT_FORMAT:
            raise ValueError(f"index format {fmt}, not {SNAPSHOT_FORMAT}")
        order_values = {name: z[f"order/{name}"] for name in ORDER_COLUMNS}
        perms = {name: z[f"perm/{name}"] for name in ORDER_COLUMNS if f"perm/{name}" in z}
        alive = z["alive"]
        columns = {}
        for i, path_ in enumerate(z["fields"].tolist()):
            col = _Column(bool(z[f"col{i}/numeric"][0]))
            col.ukeys = z[f"col{i}/ukeys"]
            col.utexts = z[f"col{i}/utexts"]
            col.slots = z[f"col{i}/slots"]
            col.kcodes = z[f"col{i}/kcodes"]
            col.tcodes = z[f"col{i}/tcodes"]
            columns[path_] = col
        n = len(order_values["image_id"])
        if len(alive) != n or any(len(v) != n for v in order_values.values()):
            raise ValueError("index columns of different lengths")
        with self.lock:
            self.order_values = order_values
            self.columns = columns
            self.alive = np.zeros(max(n, 1024), dtype=bool)
            self.alive[:n] = alive
            self._slot_of = None                 # built when a write first needs it
            self._perm = {name: perm for name, perm in perms.items() if len(perm) == n}
            self.delta_size = 0
            self.last_seq = int(seq)

    # -- answering ---------------------------------------------------------------------------------
    def _criterion_mask(self, p: Prepared, within: np.ndarray, budget: Budget) -> np.ndarray:
        mask = np.zeros(len(self.alive), dtype=bool)
        col = self.columns.get(p.path)
        if col is not None:
            col.select(p, mask, within, budget)
        if p.op == "!=":
            mask = ~mask
        return mask & within

    def match(self, groups: list[list[Prepared]], vos: list[str], budget: Budget | None = None) -> np.ndarray:
        """The bitmap of live slots matching an OR of AND groups, within the VOs. The VOs are applied
        first: a criterion only ever looks at the caller's VOs' facts. BadQuery (reason "budget") when
        the query spends its CPU budget (default: QUERY_CPU_SECONDS from now)."""
        budget = budget or Budget()
        within = np.zeros(len(self.alive), dtype=bool)
        col = self.columns.get("identity.vo")
        if col is not None:
            for vo in vos:
                col.select(Prepared("identity.vo", "text", "=", vo, vo), within)
        within &= self.alive
        if not groups or any(not g for g in groups):
            return within
        mask = np.zeros(len(self.alive), dtype=bool)
        for group in groups:
            g = within.copy()
            for p in group:
                budget.charge()
                g &= self._criterion_mask(p, g, budget)
            mask |= g
        return mask

    def _permutation(self, order: str) -> np.ndarray:
        """Slots sorted by (order column, image id); cached until the index changes."""
        perm = self._perm.get(order)
        if perm is None:
            ids = np.asarray(self.order_values["image_id"], dtype=np.str_)
            values = self.order_values[order]
            values = np.asarray(values, dtype=np.float64 if order in ("memory", "vcpus", "size") else np.str_)
            perm = self._perm[order] = np.lexsort((ids, values)) if len(ids) else np.zeros(0, dtype=np.int64)
        return perm

    def page(self, mask: np.ndarray, order: str, descending: bool, offset: int, limit: int) -> list[str]:
        """Image ids of the matching slots, ordered, from offset, at most limit."""
        perm = self._permutation(order)
        hits = perm[mask[:len(perm)][perm]]
        if descending:
            hits = hits[::-1]
        ids = self.order_values["image_id"]
        return [str(ids[i]) for i in hits[offset:offset + limit].tolist()]


# -- the saved index's file: a JSON header and the arrays' raw bytes, mapped (not read) at a start ---------
MAGIC = b"VMGRID-INDEX\n"
ALIGN = 64


def write_arrays(path: Path, stamp: list, arrays: dict[str, np.ndarray]) -> None:
    """``MAGIC``, the header's length (8 bytes, little-endian), the header (JSON: stamp, each array's name, dtype,
    shape and offset, the data's length and BLAKE3), then each array's bytes at an aligned offset. Written to a
    temporary file, fsynced and renamed over ``path``: a reader sees the old file or the new one."""
    entries, pieces, offset = [], [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.hasobject:
            raise ValueError(f"{name}: object arrays are not saved")
        pad = -offset % ALIGN
        pieces += [b"\0" * pad, memoryview(a.reshape(-1).view(np.uint8))]
        offset += pad
        entries.append([name, a.dtype.str, list(a.shape), offset])
        offset += a.nbytes
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for piece in pieces:
        hasher.update(piece)
    header = json.dumps({"stamp": stamp, "arrays": entries, "length": offset, "blake3": hasher.hexdigest()}).encode()
    prefix = MAGIC + struct.pack("<Q", len(header)) + header
    prefix += b"\0" * (-len(prefix) % ALIGN)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")   # writers never share one
    try:
        with open(tmp, "wb") as f:
            f.write(prefix)
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_header(path: Path) -> tuple[dict, int]:
    """The header of a saved index and where its data starts; ValueError when the file is not one."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) != len(MAGIC) + 8 or not head.startswith(MAGIC):
            raise ValueError("not a saved query index")
        (length,) = struct.unpack("<Q", head[len(MAGIC):])
        if length > 64 << 20:
            raise ValueError("index header too long")
        raw = f.read(length)
    if len(raw) != length:
        raise ValueError("index header cut short")
    header = json.loads(raw)
    prefix = len(MAGIC) + 8 + length
    return header, prefix + (-prefix % ALIGN)


def read_arrays(path: Path) -> tuple[list, dict[str, np.ndarray]]:
    """The stamp and the arrays of a saved index, mapped read-only from the file after its length and BLAKE3
    are checked (a file cut short, overwritten or damaged anywhere is refused: ValueError)."""
    header, data_start = read_header(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != data_start + int(header["length"]):
            raise ValueError(f"index file of {size} bytes, its header says {data_start + int(header['length'])}")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = memoryview(mapped)[data_start:]
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update(data)
    if hasher.hexdigest() != header["blake3"]:
        raise ValueError("index file damaged (its BLAKE3 does not match)")
    arrays = {}
    for name, dtype, shape, offset in header["arrays"]:
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ValueError(f"{name}: object arrays are not loaded")
        count = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or offset + count * dt.itemsize > len(data):
            raise ValueError(f"{name}: outside the file")
        arrays[name] = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape)
    return header["stamp"], arrays
