"""The file space a GridFTP server serves: virtual absolute paths mapped onto local files.

:class:`LocalFileSpace` serves one directory tree and never lets a path (``..``, a symlink)
leave it. Subclass :class:`FileSpace` to serve something else (the VMRepository maps image
names onto its content-addressed store and knows every image's sha256 without hashing).
"""
from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from .errors import PathError

PART_SUFFIX = ".vmgrid-part"            # a file being received
SIDECAR_SUFFIX = ".vmgrid-part.ranges"  # the range markers persisted beside it


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def has_control(name: str) -> bool:
    """C0 controls or DEL in ``name``: NUL ends a C path, CR and LF end an FTP command or a listing's line, ESC and
    the rest would reach a reader's terminal through LIST and MLSD. No path holding one is served or listed."""
    return _CONTROL.search(name) is not None


def normalize(cwd: str, arg: str) -> str:
    """The absolute virtual path ``arg`` names when the working directory is ``cwd``."""
    if has_control(arg):
        raise PathError("control characters in path")
    path = posixpath.normpath(posixpath.join(cwd, arg or "."))
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path


def is_internal(vpath: str) -> bool:
    """True for the names the transfer machinery keeps beside files being received."""
    return vpath.endswith(PART_SUFFIX) or vpath.endswith(SIDECAR_SUFFIX)


class FileSpace:
    """Maps absolute virtual paths (``/images/debian.qcow2``) to local paths.

    The server normalises every path (no ``..`` survives) before asking; subclasses decide what
    exists. :meth:`real_path` must raise :class:`PathError` for anything outside the space.
    """

    def real_path(self, vpath: str) -> Path:
        """The local path of ``vpath``; it need not exist (STOR creates it)."""
        raise NotImplementedError

    def known_checksum(self, vpath: str, algorithm: str) -> str | None:
        """A checksum of the whole file the space already knows (hex), or None to compute it."""
        return None

    def committed(self, vpath: str, real: Path, sha256: str) -> None:
        """Called after a received file took its final name, verified with ``sha256``."""

    # what a 552 (the quota has no room) tells the user to do: with room taken by files of hers, and for a file
    # larger than the whole quota
    quota_advice = "delete or register uploads first"
    quota_too_small = "ask the server's operator for a larger quota"

    def quota(self, vpath: str) -> tuple[Path, int] | None:
        """The directory whose files count against one quota with ``vpath`` (a file being written) and
        that quota in bytes, or None when writes to ``vpath`` have no quota (the default). The server adds
        up the sizes of that directory's files (partial ones included) before each store."""
        return None

    def growing(self, vpath: str):
        """The :class:`gridftp.growing.Growth` of a file another party is still writing (RETR then follows
        it as it grows), or None for an ordinary file (the default)."""
        return None


class LocalFileSpace(FileSpace):
    """A directory tree served as ``/``; symlinks may not lead out of it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise PathError(f"{root} is not a directory")

    def real_path(self, vpath: str) -> Path:
        if not vpath.startswith("/"):
            raise PathError(f"{vpath!r} is not absolute")
        candidate = self.root / vpath.lstrip("/")
        # resolve the deepest existing ancestor; what does not exist yet cannot be a symlink
        probe = candidate
        while not os.path.lexists(probe) and probe != self.root:
            probe = probe.parent
        resolved = probe.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise PathError(f"{vpath} leaves the served tree")
        return resolved / candidate.relative_to(probe) if probe != candidate else resolved

    def __repr__(self) -> str:
        return f"LocalFileSpace({str(self.root)!r})"
