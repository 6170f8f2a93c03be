"""A space reserve: a file of preallocated bytes in a service's state directory, given up when the disk is
full so that the write which frees space (a removal) can still be recorded, and taken again afterwards."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("vmgrid.reserve")


class SpaceReserve:
    def __init__(self, path: Path, size: int):
        self.path = Path(path)
        self.size = size
        self._lock = threading.Lock()
        self.restore()

    @property
    def held(self) -> bool:
        return self.size > 0 and self.path.is_file() and self.path.stat().st_size >= self.size

    def release(self) -> bool:
        """Give the reserved space back to the disk; False if there was none to give."""
        with self._lock:
            if not self.held:
                return False
            self.path.unlink(missing_ok=True)
            return True

    def restore(self) -> bool:
        """Take the reserve again if the disk has room for it (never raises)."""
        if self.size <= 0:
            return False
        with self._lock:
            if self.held:
                return True
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.size)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
                return True
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                log.warning("no space reserve at %s (%s)", self.path, exc.strerror)
                return False


def release_if_full(state_dir: Path, needed: int = 1024 * 1024) -> list[Path]:
    """At start: when the disk holding ``state_dir`` has less than ``needed`` bytes free, give up the services'
    space reserves (``<state_dir>/<service>/reserve``) so their databases can open (SQLite needs a little
    room for its shared-memory file even to read). Returns the reserves released."""
    root = Path(state_dir)
    try:
        st = os.statvfs(root)
    except OSError:
        return []
    if st.f_bavail * st.f_frsize >= needed:
        return []
    released = []
    for path in sorted(root.glob("*/reserve")):
        path.unlink(missing_ok=True)
        released.append(path)
        log.warning("the disk holding %s is full: released the space reserve %s to start", root, path)
    return released
