"""[repository] of the TOML configuration: a light module, so loading a configuration imports no service."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RepositoryConfig:
    """[repository] in the TOML configuration (docs/configuration.md)."""

    ingest_dirs: list[str] = field(default_factory=list)  # where admins may ingest from (localPath)
    upload_dir: str = ""  # the GridFTP upload area ("" = state_dir/uploads)
    max_image_bytes: int = 64 * 1024**3
    upload_quota_bytes: int = 128 * 1024**3  # what one user's upload area may hold, partial uploads included
    upload_max_age: int = 7 * 24 * 3600  # seconds an upload (or what a cut one left) stays unregistered; 0 = kept
    default_limit: int = 20
    max_hold_seconds: int = 7 * 24 * 3600
    reserve_bytes: int = 8 * 1024 * 1024  # space kept free so RemoveImage works on a full disk (0: none)
    gridftp_port: int = 2811          # the image store's GridFTP server (0: any free port; -1: none)
    gridftp_host: str = ""            # "" = the container's host
    gridftp_public_host: str = ""     # the host name put in gsiftp:// URLs ("" = derived)
