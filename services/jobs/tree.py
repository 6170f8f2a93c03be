"""A job's directory counted and removed by the job service (root) while the job's uid may still write in it
(attack13 H2, H4).

Counting (``count_tree``): every entry counts at least one block (``BLOCK``: an empty file, a FIFO, a link, a
directory each take an inode and a block of the host's), the walk follows no symbolic link, holds two fds per level
and goes no deeper than ``MAX_DEPTH`` levels, and stops past ``max_files`` entries. What it could not count (too
deep, too many entries, an error such as EMFILE) is a ``problem``: the caller kills a running job with it, never
takes it for "vanished" (only ENOENT is).

How often (``Counts``): a running job's directory is counted at most every sweep, and the sweeps spend at most about
``WALK_SHARE`` of one core counting (a round that took T seconds is followed by 9 T seconds of rest), the jobs
counted least recently first; a submit reads the last counts, it walks only what was never counted.

Removing (``remove_tree``, ``Trash``): Destroy renames the job's directories aside into ``<state>/trash/`` (its
answer waits for no removal) under a name that keeps its submitter (``<tag>.<key>``), so that what they hold counts
for her until they are gone; a thread of the trash's own removes them bottom up, without recursion and with one fd
at a time, whatever their depth; what it could not remove stays there, is retried at each sweep, and still counts."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from services.jobs.files import DIR_FLAGS, MAX_DEPTH, seal_walk

log = logging.getLogger("vmgrid.JobService")
BLOCK = 4096          # what any entry counts at least: its inode and the block it takes
WALK_SHARE = 0.1      # the share of one core the sweeps spend counting job directories, at most (about)
ENDED_EVERY = 30      # an ended job's directory (a trash entry) is counted again every this many sweep intervals
ROUND = 0.25          # seconds of counting after which a sweep leaves the other directories to the next ones


@dataclass(frozen=True)
class Count:
    bytes: int
    entries: int
    problem: str | None = None      # why the count is not whole ("… nested deeper than 256 levels"): over quota

    def at_least(self, floor: int) -> int:
        """The bytes to hold against a quota: an uncountable directory counts ``floor`` (a job's quota) at least."""
        return self.bytes if self.problem is None else max(self.bytes, floor)


def counted(st: os.stat_result) -> int:
    """What an entry counts: the larger of its size, its allocated blocks and one block. A sparse file costs no disk
    but is hashed and served at its size; blocks reserved past the size (fallocate) are disk taken; an empty file,
    a directory, a link, a FIFO take an inode and a block."""
    return max(st.st_size, st.st_blocks * 512, BLOCK)


def count_tree(top: Path, max_files: int, max_depth: int = MAX_DEPTH) -> Count:
    """What ``top`` holds (itself not counted): each entry ``counted``, directories opened from their parent's fd
    without following a symbolic link (a job that swaps a directory for a link sends the walk nowhere outside).
    ``top`` missing counts nothing; an entry that vanishes meanwhile counts nothing; anything else that stops the
    walk is its ``problem``."""
    total = entries = 0
    try:
        fd = os.open(top, DIR_FLAGS)
    except FileNotFoundError:
        return Count(0, 0)
    except OSError as exc:
        return Count(0, 0, f"could not be counted ({exc.strerror})")
    stack: list[tuple[int, os.ScandirIterator]] = []
    try:
        try:
            stack.append((fd, os.scandir(fd)))
        except OSError:
            os.close(fd)
            raise
        while stack:
            fd, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                it.close()
                os.close(fd)
                stack.pop()
                continue
            entries += 1
            if entries > max_files:
                return Count(total, entries, f"holds more than {max_files} files and directories ([jobs] max_files)")
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue                                  # vanished meanwhile
            total += counted(st)
            if not stat.S_ISDIR(st.st_mode):
                continue
            if len(stack) >= max_depth:
                return Count(total, entries, f"has directories nested deeper than {max_depth} levels")
            try:
                inner = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue                              # vanished, or swapped for a file or a link: counted above
                raise
            try:
                stack.append((inner, os.scandir(inner)))
            except OSError:
                os.close(inner)
                raise
        return Count(total, entries)
    except OSError as exc:                                # EMFILE, ENOMEM, EIO…: not "vanished"
        return Count(total, entries, f"could not be counted ({exc.strerror})")
    finally:
        for fd, it in stack:
            it.close()
            os.close(fd)


@dataclass(frozen=True)
class _Last:
    count: Count
    final: bool          # taken after the job's end (an ended job's, a trash entry's)
    when: float          # when it was taken (the clock's)
    cost: float          # how long it took (seconds of the clock)


def periods(demands: dict[str, tuple[float, float]], share: float = WALK_SHARE) -> dict[str, float]:
    """Seconds between two counts of each directory, by name, from ``demands`` (name -> (what its last count cost,
    the least period it is counted at)): together they take about ``share`` of one core at most, shared out fairly
    (max-min): a directory whose counts at its least period take less than an even share gets its least period, and
    what it leaves goes to the others; an expensive one gets the rest, shared evenly (its cost / its share)."""
    out: dict[str, float] = {}
    left, n = share, len(demands)
    for i, (rate, name, cost, least) in enumerate(sorted((c / p, name, c, p) for name, (c, p) in demands.items())):
        fair = left / (n - i)
        if rate <= fair:
            out[name] = least
            left -= rate
        else:
            out[name] = max(least, cost / fair)
            left -= fair
    return out


class Counts:
    """The last count of each job directory (and trash entry), by name, and when to count them again."""

    def __init__(self, max_files: int, interval: float, clock: Callable[[], float] | None = None):
        self.max_files, self.interval, self.clock = max_files, interval, clock or time.monotonic
        self._last: dict[str, _Last] = {}
        self._lock = threading.Lock()

    def get(self, name: str, top: Path, final: bool = False) -> Count:
        """The last count of ``top`` (counted now if never, or, for an ended job's, not since it ended)."""
        with self._lock:
            last = self._last.get(name)
        if last is not None and (last.final or not final):
            return last.count
        return self._count(name, top, final)

    def refresh(self, tops: dict[str, Path], ended: dict[str, Path] | None = None) -> dict[str, Count]:
        """Count the directories that are due, within this sweep's share of time: the running jobs' ``tops`` every
        sweep interval, the ``ended`` ones (ended jobs', trash entries) every ``ENDED_EVERY``, either less often when
        its counts are expensive (``periods``); the running ones first, the cheap before the expensive, each least
        recently counted first. The fresh counts of ``tops`` by name (the others wait for a later sweep)."""
        ended = {n: p for n, p in (ended or {}).items() if n not in tops}
        now = self.clock()
        with self._lock:
            last = {n: self._last.get(n) for n in (*tops, *ended)}
        least = {n: self.interval if n in tops else self.interval * ENDED_EVERY for n in last}
        rests = periods({n: (prev.cost if prev else 0.0, least[n]) for n, prev in last.items()})
        # an expensive count (one counted less often) after the cheap ones: the round it ends leaves none of them
        due = sorted((n not in tops, rests[n] > least[n], prev.when if prev else float("-inf"), n)
                     for n, prev in last.items()
                     if prev is None or now - prev.when >= rests[n] or (n in ended and not prev.final))
        fresh, started = {}, self.clock()
        for *_, name in due:
            if name in tops:
                fresh[name] = self._count(name, tops[name], False)
            else:
                self._count(name, ended[name], True)
            if self.clock() - started >= ROUND:
                break
        return fresh

    def moved(self, name: str, new: str) -> None:
        with self._lock:
            if name in self._last:
                self._last[new] = self._last.pop(name)

    def keep(self, names: set[str]) -> None:
        """Forget every count but those of ``names`` (destroyed jobs, removed trash)."""
        with self._lock:
            for name in [n for n in self._last if n not in names]:
                del self._last[name]

    def _count(self, name: str, top: Path, final: bool) -> Count:
        started = self.clock()
        count = count_tree(top, self.max_files)
        now = self.clock()
        with self._lock:
            self._last[name] = _Last(count, final, now, now - started)
        return count


def remove_tree(top: Path) -> None:
    """Remove ``top`` and everything under it, bottom up, without recursion, whatever its depth and width: each
    directory made root's 0700 before it is listed (no job's uid changes it after, through an fd it holds either),
    listed once, entered from its parent's fd without following a link, removed from its parent's fd once its
    entry there is still the directory emptied (``files.seal_walk``). Missing: nothing to do. OSError when
    something stays (ESTALE: a directory moved meanwhile; retried later)."""
    parent = os.open(top.parent, DIR_FLAGS)
    try:
        try:
            st = os.stat(top.name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(top.name, dir_fd=parent)
            return
        fd = os.open(top.name, DIR_FLAGS, dir_fd=parent)
        try:
            ids = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            seal_walk(fd, remove=True)
        finally:
            os.close(fd)
        st = os.stat(top.name, dir_fd=parent, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != ids:
            raise OSError(errno.ESTALE, f"{top} was replaced while it was removed")
        os.rmdir(top.name, dir_fd=parent)
    finally:
        os.close(parent)


def owner_tag(dn: str) -> str:
    return hashlib.sha256(dn.encode()).hexdigest()[:16]


class Trash:
    """``<state>/trash/`` (root's, 0700): destroyed jobs' directories, each ``<owner_tag>.<key>`` (the job's
    directory) or ``<owner_tag>.<key>.control`` (its control directory), removed by a thread of its own."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        self._lock = threading.Lock()
        self._running = False
        self._again = False
        self._seen_orphans: set[Path] = set()

    def put(self, path: Path, dn: str, suffix: str = "") -> str | None:
        """Move ``path`` aside (nothing when it is missing); its name in the trash. OSError when it cannot be."""
        name = f"{owner_tag(dn)}.{path.name}{suffix}"
        try:
            os.rename(path, self.path / name)
        except FileNotFoundError:
            return None
        return name

    def of(self, dn: str) -> list[Path]:
        """The entries that still count for ``dn``."""
        tag = owner_tag(dn) + "."
        try:
            return [self.path / n for n in os.listdir(self.path) if n.startswith(tag)]
        except FileNotFoundError:
            return []

    def orphans(self, found: set[Path]) -> set[Path]:
        """Of directories ``found`` without a job's record, those found so at the previous call too (never one a
        submit is making)."""
        old, self._seen_orphans = self._seen_orphans, set(found)
        return found & old

    def empty(self) -> None:
        """Remove every entry, in a thread of the trash's own (one at a time); what fails is logged and stays."""
        with self._lock:
            if self._running:
                self._again = True
                return
            try:
                if not os.listdir(self.path):
                    return
            except FileNotFoundError:
                return
            self._running, self._again = True, False
        threading.Thread(target=self._empty, name="vmgrid-jobs-trash", daemon=True).start()

    def _empty(self) -> None:
        try:
            while True:
                for name in sorted(os.listdir(self.path)):
                    try:
                        remove_tree(self.path / name)
                    except OSError as exc:
                        log.warning("could not remove %s yet (%s): it stays, counted for its submitter, and is "
                                    "tried again at the next sweep", self.path / name, exc.strerror or exc)
                with self._lock:
                    if not self._again:
                        self._running = False
                        return
                    self._again = False
        except BaseException:
            with self._lock:
                self._running = False
            log.exception("the removal of destroyed jobs' directories failed")
