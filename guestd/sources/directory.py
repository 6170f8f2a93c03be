"""Context source: a plain directory holding context.json (for tests and hand-made guests)."""
from __future__ import annotations

from pathlib import Path

from ..context import FILE_NAME, InstanceContext, loads


class DirectorySource:
    name = "directory"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> InstanceContext | None:
        f = self.path / FILE_NAME
        if not f.is_file():
            return None
        return loads(f.read_bytes())
