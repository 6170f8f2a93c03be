"""Context source: the ISO 9660 CD-ROM labelled VMGRID-CTX (the VMManager's config drive).

Scans the CD-ROM drives the kernel lists under /sys/block/sr*, reads each medium's volume label and
takes context.json from the one labelled VMGRID-CTX, without mounting anything.
"""
from __future__ import annotations

from pathlib import Path

from ..context import FILE_NAME, VOLUME_LABEL, ContextError, InstanceContext, loads
from ..system import Roots
from . import iso9660


class CdromSource:
    name = "cdrom"

    def __init__(self, roots: Roots, label: str = VOLUME_LABEL) -> None:
        self.roots, self.label = roots, label

    def drives(self) -> list[Path]:
        block = self.roots.sys / "block"
        names = sorted(p.name for p in block.glob("sr*")) if block.is_dir() else []
        return [self.roots.dev / n for n in names]

    def read(self) -> InstanceContext | None:
        for device in self.drives():
            try:
                with open(device, "rb") as f:
                    if iso9660.volume_label(f) != self.label:
                        continue
                    data = iso9660.read_file(f, FILE_NAME)
            except OSError:           # an empty drive: ENOMEDIUM
                continue
            except iso9660.ISOError as exc:
                raise ContextError(f"{device}: {exc}") from None
            return loads(data)
        return None
