"""The append-only audit log: one JSON line per decision, slot change, admin change and reload (who,
what, on what, which rule, permit or deny, when), each line chained to the one before by its
sha256, so a removed or altered line is detected (:func:`verify_chain`)."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from services.common.xsdtime import format_datetime, now_datetime
from services.faults import is_storage_full

log = logging.getLogger("vmgrid.audit")

GENESIS = "0" * 64


class AuditError(Exception):
    """The audit log is broken: ``line`` is the first line that does not chain."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def _utc() -> str:
    return now_datetime()


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _last_line(path: Path) -> bytes | None:
    """The last complete or partial line of a file, read from its end."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return None
        chunk = 65536
        pos = size
        data = b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
            body = data[:-1] if data.endswith(b"\n") else data
            if b"\n" in body:
                return body.rsplit(b"\n", 1)[1]
        return data[:-1] if data.endswith(b"\n") else data


class AuditLog:
    """Appends records to ``path`` (opened O_APPEND; one write per record). Records get ``time``,
    ``seq`` and ``prev`` (the sha256 of the previous line)."""

    def __init__(self, path: Path, *, fsync: bool = False, max_pending: int = 100_000):
        self.path = Path(path)
        # records not yet written because the disk was full, in order; written before the next one
        self._pending: list[bytes] = []
        self.max_pending = max_pending
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd = os.open(str(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        last = _last_line(self.path)
        self._prev = GENESIS
        self._seq = 0
        if last is not None:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut_short = f.read(1) != b"\n"
            if cut_short:
                os.write(self._fd, b"\n")  # a record cut short by a crash stays, and is chained over
            self._prev = _digest(last)
            try:
                self._seq = int(json.loads(last).get("seq", 0))
            except (ValueError, AttributeError):
                self._seq = 0

    def record(self, event: str, *, sync: bool = False, **fields) -> dict:
        """Append one record; returns it (with time, seq and prev)."""
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self._flush()    # raises the disk-full error: nothing more is decided unaudited
            self._seq += 1
            rec = {"time": _utc(), "seq": self._seq, "event": event,
                   **{k: v for k, v in fields.items() if v is not None}, "prev": self._prev}
            line = json.dumps(rec, separators=(",", ":"), sort_keys=False, ensure_ascii=False).encode()
            self._pending.append(line + b"\n")
            self._prev = _digest(line)
            try:
                self._flush()
                if self.fsync or sync:
                    os.fsync(self._fd)
            except OSError as exc:
                if not is_storage_full(exc):
                    raise
                if len(self._pending) == 1:
                    log.warning("audit log %s: the disk is full; records are kept in memory (up to %d) until "
                                "there is room", self.path, self.max_pending)
            return rec

    def _flush(self) -> None:
        """Write the pending records in order; a record cut short by a full disk is taken back whole."""
        while self._pending:
            data = self._pending[0]
            size = os.fstat(self._fd).st_size
            try:
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, "short write: no space left on device")
            except OSError:
                os.ftruncate(self._fd, size)
                raise
            self._pending.pop(0)

    @property
    def pending(self) -> int:
        """Records kept in memory because the disk is full."""
        return len(self._pending)

    def read(self, *, subject: str | None = None, event: str | None = None, limit: int = 100) -> list[dict]:
        """The newest ``limit`` records (oldest first), optionally only those about/by ``subject`` or of ``event``."""
        out: deque[dict] = deque(maxlen=max(1, limit))
        with open(self.path, "rb") as f:
            for raw in f:
                raw = raw.rstrip(b"\n")
                if not raw:
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if subject and subject not in (rec.get("subject"), rec.get("by")):
                    continue
                if event and rec.get("event") != event:
                    continue
                out.append(rec)
        return list(out)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    self._flush()
                except OSError as exc:
                    log.error("audit log %s: %d record(s) could not be written: %s", self.path,
                              len(self._pending), exc)
                os.close(self._fd)
                self._fd = -1


class RefusalRecorder:
    """Refused calls to the Authorization service, audited without letting one identity grow the log at will.

    Each refusal of an identity for an operation is recorded, except that within ``window`` seconds of the one
    recorded only the first is written and the rest are counted. The count is written as one record
    (``repeated``: how many, ``since``: the seq of the record they repeat, ``last``: when the last of them came,
    ``reasons``: how many for each reason, the first ``max_reasons`` distinct reasons by name and the rest together)
    when the window ends (a timer, every ``tick`` seconds), when more than ``max_keys`` pairs are being counted, or
    at :meth:`close`. Any trusted identity can call the service, and every refusal was a record of about 280 bytes
    (attack G8: no bound at a few hundred signed calls a second); now a pair costs at most two records a window.
    Every refusal is in a record or in a count, and a crash loses at most the counts of one window (attack H5: the
    count waited for the same refusal to come again, so a burst that then stopped was one record until the service
    stopped cleanly, and nothing after a SIGKILL)."""

    def __init__(self, audit: AuditLog, *, window: float = 60.0, max_keys: int = 10_000, max_reasons: int = 8,
                 tick: float = 5.0, clock=time.monotonic):
        self.audit, self.window, self.max_keys, self.clock = audit, window, max_keys, clock
        self.max_reasons, self.tick = max_reasons, tick
        self._lock = threading.Lock()
        # (dn, operation) -> _Counted
        self._open: dict[tuple[str, str], _Counted] = {}
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def refused(self, dn: str, operation: str, reason: str) -> None:
        key = (dn, operation)
        with self._lock:
            now = self.clock()
            held = self._open.get(key)
            if held is not None and now - held.opened < self.window:
                held.count(reason, self.max_reasons)
                return
            if held is not None:
                self._summary(key, self._open.pop(key))
            if len(self._open) >= self.max_keys:
                self._close_all()
            rec = self.audit.record("access", by=dn, operation=operation, result="refused", reason=reason)
            self._open[key] = _Counted(now, rec["seq"], reason)
            if self._timer is None and not self._stop.is_set():
                self._timer = threading.Thread(target=self._run, name="audit-refusals", daemon=True)
                self._timer.start()

    def flush_due(self) -> int:
        """Write the count of each pair whose window has ended (the timer calls this); returns how many pairs."""
        with self._lock:
            now = self.clock()
            due = [key for key, held in self._open.items() if now - held.opened >= self.window]
            for key in due:
                self._summary(key, self._open.pop(key))
            return len(due)

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.flush_due()
            except Exception:                      # a full disk: the audit log keeps them pending, and says so
                log.exception("could not write the counted refusals")

    def _summary(self, key: tuple[str, str], held: "_Counted") -> None:
        if not held.repeated:
            return
        if set(held.reasons) == {held.first_reason} and not held.others:
            reason = f"refused {held.repeated} more time(s) as in record {held.seq}"
        else:
            parts = [f"{n} x {why}" for why, n in held.reasons.items()]
            if held.others:
                parts.append(f"{held.others} x for other reasons")
            reason = f"refused {held.repeated} more time(s) since record {held.seq}: " + "; ".join(parts)
        self.audit.record("access", by=key[0], operation=key[1], result="refused", repeated=held.repeated,
                          since=held.seq, last=format_datetime(held.last), reasons=dict(held.reasons),
                          others=held.others or None, reason=reason)

    def _close_all(self) -> None:
        for key, held in list(self._open.items()):
            self._summary(key, held)
        self._open.clear()

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(timeout=10)
        with self._lock:
            self._close_all()


class _Counted:
    """The refusals of one (identity, operation) counted after the one recorded (``seq``)."""

    __slots__ = ("opened", "seq", "first_reason", "repeated", "reasons", "others", "last")

    def __init__(self, opened: float, seq: int, reason: str):
        self.opened, self.seq, self.first_reason = opened, seq, reason
        self.repeated, self.others, self.last = 0, 0, None
        self.reasons: dict[str, int] = {}

    def count(self, reason: str, max_reasons: int) -> None:
        self.repeated += 1
        self.last = time.time()
        if reason in self.reasons or len(self.reasons) < max_reasons:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        else:
            self.others += 1


def verify_chain(path: Path) -> int:
    """Check that every line of the log chains to the one before; returns the number of records.
    Raises :class:`AuditError` at the first line that was altered, removed or inserted."""
    prev = GENESIS
    count = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip(b"\n")
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise AuditError(str(path), n, "not a JSON record (cut short or altered)") from None
            if rec.get("prev") != prev:
                raise AuditError(str(path), n, "does not chain to the line before (a line was altered, removed "
                                 "or inserted)")
            prev = _digest(line)
            count += 1
    return count
