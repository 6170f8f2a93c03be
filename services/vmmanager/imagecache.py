"""The node's image cache: base images keyed by sha256, fetched once (also under concurrent
deploys), verified, and shared by the instances' copy-on-write qcow2 overlays."""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Protocol

from services.faults import ChecksumMismatch, StorageFull, TransferFault, is_storage_full
from services.vmmanager import qemuimg
from services.vmmanager.store import NodeStore

TOUCH_EVERY = 60.0      # seconds between two records of a cached image's last use (eviction order)

log = logging.getLogger("vmgrid.vmmanager.cache")

Progress = Callable[[int, int], None]


class ImageSource(Protocol):
    """Where base images come from (the VMRepository's GridFTP server)."""

    def fetch(self, image_id: str, sha256: str, size: int, dest: Path, progress: Progress,
              blake3: str | None = None) -> None:
        """Write the image to ``dest``, only once its bytes verified against sha256, or against ``blake3``
        when the descriptor carries it (the same bytes, hashed several times faster); or raise
        TransferFault / ChecksumMismatch (and leave nothing at ``dest``)."""
        ...


class ImageCache:
    def __init__(self, root: Path, store: NodeStore, source: ImageSource):
        self.root = Path(root)
        self.images = self.root / "images"
        self.incoming = self.root / "incoming"
        self.images.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.source = source
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._inflight: dict[str, Future] = {}
        self._progress: dict[str, tuple[int, int]] = {}
        self.fetches = 0  # how many fetches this process started (tests: 20 deploys, one fetch)

    def path(self, sha256: str) -> Path:
        return self.images / sha256

    def progress(self, sha256: str) -> tuple[int, int] | None:
        return self._progress.get(sha256)

    def get(self, image_id: str, sha256: str, size: int, fmt: str, progress: Progress | None = None,
            blake3: str | None = None) -> tuple[Path, bool]:
        """The cached base image (fetching it if needed, verified by ``blake3`` when the descriptor gives
        it, else by sha256); returns (path, was it already cached). Concurrent calls for one image wait
        for a single fetch."""
        path = self.path(sha256)
        with self._lock:
            if self.store.cached(sha256) and path.is_file():
                now = time.monotonic()
                if now - self._touched.get(sha256, -TOUCH_EVERY) >= TOUCH_EVERY:   # LRU order, not a write per deploy
                    self.store.touch_cached(sha256)
                    self._touched[sha256] = now
                return path, True
            fut = self._inflight.get(sha256)
            leader = fut is None
            if leader:
                fut = self._inflight[sha256] = Future()
                self.fetches += 1
        if not leader:
            if progress:
                self._follow(sha256, fut, progress)
            fut.result()
            return path, False
        try:
            self._fetch(image_id, sha256, size, fmt, progress, blake3)
            fut.set_result(path)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(sha256, None)
                self._progress.pop(sha256, None)
        return path, False

    def _follow(self, sha256: str, fut: Future, progress: Progress) -> None:
        while not fut.done():
            p = self._progress.get(sha256)
            if p:
                progress(*p)
            try:
                fut.exception(timeout=0.2)
            except TimeoutError:
                continue
            except Exception:
                break

    def _fetch(self, image_id: str, sha256: str, size: int, fmt: str, progress: Progress | None,
               blake3: str | None = None) -> None:
        part = self.incoming / sha256

        def report(done: int, total: int) -> None:
            self._progress[sha256] = (done, total)
            if progress:
                progress(done, total)

        report(0, size)
        try:
            # the source verifies the bytes against sha256 as they arrive (GridFTP: the whole file
            # against the expected digest before it takes its name); the size is checked here
            self.source.fetch(image_id, sha256, size, part, report, blake3)
            if part.stat().st_size != size:
                raise ChecksumMismatch(f"the staged image has {part.stat().st_size} bytes, not {size}",
                                       expected=str(size), actual=str(part.stat().st_size))
        except (ChecksumMismatch, TransferFault):
            part.unlink(missing_ok=True)
            raise
        except StorageFull:
            self._drop_partial(part)    # on a full disk its bytes are worth less than the space they hold
            raise
        except OSError as exc:
            if is_storage_full(exc):
                self._drop_partial(part)
                raise StorageFull(f"the node's image cache is full: staging {image_id} stopped: {exc.strerror}",
                                  store=f"VMManager image cache {self.root}") from None
            part.unlink(missing_ok=True)
            raise TransferFault(f"staging {image_id} failed: {exc}", source=image_id) from None
        os.replace(part, self.path(sha256))
        self.store.add_cached(sha256, size, fmt)
        report(size, size)
        log.info("cached %s (%s, %d bytes)", sha256, image_id, size)

    @staticmethod
    def _drop_partial(part: Path) -> None:
        """A staging's received bytes and their range markers, written or being written (kept otherwise, so that a
        retry fetches only the rest). The name is a hex digest: no pattern characters."""
        for p in part.parent.glob(part.name + "*"):
            p.unlink(missing_ok=True)

    def overlay(self, sha256: str, fmt: str, dest: Path) -> Path:
        """A copy-on-write qcow2 overlay on the cached base image."""
        return qemuimg.create_overlay(self.path(sha256), fmt, dest)

    def reconcile(self) -> dict[str, int]:
        """At start: drop partial fetches; forget cache rows whose file is gone; adopt complete files the
        database does not know only when they verify, delete the others."""
        partial = 0
        for p in self.incoming.iterdir():
            if p.is_file() and not p.name.endswith((".vmgrid-part", ".ranges")):
                p.unlink()
                partial += 1
        entries = self.store.cache_entries()
        forgotten = 0
        for sha in entries:
            if not self.path(sha).is_file():
                self.store.drop_cached(sha)
                forgotten += 1
        stray = 0
        for p in self.images.iterdir():
            if p.name not in entries:
                p.unlink()
                stray += 1
        return {"partial_removed": partial, "rows_forgotten": forgotten, "stray_removed": stray}
