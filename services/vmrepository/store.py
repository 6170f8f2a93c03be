"""The image store: image bytes kept once per sha256 (content-addressed), ingested atomically.

Layout under the store root: ``blobs/<aa>/<sha256>`` (complete, verified files only) and ``tmp/``
(ingests in progress; cleared at start). A blob file appears under its final name only by an
atomic rename, done while the catalogue's write lock is held, so the catalogue and the store
never disagree for long: files without a catalogue row are orphans the next start removes.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import blake3

from services.common.crash import crashpoint

CHUNK = 1024 * 1024
QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Ingested:
    """Bytes copied into the store's tmp area, hashed, not yet visible."""

    tmp_path: Path
    sha256: str
    size: int
    blake3: str = ""      # computed in the same pass (nodes verify staged bytes with it)


class ImageStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def ingest(self, source: Path, max_bytes: int | None = None) -> Ingested:
        """Copy a file into tmp/ while hashing it; fsync'd. Raises OSError / ValueError."""
        tmp = self.tmp / f"ingest-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        digest3 = blake3.blake3()
        size = 0
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while True:
                    n = src.readinto(buf)
                    if not n:
                        break
                    size += n
                    if max_bytes is not None and size > max_bytes:
                        raise ValueError(f"image larger than the limit of {max_bytes} bytes")
                    digest.update(view[:n])
                    digest3.update(view[:n])
                    dst.write(view[:n])
                dst.flush()
                os.fsync(dst.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        crashpoint("ingest.copied")
        return Ingested(tmp, digest.hexdigest(), size, digest3.hexdigest())

    def adopt(self, ingested: Ingested) -> Path:
        """Give tmp bytes their final name (atomic rename); a blob already present is kept."""
        final = self.path(ingested.sha256)
        if final.exists():
            ingested.tmp_path.unlink(missing_ok=True)
            return final
        final.parent.mkdir(exist_ok=True)
        os.rename(ingested.tmp_path, final)
        _fsync_dir(final.parent)
        return final

    def discard(self, ingested: Ingested) -> None:
        ingested.tmp_path.unlink(missing_ok=True)

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def all_blobs(self) -> set[str]:
        return {p.name for p in self.blobs.glob("??/*") if p.is_file()}

    def clear_tmp(self) -> int:
        n = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        return n


def image_format_of(path: Path) -> str:
    """qcow2 when the file starts with the qcow2 magic, raw otherwise."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
