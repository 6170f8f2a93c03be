"""File checksums for CKSM/SCKS (SHA256, BLAKE3, SHA1, SHA512, MD5, ADLER32), computed with reused buffers.

BLAKE3 (the ``blake3`` package, the Rust reference implementation) is what vmgrid peers verify with when
both ends speak it (it is in the server's FEAT ``CKSM`` list): it hashes several GiB/s on one core, where
SHA-256 without the CPU's SHA extensions runs at 340-385 MiB/s and would be the slowest part of a
transfer. SHA-256 stays the content address and what other GridFTP peers are asked for.

:class:`PrefixHasher` hashes a file while it is still being received out of order: it follows
the contiguous prefix that has reached the disk, so the sha256 is ready moments after the last
block lands instead of costing a second pass over the file.
"""
from __future__ import annotations

import mmap
import os
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


def update_from_file(h, fd: int, start: int, end: int) -> None:
    """Feed ``[start, end)`` of a file to ``h`` straight from the page cache (mmap: no copy).

    The caller guarantees the file is at least ``end`` bytes long (reading a mapping past the end
    of a file would kill the process with SIGBUS).
    """
    gran = mmap.ALLOCATIONGRANULARITY
    pos = start
    while pos < end:
        base = pos - pos % gran
        stop = min(end, base + MAP_WINDOW)
        with mmap.mmap(fd, stop - base, prot=mmap.PROT_READ, offset=base) as m:
            m.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(m)
            try:
                for chunk in range(pos - base, stop - base, CHUNK):
                    h.update(view[chunk:min(chunk + CHUNK, stop - base)])
            finally:
                view.release()
        pos = stop


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
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_fd(fd, algorithm, offset, length)
    finally:
        os.close(fd)


class PrefixHasher:
    """The digest (``algorithm``, SHA256 by default) of a file being written at random offsets, computed
    along its contiguous prefix.

    The writer calls :meth:`advance` with the new end of the contiguous prefix from byte 0;
    a thread reads and hashes up to it. :meth:`finish` waits for ``size`` bytes and returns the
    hex digest. Reading back from the page cache costs a memory copy, not a disk read.
    """

    def __init__(self, fd: int, size: int, algorithm: str = "SHA256"):
        self._fd = fd
        self._size = size
        self._hash = new_hash(algorithm)
        self._hashed = 0
        self._ready = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gridftp-hasher", daemon=True)
        self._thread.start()

    def advance(self, contiguous_end: int) -> None:
        with self._cond:
            if contiguous_end > self._ready:
                self._ready = contiguous_end
                self._cond.notify()

    def _run(self) -> None:
        try:
            while self._hashed < self._size:
                with self._cond:
                    while self._ready <= self._hashed and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    upto = self._ready
                while self._hashed < upto:
                    step = min(upto, self._hashed + MAP_WINDOW)
                    update_from_file(self._hash, self._fd, self._hashed, step)
                    self._hashed = step
        except BaseException as exc:  # reported by finish()
            self._error = exc

    def finish(self) -> str:
        """Hash whatever is left up to the file's size and return the hex digest."""
        if os.fstat(self._fd).st_size < self._size:
            self.abandon()
            raise GridFTPError(f"file shorter than {self._size} bytes")
        self.advance(self._size)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._hashed != self._size:
            raise GridFTPError(f"hashed {self._hashed} of {self._size} bytes")
        return self._hash.hexdigest()

    def abandon(self) -> None:
        """Stop the thread without a result (the transfer failed)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
