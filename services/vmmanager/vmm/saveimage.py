"""libvirt's QEMU save file, read and re-headed for warm-snapshot clones.

A save file is a 92-byte header (magic, version, data_len, was_running, format, cookieOffset, 14 unused
words), ``data_len`` bytes holding the domain XML and the cookie (NUL-terminated), then QEMU's migration
stream. libvirt restores a save file under a *different* XML only if its ABI matches the saved one, and
a clone has another name, UUID and MAC; so a clone gets a save file of its own: a header and XML for the
clone, then the template's migration stream, copied in the kernel (copy_file_range).

The copy (about 0.2 s for a 256 MiB guest's 105 MiB state) need not be paid by the deploy: a **spare**
is the stream copied ahead of time at offset :data:`RESERVED`, its header area left blank; a clone that
takes one only writes its header, XML and cookie into that area (NUL-padded, as libvirt pads them).
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
RESERVED = 64 * 1024                  # a spare's header area: header + XML + cookie, NUL-padded; the stream follows


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


def _head(image: SaveImage, xml: str, size: int | None = None) -> bytes:
    """Header, ``xml`` and the template's cookie, NUL-padded to a page boundary or to exactly ``size`` bytes."""
    body = xml.encode() + b"\0"
    cookie_off = 0
    if image.cookie:
        cookie_off = len(body)
        body += image.cookie + b"\0"
    pad = -(HEADER.size + len(body)) % 4096 if size is None else size - HEADER.size - len(body)
    if pad < 0:
        raise InvalidSpec(f"the clone's domain XML does not fit a spare's {size}-byte header area")
    body += b"\0" * pad   # the stream starts page-aligned, as libvirt writes it
    return HEADER.pack(MAGIC, image.version, len(body), image.was_running, image.format, cookie_off,
                       *([0] * 14)) + body


def _copy_stream(template: Path, image: SaveImage, out, at: int) -> None:
    size = os.path.getsize(template) - image.stream_offset
    with open(template, "rb") as src:
        done = 0
        while done < size:
            n = os.copy_file_range(src.fileno(), out.fileno(), size - done, image.stream_offset + done, at + done)
            if n == 0:
                raise InvalidSpec(f"{template} shrank while it was copied")
            done += n


def write_clone(template: Path, image: SaveImage, xml: str, dest: Path) -> Path:
    """A save file at ``dest``: ``xml`` with the template's cookie, then the template's migration stream."""
    head = _head(image, xml)
    with open(dest, "xb") as out:
        out.write(head)
        out.flush()
        _copy_stream(template, image, out, len(head))
    return dest


def write_spare(template: Path, image: SaveImage, dest: Path) -> Path:
    """A spare at ``dest``: the template's stream at offset RESERVED, the header area blank (written under a
    temporary name, renamed when complete: a spare that exists is whole)."""
    part = dest.with_name(dest.name + ".part")
    try:
        with open(part, "wb") as out:
            _copy_stream(template, image, out, RESERVED)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def take_spare(spare: Path, template: Path, image: SaveImage, xml: str, dest: Path) -> bool:
    """Move ``spare`` to ``dest`` and write the clone's header into it; False (nothing at ``dest``) when
    there is no such spare any more (another clone took it), it is not the template's size, or the XML
    does not fit: the caller then copies (write_clone)."""
    try:
        os.rename(spare, dest)
    except OSError:
        return False
    try:
        if os.path.getsize(dest) != RESERVED + os.path.getsize(template) - image.stream_offset:
            raise InvalidSpec(f"spare {spare} is not a copy of {template}")
        head = _head(image, xml, RESERVED)
        fd = os.open(dest, os.O_WRONLY)
        try:
            os.pwrite(fd, head, 0)
        finally:
            os.close(fd)
        return True
    except (OSError, InvalidSpec):
        dest.unlink(missing_ok=True)
        return False
