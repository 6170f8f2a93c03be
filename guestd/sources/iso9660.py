"""Read one file from the root directory of an ISO 9660 image (Joliet names if present), no mounting."""
from __future__ import annotations

import struct
from typing import BinaryIO

SECTOR = 2048
MAX_FILE = 1024 * 1024


class ISOError(ValueError):
    """Not an ISO 9660 image, or the file is not in its root directory."""


def _volume_descriptors(f: BinaryIO):
    for sector in range(16, 64):
        f.seek(sector * SECTOR)
        vd = f.read(SECTOR)
        if len(vd) < SECTOR or vd[1:6] != b"CD001":
            raise ISOError("no ISO 9660 volume descriptor")
        if vd[0] == 255:
            return
        yield vd


def volume_label(f: BinaryIO) -> str:
    """The primary volume identifier (what genisoimage -V set)."""
    for vd in _volume_descriptors(f):
        if vd[0] == 1:
            return vd[40:72].decode("ascii", "replace").strip()
    raise ISOError("no primary volume descriptor")


def read_file(f: BinaryIO, name: str) -> bytes:
    """The bytes of root-directory file ``name`` (case-insensitive; Joliet preferred, then ISO names)."""
    primary = joliet = None
    for vd in _volume_descriptors(f):
        if vd[0] == 1:
            primary = vd
        elif vd[0] == 2 and vd[88:91] in (b"%/@", b"%/C", b"%/E"):
            joliet = vd
    for vd, encoding in ((joliet, "utf-16-be"), (primary, "ascii")):
        if vd is None:
            continue
        root = vd[156:190]
        extent, size = struct.unpack_from("<I", root, 2)[0], struct.unpack_from("<I", root, 10)[0]
        found = _find(f, extent, min(size, 64 * SECTOR), name, encoding)
        if found is not None:
            return found
    raise ISOError(f"{name} is not in the image's root directory")


def _find(f: BinaryIO, extent: int, size: int, name: str, encoding: str) -> bytes | None:
    f.seek(extent * SECTOR)
    data = f.read(size)
    pos = 0
    wanted = name.lower()
    while pos < len(data):
        length = data[pos]
        if length == 0:                       # records do not cross sectors: skip to the next one
            pos = (pos // SECTOR + 1) * SECTOR
            continue
        record = data[pos:pos + length]
        pos += length
        if len(record) < 34:
            break
        flags, name_len = record[25], record[32]
        raw = record[33:33 + name_len]
        if flags & 2 or raw in (b"\0", b"\1"):
            continue
        entry = raw.decode(encoding, "replace").split(";")[0].rstrip(".").lower()
        if entry == wanted or (encoding == "ascii" and entry == _iso_level1(wanted)):
            file_extent = struct.unpack_from("<I", record, 2)[0]
            file_size = struct.unpack_from("<I", record, 10)[0]
            if file_size > MAX_FILE:
                raise ISOError(f"{name} is {file_size} bytes, more than {MAX_FILE}")
            f.seek(file_extent * SECTOR)
            return f.read(file_size)
    return None


def _iso_level1(name: str) -> str:
    stem, _, ext = name.partition(".")
    return f"{stem[:8]}.{ext[:3]}" if ext else stem[:8]
