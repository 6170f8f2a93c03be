"""The VMRepository's GridFTP face: its content-addressed store served read-only as
``/images/<sha256>`` to whoever may read an image with those bytes, and an upload area
``/uploads/<area>/<name>`` where each user writes only into their own area. Who may read which bytes
is the registry core's question (:meth:`Registry.may_read_bytes`, through its enforcement point)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from gridftp.face import GridFTPFace
from gridftp.errors import PathError
from gridftp.filespace import FileSpace
from services.vmrepository.catalogue import Catalogue
from services.vmrepository.registry import UPLOAD_NAME as NAME
from services.vmrepository.registry import Registry, upload_area

log = logging.getLogger("vmgrid.VMRepositoryService.gridftp")
SHA = re.compile(r"[0-9a-f]{64}")
__all__ = ["NAME", "RepositoryFileSpace", "RepositoryTransfers", "upload_area"]


class RepositoryFileSpace(FileSpace):
    def __init__(self, catalogue: Catalogue, upload_dir: Path, upload_quota: int):
        self.catalogue = catalogue
        self.upload_dir = Path(upload_dir)
        self.upload_quota = upload_quota

    def real_path(self, vpath: str) -> Path:
        parts = [p for p in vpath.split("/") if p]
        if not parts:
            return self.upload_dir  # "/" lists as an empty directory for the tools that look
        if parts[0] == "images" and len(parts) == 2 and SHA.fullmatch(parts[1]):
            return self.catalogue.store.path(parts[1])
        if parts[0] == "images" and len(parts) == 1:
            return self.catalogue.store.blobs
        if parts[0] == "uploads" and 2 <= len(parts) <= 3 and all(NAME.fullmatch(p) or p.endswith(
                (".vmgrid-part", ".vmgrid-part.ranges")) for p in parts[1:]):
            area = self.upload_dir / parts[1]
            area.mkdir(exist_ok=True)
            return area if len(parts) == 2 else area / parts[2]
        raise PathError(f"{vpath}: no such path on this repository (/images/<sha256>, /uploads/<area>/<name>)")

    def quota(self, vpath: str) -> tuple[Path, int] | None:
        """Each user's upload area holds at most ``upload_quota`` bytes ([repository] upload_quota_bytes)."""
        parts = [p for p in vpath.split("/") if p]
        if parts[:1] == ["uploads"] and len(parts) == 3:
            return self.upload_dir / parts[1], self.upload_quota
        return None

    def known_checksum(self, vpath: str, algorithm: str) -> str | None:
        """An image's SHA256 is its name; its BLAKE3 was computed at ingest (in its descriptors)."""
        parts = [p for p in vpath.split("/") if p]
        if len(parts) == 2 and parts[0] == "images" and SHA.fullmatch(parts[1]):
            if algorithm.upper() == "SHA256":
                return parts[1]
            if algorithm.upper() == "BLAKE3":
                return self.catalogue.blake3_of(parts[1])
        return None


class RepositoryTransfers(GridFTPFace):
    """Runs the GridFTP server of a repository service (same host credential and trusted CAs)."""

    def __init__(self, registry: Registry, host: str, port: int, credential, trust, public_host: str = "",
                 **server_options):
        """``server_options``: GridFTPFace's ([gridftp]'s bounds on sessions, the guests' DN patterns). A guest
        container's certificate may not log in: the policy denies guests every image and every registration."""
        self.registry = registry
        super().__init__(RepositoryFileSpace(registry.catalogue, registry.upload_dir,
                                             registry.config.upload_quota_bytes), host, port, credential, trust,
                         authorize=self.authorize, upload_area="/uploads", public_host=public_host,
                         what="image store", log=log, **{**server_options, "refuse_guests": True})

    def authorize(self, dn: str | None, op: str, vpath: str) -> bool:
        if dn is None:
            return False
        parts = [p for p in vpath.split("/") if p]
        if parts[:1] == ["uploads"]:
            # only inside one's own area: write, list, delete (a failed upload); never read others'
            return len(parts) >= 2 and parts[1] == upload_area(dn) and op in ("write", "list", "delete", "read")
        if parts[:1] == ["images"] and len(parts) == 2 and op == "read":
            return self.registry.may_read_bytes(dn, parts[1])
        return False
