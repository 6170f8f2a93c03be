"""libvirt's QEMU save file, read and re-headed for warm-snapshot clones.

A save file is a 92-byte header (magic, version, data_len, was_running, format, cookieOffset, 14 unused
words), ``data_len`` bytes holding the domain XML and the cookie (NUL-terminated), then QEMU's migration
stream. libvirt restores a save file under a *different* XML only if its ABI matches the saved one, and
a clone has another name, UUID and MAC; so a clone gets a save file of its own: a header and XML for the
clone, then the template's migration stream, copied in the kernel (copy_file_range).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidSpec

MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("=16s19I")     # magic, version, data_len, was_running, format, cookieOffset, unused[14]
MAX_DATA = 16 * 1024 * 1024


@dataclass(frozen=True)
class SaveImage:
    xml: str
    cookie: bytes
    version: int
    was_running: int
    format: int
    stream_offset: int


def read(path: Path) -> SaveImage:
    """The header, XML and cookie of the save file at ``path``; InvalidSpec for anything else."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise InvalidSpec(f"{path} is not a libvirt QEMU save file (too short)")
        magic, version, data_len, was_running, fmt, cookie_off, *_ = HEADER.unpack(head)
        if magic != MAGIC:
            raise InvalidSpec(f"{path} is not a complete libvirt QEMU save file")
        if version != 2 or fmt != 0 or data_len > MAX_DATA:
            raise InvalidSpec(f"{path}: save file version {version}, format {fmt} (want 2, uncompressed)")
        data = f.read(data_len)
    if len(data) < data_len:
        raise InvalidSpec(f"{path} is truncated")
    xml = data.split(b"\0", 1)[0].decode()
    cookie = data[cookie_off:].split(b"\0", 1)[0] if cookie_off else b""
    return SaveImage(xml, cookie, version, was_running, fmt, HEADER.size + data_len)


def write_clone(template: Path, image: SaveImage, xml: str, dest: Path) -> Path:
    """A save file at ``dest``: ``xml`` with the template's cookie, then the template's migration stream."""
    body = xml.encode() + b"\0"
    cookie_off = 0
    if image.cookie:
        cookie_off = len(body)
        body += image.cookie + b"\0"
    body += b"\0" * (-(HEADER.size + len(body)) % 4096)   # the stream starts page-aligned, as libvirt writes it
    head = HEADER.pack(MAGIC, image.version, len(body), image.was_running, image.format, cookie_off, *([0] * 14))
    size = os.path.getsize(template) - image.stream_offset
    with open(template, "rb") as src, open(dest, "xb") as out:
        out.write(head + body)
        out.flush()
        offset, done = image.stream_offset, 0
        while done < size:
            n = os.copy_file_range(src.fileno(), out.fileno(), size - done, offset + done)
            if n == 0:
                raise InvalidSpec(f"{template} shrank while it was copied")
            done += n
    return dest
