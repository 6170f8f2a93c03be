"""File checksums for CKSM/SCKS (SHA256, BLAKE3, SHA1, SHA512, MD5, ADLER32), computed with reused buffers.

BLAKE3 (the ``blake3`` package, the Rust reference implementation) is what vmgrid peers verify with when
both ends speak it (it is in the server's FEAT ``CKSM`` list): it hashes several GiB/s on one core, where
SHA-256 without the CPU's SHA extensions runs at 340-385 MiB/s and would be the slowest part of a
transfer. SHA-256 stays the content address and what other GridFTP peers are asked for.

:class:`PrefixHasher` hashes a file while it is still being received out of order: it follows
the contiguous prefix that has reached the disk, so the sha256 is ready moments after the last
block lands instead of costing a second pass over the file. It hashes at the lowest CPU priority while the data
arrives, so that it takes the CPU time the data path leaves idle rather than the data path's turns, and leaves
the rest to the caller of :meth:`PrefixHasher.finish`.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
import threading
import zlib
from collections.abc import Callable

import blake3 as _blake3

from .errors import GridFTPError

CHUNK = 4 << 20


class _Adler32:
    """hashlib-like wrapper around zlib.adler32 (GridFTP's ADLER32 is 8 lowercase hex digits)."""

    def __init__(self) -> None:
        self._value = 1

    def update(self, data) -> None:
        self._value = zlib.adler32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def _blake3_hasher():
    """BLAKE3 over every core for large updates (the Rust implementation splits the input itself)."""
    return _blake3.blake3(max_threads=_blake3.blake3.AUTO)


def _hashlib(name: str) -> Callable[[], object]:
    """hashlib's constructor ``name``, imported on first use: hashlib loads OpenSSL's libcrypto (about 3 ms of a
    process's start), which a BLAKE3-verified download never needs."""

    def new():
        import hashlib
        return getattr(hashlib, name)()

    return new


ALGORITHMS: dict[str, Callable[[], object]] = {
    "SHA256": _hashlib("sha256"),
    "BLAKE3": _blake3_hasher,
    "SHA1": _hashlib("sha1"),
    "SHA512": _hashlib("sha512"),
    "MD5": _hashlib("md5"),
    "ADLER32": _Adler32,
}


class UnknownAlgorithm(GridFTPError):
    """A checksum algorithm other than those in :data:`ALGORITHMS`."""


def new_hash(algorithm: str):
    try:
        return ALGORITHMS[algorithm.upper()]()
    except KeyError:
        raise UnknownAlgorithm(f"unsupported checksum algorithm {algorithm!r}") from None


MAP_WINDOW = 64 << 20


def update_from_file(h, fd: int, start: int, end: int, stop: Callable[[], bool] | None = None,
                     chunk: int = CHUNK) -> int:
    """Feed ``[start, end)`` of a file to ``h`` straight from the page cache (mmap: no copy); returns where it
    stopped: ``end``, or earlier (at a ``chunk`` boundary) once ``stop()`` says so.

    The caller guarantees the file is at least ``end`` bytes long (reading a mapping past the end
    of a file would kill the process with SIGBUS).
    """
    gran = mmap.ALLOCATIONGRANULARITY
    pos = start
    while pos < end:
        base = pos - pos % gran
        window_end = min(end, base + MAP_WINDOW)
        with mmap.mmap(fd, window_end - base, prot=mmap.PROT_READ, offset=base) as m:
            m.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(m)
            try:
                for piece in range(pos - base, window_end - base, chunk):
                    if stop is not None and stop():
                        return base + piece
                    h.update(view[piece:min(piece + chunk, window_end - base)])
            finally:
                view.release()
        pos = window_end
    return end


def hash_fd(fd: int, algorithm: str, offset: int = 0, length: int = -1) -> str:
    """Hex digest of ``length`` bytes of an open file from ``offset`` (-1: to end of file)."""
    h = new_hash(algorithm)
    size = os.fstat(fd).st_size
    if length < 0:
        length = max(0, size - offset)
    if offset + length > size:
        raise GridFTPError(f"file shorter than {offset + length} bytes")
    update_from_file(h, fd, offset, offset + length)
    return h.hexdigest()


def hash_file(path: str | os.PathLike, algorithm: str = "SHA256", offset: int = 0, length: int = -1) -> str:
    """Hex digest of a plain file (or a range of it); anything else (a FIFO put in a file's place, whose open
    would wait for a writer for ever, a device) raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{os.fspath(path)} is not a plain file")
        h = new_hash(algorithm)
        size = os.fstat(fd).st_size
        end = size if length < 0 else offset + length
        if end > size:
            raise GridFTPError(f"file shorter than {end} bytes")
        update_from_reads(h, fd, offset, end)
        return h.hexdigest()
    finally:
        os.close(fd)


def update_from_reads(h, fd: int, start: int, end: int, chunk: int = CHUNK) -> None:
    """Feed ``[start, end)`` of a file to ``h`` by reading it (a copy, about 10 % slower than
    :func:`update_from_file` for SHA-256): for files another party may truncate meanwhile (a served file, a job's
    output), whose mapping would kill the process with SIGBUS. A file that shrinks raises OSError."""
    buf = bytearray(min(chunk, max(0, end - start)) or 1)
    view = memoryview(buf)
    pos = start
    try:
        while pos < end:
            n = os.preadv(fd, [view[:min(len(buf), end - pos)]], pos)
            if n == 0:
                raise OSError(errno.EIO, f"the file shrank to {pos} bytes while it was hashed")
            h.update(view[:n])
            pos += n
    finally:
        view.release()


BACKGROUND_NICE = 19            # the prefix hasher's priority while the data still arrives (Linux nice value)
MAX_HASH_THREADS = 4            # BLAKE3 workers of one prefix hasher: 4 hash over 10 GiB/s, beyond any link
BACKGROUND_CHUNK = 1 << 20      # the low-priority thread's updates: finish() waits for one at most, at that priority


def _background_priority() -> None:
    """Lower the calling thread's CPU priority to :data:`BACKGROUND_NICE` (Linux keeps a nice value per thread,
    and threads it starts inherit it). Raising a nice value needs no privilege; failures are ignored."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        except OSError:
            pass


