"""qcow2 disks for the node: empty qcow2 disks and copy-on-write overlays on a cached base image, written
in process (a new qcow2 file is a header, a one-entry refcount table, one refcount block and an empty L1
table: four clusters, mostly zeros; the layout is the public qcow2 specification, docs/interop/qcow2.txt
in QEMU's sources, and it is what ``qemu-img create -f qcow2`` writes). qemu-img is still run for what
is not a fresh file (``rebase``) and for a base image in a format other than qcow2 or raw.
tests/unit/vmmanager/test_qemuimg.py checks every file with ``qemu-img check`` and ``qemu-img info``."""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

QCOW2_MAGIC = b"QFI\xfb"
CLUSTER_BITS = 16                       # 64 KiB clusters, qemu-img's default
CLUSTER = 1 << CLUSTER_BITS
HEADER_LENGTH = 112                     # version 3 header with the compression type byte, padded to 8
EXT_BACKING_FORMAT = 0xE2792ACA
MAX_BACKING_NAME = 1023                 # QEMU refuses longer backing file names


def _run(args: list[str]) -> None:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"qemu-img {args[0]} failed: {r.stderr.strip()}")


def _pad8(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


def qcow2_bytes(size: int, backing: str | None = None, backing_format: str | None = None) -> bytes:
    """A new, empty qcow2 (version 3, 64 KiB clusters, 16-bit refcounts) of virtual ``size`` bytes,
    optionally backed by ``backing`` (an absolute file name) in ``backing_format``.

    Cluster 0 the header (+ the backing format extension and the backing file name), cluster 1 the
    refcount table, cluster 2 its one refcount block, clusters 3.. the L1 table (all entries 0: nothing
    allocated, every read goes to the backing file or reads zeros)."""
    if size < 0:
        raise ValueError("a disk's size cannot be negative")
    size = -(-size // 512) * 512                            # whole sectors, as qemu-img rounds it
    l2_covers = CLUSTER * (CLUSTER // 8)                    # bytes one L2 table maps
    l1_size = max(1, -(-size // l2_covers))
    l1_clusters = -(-l1_size * 8 // CLUSTER)
    clusters = 3 + l1_clusters
    if clusters > CLUSTER // 2:                             # one refcount block counts 32768 clusters
        raise ValueError(f"a {size}-byte disk is larger than this writer makes")
    ext = b""
    name = b""
    if backing is not None:
        name = os.fsencode(backing)
        if not name or len(name) > MAX_BACKING_NAME:
            raise ValueError("the backing file name must be 1 to 1023 bytes")
        fmt = (backing_format or "").encode("ascii")
        ext = struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + _pad8(fmt)
    ext += struct.pack(">II", 0, 0)                         # end of the header extensions
    backing_offset = HEADER_LENGTH + len(ext) if name else 0
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        QCOW2_MAGIC, 3,
        backing_offset, len(name),
        CLUSTER_BITS, size,
        0,                                                  # crypt_method: none
        l1_size, 3 * CLUSTER,                               # L1 table
        1 * CLUSTER, 1,                                     # refcount table: one cluster
        0, 0,                                               # snapshots: none
        0, 0, 0,                                            # incompatible, compatible, autoclear features
        4, HEADER_LENGTH)                                   # refcount_order 4 (16 bits)
    header = header + b"\0" * (HEADER_LENGTH - len(header))    # compression type 0 (zlib) and padding
    first = header + ext + name
    refcount_table = struct.pack(">Q", 2 * CLUSTER)
    refcount_block = struct.pack(f">{clusters}H", *([1] * clusters))
    out = bytearray(3 * CLUSTER + l1_size * 8)
    out[0:len(first)] = first
    out[CLUSTER:CLUSTER + 8] = refcount_table
    out[2 * CLUSTER:2 * CLUSTER + len(refcount_block)] = refcount_block
    return bytes(out)


def virtual_size(path: Path, fmt: str) -> int | None:
    """The virtual size of a qcow2 or raw image, read from its header or its length; None for another format."""
    if fmt == "raw":
        return os.path.getsize(path)
    if fmt == "qcow2":
        with open(path, "rb") as f:
            head = f.read(32)
        if len(head) < 32 or head[:4] != QCOW2_MAGIC:
            raise OSError(f"{path} is not a qcow2 image")
        return struct.unpack_from(">Q", head, 24)[0]
    return None


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def create_empty(path: Path, size: int) -> Path:
    """An empty qcow2 disk of ``size`` bytes (data and scratch disks)."""
    return _write(Path(path), qcow2_bytes(size))


def create_overlay(base: Path, base_format: str, dest: Path) -> Path:
    """A qcow2 overlay at ``dest`` whose backing file is ``base`` (in ``base_format``), of the base's size."""
    dest = Path(dest)
    # absolute: QEMU reads a relative backing file name relative to the overlay's own directory
    base = Path(base).absolute()
    size = virtual_size(base, base_format)
    if size is None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _run(["create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(dest)])
        return dest
    return _write(dest, qcow2_bytes(size, str(base), base_format))


def rebase_unsafe(overlay: Path, base: Path, base_format: str) -> Path:
    """Point an overlay at another copy of the same base image (a migrated overlay on this node's cache)."""
    _run(["rebase", "-u", "-F", base_format, "-b", str(base), str(overlay)])
    return overlay
