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

from services.jobs.files import DIR_FLAGS

log = logging.getLogger("vmgrid.JobService")
BLOCK = 4096          # what any entry counts at least: its inode and the block it takes
MAX_DEPTH = 256       # directory levels a job's directory may have under it
WALK_SHARE = 0.1      # the share of one core the sweeps spend counting job directories, at most (about)
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


class Counts:
    """The last count of each job directory (and trash entry), by name, and when to count them again."""

    def __init__(self, max_files: int, interval: float):
        self.max_files, self.interval = max_files, interval
        self._last: dict[str, tuple[Count, bool, float]] = {}     # name -> (count, of an ended job's, when)
        self._rest_until = 0.0
        self._lock = threading.Lock()

    def get(self, name: str, top: Path, final: bool = False) -> Count:
        """The last count of ``top`` (counted now if never, or, for an ended job's, not since it ended)."""
        with self._lock:
            last = self._last.get(name)
        if last is not None and (last[1] or not final):
            return last[0]
        return self._count(name, top, final)

    def refresh(self, tops: dict[str, Path]) -> dict[str, Count]:
        """Count the running jobs' directories ``tops`` that are due, least recently counted first, within this
        sweep's share of time; the fresh counts by name (the others wait for a later sweep)."""
        now = time.monotonic()
        if now < self._rest_until:
            return {}
        with self._lock:
            due = sorted((self._last[n][2] if n in self._last else 0.0, n) for n in tops)
        fresh, started = {}, time.monotonic()
        for when, name in due:
            if when and now - when < self.interval:
                continue
            fresh[name] = self._count(name, tops[name], False)
            if time.monotonic() - started >= ROUND:
                break
        took = time.monotonic() - started
        self._rest_until = time.monotonic() + took * (1 - WALK_SHARE) / WALK_SHARE
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
        count = count_tree(top, self.max_files)
        with self._lock:
            self._last[name] = (count, final, time.monotonic())
        return count


def remove_tree(top: Path) -> None:
    """Remove ``top`` and everything under it, bottom up, without recursion and holding one directory fd at a
    time (plus a listing's), whatever the depth: up through ``..``, checked to be the directory come down from (a
    running job that moves a directory elsewhere stops the removal: OSError, retried later). Missing: nothing to
    do. OSError when something stays (ENOTEMPTY: a job still writing there)."""
    parent = os.open(top.parent, DIR_FLAGS)
    fd = -1
    try:
        try:
            st = os.stat(top.name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(top.name, dir_fd=parent)
            return
        fd = os.open(top.name, DIR_FLAGS, dir_fd=parent)
        ids = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino)]
        names: list[str] = []
        while True:
            inner = None
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        try:
                            inner = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
                        except OSError as exc:
                            if exc.errno in (errno.ENOTDIR, errno.ELOOP):      # swapped: removed as a file
                                _unlink(entry.name, fd)
                            elif exc.errno != errno.ENOENT:
                                raise
                            continue
                        names.append(entry.name)
                        break
                    _unlink(entry.name, fd)
            if inner is not None:
                os.close(fd)
                fd = inner
                ist = os.fstat(fd)
                ids.append((ist.st_dev, ist.st_ino))
                continue
            if not names:
                break
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            ust = os.fstat(up)
            os.close(fd)
            fd = up
            if (ust.st_dev, ust.st_ino) != ids[-2]:
                raise OSError(errno.ESTALE, f"a directory under {top} was moved while it was removed")
            ids.pop()
            try:
                os.rmdir(names.pop(), dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:        # written meanwhile: listed again and emptied
                    raise
        os.close(fd)
        fd = -1
        os.rmdir(top.name, dir_fd=parent)
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(parent)


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


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