def _prefix_hash(algorithm: str):
    """A hash object for :class:`PrefixHasher`: BLAKE3 with a pool of its own (started by the calling thread, so
    its workers take that thread's priority, not the process-wide pool's), anything else as :func:`new_hash`."""
    if algorithm.upper() == "BLAKE3":
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return _blake3.blake3(max_threads=max(1, min(MAX_HASH_THREADS, cpus)))
    return new_hash(algorithm)


class PrefixHasher:
    """The digest (``algorithm``, SHA256 by default) of a file being written at random offsets, computed
    along its contiguous prefix.

    The writer calls :meth:`advance` with the new end of the contiguous prefix from byte 0;
    a thread reads and hashes up to it. :meth:`finish` waits for ``size`` bytes and returns the
    hex digest. Reading back from the page cache costs a memory copy, not a disk read.

    While the data arrives the thread hashes at the lowest CPU priority (nice 19, and so do the BLAKE3 workers it
    starts): on a machine with fewer CPUs than busy threads (a loopback transfer on two CPUs: the sender, the
    receiver and the hash) it uses the CPU time the receiving and sending threads leave idle instead of taking
    their turns, so the data moves at the speed it would without verification. What is left when the last byte
    has landed, :meth:`finish` hashes in the calling thread at that thread's priority, on all the CPUs the hash
    can use, so that a busy machine does not starve the verification at the end. ``tail_bytes`` says how much
    that was.
    """

    def __init__(self, fd: int, size: int, algorithm: str = "SHA256"):
        self._fd = fd
        self._size = size
        self._algorithm = algorithm
        self._hash = None           # made by the thread, after it has lowered its priority
        self._hashed = 0
        self._ready = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._handover = False      # finish() takes over: the thread stops at its next chunk
        self._error: BaseException | None = None
        self.tail_bytes = 0         # what finish() hashed itself
        self._thread = threading.Thread(target=self._run, name="gridftp-hasher", daemon=True)
        self._thread.start()

    def advance(self, contiguous_end: int) -> None:
        with self._cond:
            if contiguous_end > self._ready:
                self._ready = contiguous_end
                self._cond.notify()

    def _quit(self) -> bool:
        return self._stopped or self._handover

    def _run(self) -> None:
        try:
            _background_priority()
            self._hash = _prefix_hash(self._algorithm)
            while self._hashed < self._size:
                with self._cond:
                    while self._ready <= self._hashed and not self._quit():
                        self._cond.wait()
                    if self._quit():
                        return
                    upto = self._ready
                self._hashed = update_from_file(self._hash, self._fd, self._hashed, upto, self._quit,
                                                BACKGROUND_CHUNK)
        except BaseException as exc:  # reported by finish()
            self._error = exc

    def finish(self) -> str:
        """Hash whatever is left up to the file's size, here, and return the hex digest."""
        if os.fstat(self._fd).st_size < self._size:
            self.abandon()
            raise GridFTPError(f"file shorter than {self._size} bytes")
        with self._cond:
            self._handover = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        h = self._hash
        if h is None or self._hashed < self._size:
            # a copy made here: BLAKE3's copy starts its own workers from this thread, at its priority
            h = _prefix_hash(self._algorithm) if h is None else h.copy()
            self.tail_bytes = self._size - self._hashed
            self._hashed = update_from_file(h, self._fd, self._hashed, self._size)
        if self._hashed != self._size:
            raise GridFTPError(f"hashed {self._hashed} of {self._size} bytes")
        return h.hexdigest()

    def abandon(self) -> None:
        """Stop the thread without a result (the transfer failed)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
